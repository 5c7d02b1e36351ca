"""A node that runs workloads: containerd (with CNI), kubelet and kube-proxy."""

from __future__ import annotations

from collections.abc import Sequence

import pulumi

from components.config import ClusterConfig, NodeSpec
from components.host import Binary, Check, File, HostAccess, SecretFile, StepSpec
from components.pki import ClusterPki, kubeconfig
from components.registry import CA_FILE, hosts_files
from components.render import render

CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap", "flannel")


def kube_proxy_step(cfg: ClusterConfig, host: HostAccess, pki: ClusterPki, api_server: pulumi.Input[str],
                    parent: pulumi.Resource, depends_on: Sequence[pulumi.Resource]) -> pulumi.Resource:
    """kube-proxy (iptables mode) on one host: ClusterIPs answer there, pods or not."""
    name = host.machine.name
    proxy_kc = kubeconfig(cfg.name, api_server, pki.ca.cert, pki.kube_proxy, "system:kube-proxy")
    return host.step("kube-proxy", "scripts/install-service.sh.j2", StepSpec(
        units=["kube-proxy"],
        binaries=[Binary("bin/kube-proxy", "/usr/local/bin/kube-proxy")],
        dirs=[("/var/lib/kube-proxy", "0700")],
        files=[File("/etc/systemd/system/kube-proxy.service", render("systemd/kube-proxy.service.j2", name=name)),
               File("/var/lib/kube-proxy/config.yaml", render("config/kube-proxy-config.yaml.j2", pod_cidr=cfg.network.pod_cidr))],
        secret_files=[SecretFile("/var/lib/kube-proxy/kubeconfig", proxy_kc)],
        checks=[Check("curl -s http://127.0.0.1:10256/healthz -o /dev/null")],
    ), parent=parent, depends_on=depends_on)


