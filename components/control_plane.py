"""The control plane: etcd, then kube-apiserver, then controller-manager and scheduler."""

from __future__ import annotations

import pulumi

from components.config import ClusterConfig
from components.host import Binary, Check, File, HostAccess, SecretFile, StepSpec
from components.pki import BACKUP_ETCD_USER, ClusterPki, kubeconfig
from components.render import render

LOCAL_API = "https://127.0.0.1:6443"


def https_urls(addresses: list[pulumi.Input[str]], port: int) -> pulumi.Output[str]:
    return pulumi.Output.all(*addresses).apply(lambda xs: ",".join(f"https://{a}:{port}" for a in xs))


class ControlPlane(pulumi.ComponentResource):
    """etcd members, API servers, controller-managers and schedulers on every master.

    ``ready`` lists the resources that together mean "the control plane answers and is
    configured": every worker step depends on it.
    """

    def __init__(self, name: str, cfg: ClusterConfig, hosts: dict[str, HostAccess], pki: ClusterPki,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:control:ControlPlane", name, None, opts)
        masters = [hosts[n.name] for n in cfg.master_nodes]
        first = masters[0]
        addresses = [m.machine.private_address for m in masters]
        self.etcd_servers = https_urls(addresses, 2379)
        initial_cluster = pulumi.Output.all(*addresses).apply(
            lambda xs: ",".join(f"{m.machine.name}=https://{a}:2380" for m, a in zip(masters, xs, strict=True)))
        net = cfg.network
        token = f"{cfg.name}-etcd"  # the etcd cluster token, also what a restore re-creates

        # 1. etcd on every master (members start in parallel and wait for quorum).
        self.etcd = {}
        for m in masters:
            n = m.machine.name
            unit = pulumi.Output.all(m.machine.private_address, initial_cluster).apply(lambda v, n=n: render(
                "systemd/etcd.service.j2", name=n, address=v[0], initial_cluster=v[1],
                cluster_token=token, heartbeat_ms=cfg.etcd.heartbeat_interval_ms,
                election_ms=cfg.etcd.election_timeout_ms))
            self.etcd[n] = m.step("etcd", "scripts/install-etcd.sh.j2", StepSpec(
                units=["etcd"],
                binaries=[Binary("bin/etcd", "/usr/local/bin/etcd"), Binary("bin/etcdctl", "/usr/local/bin/etcdctl")],
                dirs=[("/var/lib/etcd", "0700"), ("/etc/etcd/pki", "0755")],
                files=[File("/etc/systemd/system/etcd.service", unit),
                       File("/etc/etcd/pki/ca.crt", pki.etcd_ca.cert),
                       File("/etc/etcd/pki/server.crt", pki.etcd_server[n].cert),
                       File("/etc/etcd/pki/peer.crt", pki.etcd_peer[n].cert),
                       File("/etc/etcd/pki/healthcheck-client.crt", pki.etcd_healthcheck.cert)],
                secret_files=[SecretFile("/etc/etcd/pki/server.key", pki.etcd_server[n].key),
                              SecretFile("/etc/etcd/pki/peer.key", pki.etcd_peer[n].key),
                              SecretFile("/etc/etcd/pki/healthcheck-client.key", pki.etcd_healthcheck.key)],
            ), parent=self, timeout="30m")
        etcd_all = list(self.etcd.values())

        # 2. etcd authentication: every client is its certificate's CN, with least privilege
        #    (flannel's key, on every node, reaches only flannel's prefix, not the cluster's Secrets).
        prefix = net.etcd_prefix.rstrip("/") + "/"
        self.etcd_auth = first.step("etcd-auth", "scripts/etcd-auth.sh.j2", StepSpec(
            files=[File("/etc/etcd/pki/root-client.crt", pki.etcd_root_client.cert)],
            secret_files=[SecretFile("/etc/etcd/pki/root-client.key", pki.etcd_root_client.key)],
            context={
                "roles": [{"name": "flannel", "permissions": [{"access": "readwrite", "key": prefix, "prefix": True}]},
                          {"name": "kube-etcd-healthcheck", "permissions": [{"access": "read", "key": "health", "prefix": False}]}],
                "users": [{"name": "kube-apiserver-etcd-client", "role": "root"},
                          *([{"name": BACKUP_ETCD_USER, "role": "root"}] if cfg.backup.enabled else []),
                          {"name": "flannel", "role": "flannel"},
                          {"name": "kube-etcd-healthcheck-client", "role": "kube-etcd-healthcheck"}],
            },
        ), parent=self, depends_on=etcd_all)
        etcd_all = [*etcd_all, self.etcd_auth]

        # 2b. etcd snapshots on every master, on a timer, kept and verified (restore: README).
        self.etcd_backup = {}
        if cfg.backup.enabled:
            assert pki.etcd_backup_client is not None
            b = cfg.backup
            for m in masters:
                n = m.machine.name
                ctx = {"name": n, "backup_dir": b.directory}
                restore = pulumi.Output.all(m.machine.private_address, initial_cluster).apply(
                    lambda v, ctx=ctx: render("scripts/etcd-restore.sh.j2", **ctx, initial_cluster=v[1],
                                              cluster_token=token, peer_url=f"https://{v[0]}:2380"))
                self.etcd_backup[n] = m.step("etcd-backup", "scripts/install-service.sh.j2", StepSpec(
                    units=["etcd-backup.timer"],
                    binaries=[Binary("bin/etcdutl", "/usr/local/bin/etcdutl")],
                    # The snapshots' directory is made by the job and outlives a teardown.
                    dirs=[("/usr/local/lib/kubelab", "0755")],
                    files=[File("/etc/systemd/system/etcd-backup.service", render("systemd/etcd-backup.service.j2", **ctx)),
                           File("/etc/systemd/system/etcd-backup.timer", render("systemd/etcd-backup.timer.j2", interval=b.interval)),
                           File("/usr/local/lib/kubelab/etcd-backup.sh", render("scripts/etcd-backup.sh.j2", **ctx, keep=b.keep),
                                mode="0755"),
                           File("/usr/local/lib/kubelab/etcd-restore.sh", restore, mode="0755"),
                           File("/etc/etcd/pki/backup-client.crt", pki.etcd_backup_client.cert)],
                    secret_files=[SecretFile("/etc/etcd/pki/backup-client.key", pki.etcd_backup_client.key)],
                    remove=["/usr/local/lib/kubelab/etcd-backup.sh", "/usr/local/lib/kubelab/etcd-restore.sh",
                            "/etc/systemd/system/etcd-backup.service"],
                ), parent=self, depends_on=[self.etcd[n], self.etcd_auth])

        # 3. The flannel network config, written into etcd once (seed 000/001's etcd prefix).
        self.flannel_config = first.step("flannel-network-config", "scripts/write-flannel-config.sh.j2", StepSpec(
            context={"network_config": render("config/flannel-network.json.j2", pod_cidr=net.pod_cidr,
                                              backend=net.flannel_backend).strip(),
                     "etcd_prefix": net.etcd_prefix},
        ), parent=self, depends_on=etcd_all)

        # 4. kube-apiserver on every master, once all etcd members are healthy.
        admin_local = kubeconfig(cfg.name, LOCAL_API, pki.ca.cert, pki.admin, "admin")
        encryption = pulumi.Output.secret(pki.encryption_key.apply(
            lambda k: render("config/encryption-config.yaml.j2", key=k)))
        self.apiserver = {}
        for m in masters:
            n = m.machine.name
            unit = pulumi.Output.all(m.machine.private_address, self.etcd_servers).apply(lambda v: render(
                "systemd/kube-apiserver.service.j2", address=v[0], etcd_servers=v[1], local_etcd=True,
                cluster_domain=net.cluster_domain, service_cidr=net.service_cidr,
                node_port_range=cfg.apiserver.service_node_port_range))
            self.apiserver[n] = m.step("kube-apiserver", "scripts/install-service.sh.j2", StepSpec(
                units=["kube-apiserver"],
                binaries=[Binary("bin/kube-apiserver", "/usr/local/bin/kube-apiserver"),
                          Binary("bin/kubectl", "/usr/local/bin/kubectl")],
                dirs=[("/var/lib/kubernetes", "0700"), ("/etc/kubernetes/pki", "0755"), ("/var/log/kubernetes", "0700")],
                files=[File("/etc/systemd/system/kube-apiserver.service", unit),
                       File("/etc/kubernetes/audit-policy.yaml", render("config/audit-policy.yaml.j2")),
                       File("/etc/kubernetes/admission-config.yaml", render(
                           "config/admission-config.yaml.j2", pod_security=cfg.pod_security)),
                       File("/etc/kubernetes/pki/ca.crt", pki.ca.cert),
                       File("/etc/kubernetes/pki/etcd-ca.crt", pki.etcd_ca.cert),
                       File("/etc/kubernetes/pki/front-proxy-ca.crt", pki.front_proxy_ca.cert),
                       File("/etc/kubernetes/pki/apiserver.crt", pki.apiserver.cert),
                       File("/etc/kubernetes/pki/apiserver-etcd-client.crt", pki.apiserver_etcd_client.cert),
                       File("/etc/kubernetes/pki/apiserver-kubelet-client.crt", pki.apiserver_kubelet_client.cert),
                       File("/etc/kubernetes/pki/front-proxy-client.crt", pki.front_proxy_client.cert),
                       File("/etc/kubernetes/pki/service-account.pub", pki.service_account_pub)],
                secret_files=[SecretFile("/etc/kubernetes/pki/apiserver.key", pki.apiserver.key),
                              SecretFile("/etc/kubernetes/pki/apiserver-etcd-client.key", pki.apiserver_etcd_client.key),
                              SecretFile("/etc/kubernetes/pki/apiserver-kubelet-client.key", pki.apiserver_kubelet_client.key),
                              SecretFile("/etc/kubernetes/pki/front-proxy-client.key", pki.front_proxy_client.key),
                              SecretFile("/etc/kubernetes/pki/service-account.key", pki.service_account_key),
                              SecretFile("/etc/kubernetes/encryption-config.yaml", encryption),
                              SecretFile("/etc/kubernetes/admin.kubeconfig", admin_local)],
                checks=[Check("/usr/local/bin/kubectl --kubeconfig /etc/kubernetes/admin.kubeconfig get --raw /readyz", tries=90)],
            ), parent=self, depends_on=etcd_all)
        api_all = list(self.apiserver.values())

        # 5. Let the API server reach kubelets (logs, exec, port-forward) under RBAC.
        self.apiserver_to_kubelet = first.step("rbac-apiserver-to-kubelet", "scripts/kubectl-apply.sh.j2", StepSpec(
            context={"manifest": render("addons/apiserver-to-kubelet-rbac.yaml.j2", user="kube-apiserver")},
        ), parent=self, depends_on=api_all)

        # 6. controller-manager and scheduler on every master, after its API server.
        self.controller_manager, self.scheduler = {}, {}
        for m in masters:
            n = m.machine.name
            cm_kc = kubeconfig(cfg.name, LOCAL_API, pki.ca.cert, pki.controller_manager, "system:kube-controller-manager")
            self.controller_manager[n] = m.step("kube-controller-manager", "scripts/install-service.sh.j2", StepSpec(
                units=["kube-controller-manager"],
                binaries=[Binary("bin/kube-controller-manager", "/usr/local/bin/kube-controller-manager")],
                files=[File("/etc/systemd/system/kube-controller-manager.service", render(
                    "systemd/kube-controller-manager.service.j2", cluster_name=cfg.name, service_cidr=net.service_cidr))],
                secret_files=[SecretFile("/etc/kubernetes/pki/ca.key", pki.ca.key),
                              SecretFile("/etc/kubernetes/kube-controller-manager.kubeconfig", cm_kc)],
                checks=[Check("curl -sfk https://127.0.0.1:10257/healthz -o /dev/null")],
            ), parent=self, depends_on=[self.apiserver[n]])
            sched_kc = kubeconfig(cfg.name, LOCAL_API, pki.ca.cert, pki.scheduler, "system:kube-scheduler")
            self.scheduler[n] = m.step("kube-scheduler", "scripts/install-service.sh.j2", StepSpec(
                units=["kube-scheduler"],
                binaries=[Binary("bin/kube-scheduler", "/usr/local/bin/kube-scheduler")],
                files=[File("/etc/systemd/system/kube-scheduler.service", render("systemd/kube-scheduler.service.j2"))],
                secret_files=[SecretFile("/etc/kubernetes/kube-scheduler.kubeconfig", sched_kc)],
                checks=[Check("curl -sfk https://127.0.0.1:10259/healthz -o /dev/null")],
            ), parent=self, depends_on=[self.apiserver[n]])

        # What a node's kubelet and kube-proxy need: an API server answering on every master
        # (not the controllers: they need nothing from a node to start, nor a node from them).
        self.api_ready: list[pulumi.Resource] = [*self.apiserver.values()]
        self.ready: list[pulumi.Resource] = [
            self.flannel_config, self.apiserver_to_kubelet,
            *self.controller_manager.values(), *self.scheduler.values(),
        ]
        self.register_outputs({"etcd_servers": self.etcd_servers})
