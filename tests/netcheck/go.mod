module kubelab/netcheck

go 1.26