class ServiceProxy(pulumi.ComponentResource):
    """kube-proxy on a master that runs no pods (no kubelet): the control plane and the host
    reach Services there as on every other node (kubeadm, kubespray and Typhoon control
    planes all run it), while the master still takes no pods."""

    def __init__(self, cfg: ClusterConfig, host: HostAccess, pki: ClusterPki, api_server: pulumi.Input[str],
                 depends_on: Sequence[pulumi.Resource], opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:node:ServiceProxy", host.machine.name, None, opts)
        self.kube_proxy = kube_proxy_step(cfg, host, pki, api_server, self, depends_on)
        self.register_outputs({"node": host.machine.name})


class WorkerNode(pulumi.ComponentResource):
    """containerd → kubelet → kube-proxy on one node; containerd installs while the control
    plane bootstraps, kubelet and kube-proxy wait for its API server (``api_ready``)."""

    def __init__(self, node: NodeSpec, cfg: ClusterConfig, host: HostAccess, pki: ClusterPki,
                 api_server: pulumi.Input[str], api_ready: Sequence[pulumi.Resource],
                 flanneld: pulumi.Resource, registry_url: pulumi.Input[str] | None,
                 gate: Sequence[pulumi.Resource] = (), opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:worker:WorkerNode", node.name, None, opts)
        self.node = node.name
        v, net = cfg.versions, cfg.network
        ready = list(api_ready)
        gate = list(gate)  # what every step here waits for first (the rollout's drain of this node)
        self.steps: list[pulumi.Resource] = []

        # 0. Where the platform has a metadata service holding the machine's secrets
        #    (DigitalOcean user_data), pods may not reach it: in place before any pod runs.
        first: list[pulumi.Resource] = []
        metadata = host.machine.metadata_address
        if metadata:
            block = host.step("metadata-block", "scripts/install-service.sh.j2", StepSpec(
                units=["kubelab-metadata-block"],
                files=[File("/etc/systemd/system/kubelab-metadata-block.service", render(
                    "systemd/kubelab-metadata-block.service.j2", pod_cidr=net.pod_cidr, metadata_address=metadata))],
            ), parent=self, depends_on=gate)
            first = [block]
            self.steps.append(block)

        # 1. containerd, runc and the CNI plugins; with no private registry, preloaded images
        #    (pause, CoreDNS, metrics-server); with one, where to pull from. Needs nothing from the control plane, so on a worker it installs and imports its images
        #    while the masters bootstrap (off the critical path). On a master that also runs
        #    pods (seed 000) it would compete with etcd and kube-apiserver on the same machine,
        #    so there it waits for the control plane like everything after it.
        self.containerd = host.step("containerd", "scripts/install-containerd.sh.j2", StepSpec(
            units=["containerd"],
            binaries=[Binary("bin/containerd", "/usr/local/bin/containerd"),
                      Binary("bin/containerd-shim-runc-v2", "/usr/local/bin/containerd-shim-runc-v2"),
                      Binary("bin/ctr", "/usr/local/bin/ctr"),
                      Binary("bin/runc", "/usr/local/bin/runc"),
                      *[Binary(f"cni/{p}", f"/opt/cni/bin/{p}") for p in CNI_PLUGINS]],
            images=[] if registry_url is not None else host.bundle.images_for(cfg.addons),
            dirs=[("/etc/cni/net.d", "0755"), ("/var/lib/containerd", "0711")],
            files=[File("/etc/systemd/system/containerd.service", render("systemd/containerd.service.j2")),
                   File("/etc/containerd/config.toml", render(
                       "config/containerd-config.toml.j2", containerd_version=v["containerd"],
                       sandbox_image=f"registry.k8s.io/pause:{v['pause']}")),
                   File("/etc/cni/net.d/10-flannel.conflist", render("config/10-flannel.conflist.j2")),
                   *([File(CA_FILE, pki.ca.cert)] if registry_url is not None and not cfg.registry.insecure else []),
                   *hosts_files(cfg, registry_url)],
            remove=["/etc/containerd", "/var/lib/containerd", "/run/containerd", "/opt/cni", "/var/lib/cni"],
            # containerd's KillMode=process leaves shims and containers running: stop them too.
            cleanup=["pkill -f '^/usr/local/bin/containerd-shim-runc-v2 '", "ip link delete cni0"],
        ), parent=self, depends_on=[*gate, *first, *(ready if node.role == "master" else [])])

        # 2. kubelet: node client certificate (Node authorizer) and serving certificate.
        kubelet_kc = kubeconfig(cfg.name, api_server, pki.ca.cert, pki.kubelet_client[node.name], f"system:node:{node.name}")
        unit = pulumi.Output.from_input(host.machine.private_address).apply(lambda addr: render(
            "systemd/kubelet.service.j2", name=node.name, address=addr,
            node_labels=f"kubelab.io/role={node.role}", register_with_taints=""))
        self.kubelet = host.step("kubelet", "scripts/install-kubelet.sh.j2", StepSpec(
            units=["kubelet"],
            binaries=[Binary("bin/kubelet", "/usr/local/bin/kubelet")],
            dirs=[("/var/lib/kubelet", "0700"), ("/var/lib/kubelet/pki", "0700"), ("/etc/kubernetes/pki", "0755")],
            files=[File("/etc/systemd/system/kubelet.service", unit),
                   File("/var/lib/kubelet/config.yaml", render(
                       "config/kubelet-config.yaml.j2", cluster_domain=net.cluster_domain, cluster_dns=net.cluster_dns,
                       max_pods=cfg.kubelet.max_pods)),
                   File("/etc/kubernetes/pki/ca.crt", pki.ca.cert),
                   File("/var/lib/kubelet/pki/kubelet.crt", pki.kubelet_serving[node.name].cert)],
            secret_files=[SecretFile("/var/lib/kubelet/pki/kubelet.key", pki.kubelet_serving[node.name].key),
                          SecretFile("/var/lib/kubelet/kubeconfig", kubelet_kc)],
            context={"upstream_dns": list(net.upstream_dns)},
            remove=["/etc/kubernetes/resolv.conf", "/etc/kubernetes/resolv.conf.kubelab", "/var/lib/kubelet"],
        ), parent=self, depends_on=[*gate, *ready, self.containerd, flanneld])

        # 3. kube-proxy (iptables mode).
        self.kube_proxy = kube_proxy_step(cfg, host, pki, api_server, self, [*gate, *ready, self.containerd])

        self.steps += [self.containerd, self.kubelet, self.kube_proxy]
        self.register_outputs({"node": node.name, "role": node.role})
