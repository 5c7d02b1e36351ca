"""The control plane: etcd, then kube-apiserver, then controller-manager and scheduler."""

from __future__ import annotations

import pulumi

from components.config import ClusterConfig
from components.host import Binary, Check, File, HostAccess, SecretFile, StepSpec
from components.pki import BACKUP_ETCD_USER, ClusterPki, kubeconfig
from components.render import render
from components.transitions import Deployed, EtcdMember

LOCAL_API = "https://127.0.0.1:6443"


DESTROYING_MARK = "/var/lib/kubelab/cluster-destroying"


def https_urls(addresses: list[pulumi.Input[str]], port: int) -> pulumi.Output[str]:
    return pulumi.Output.all(*addresses).apply(lambda xs: ",".join(f"https://{a}:{port}" for a in xs))


def peer_list(names: list[str], addresses: list[pulumi.Input[str]]) -> pulumi.Output[str]:
    """etcd's ``--initial-cluster``: name=https://address:2380,..."""
    return pulumi.Output.all(*addresses).apply(
        lambda xs: ",".join(f"{n}=https://{a}:2380" for n, a in zip(names, xs, strict=True)))


class ControlPlane(pulumi.ComponentResource):
    """etcd members, API servers, controller-managers and schedulers on every master.

    ``ready`` lists the resources that together mean "the control plane answers and is
    configured": every worker step depends on it. ``etcd_members`` is how each member was
    first started (exported, so the next update renders a running member's unit unchanged).

    Members: on a new cluster every master founds etcd (``initial-cluster-state: new``). A
    master added later (``before`` lists the members running now) joins as a learner
    (``member add --learner`` from its own etcd step, against the running members), catches
    up, is promoted, and only then counts for quorum. Every master after the first has an
    ``etcd-member-<name>`` step on the first master: it checks that member votes, and on
    delete (the master removed from the stack) runs ``member remove`` before its machine goes.
    """

    def __init__(self, name: str, cfg: ClusterConfig, hosts: dict[str, HostAccess], pki: ClusterPki,
                 before: Deployed | None = None, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:control:ControlPlane", name, None, opts)
        masters = [hosts[n.name] for n in cfg.master_nodes]
        first = masters[0]
        addresses = [m.machine.private_address for m in masters]
        self.etcd_servers = https_urls(addresses, 2379)
        initial_cluster = peer_list([m.machine.name for m in masters], addresses)
        net = cfg.network
        token = f"{cfg.name}-etcd"  # the etcd cluster token, also what a restore re-creates
        recorded = (before.etcd_members if before else None) or {}
        running = [m for m in masters if m.machine.name in recorded]

        def one_after(earlier: list[HostAccess], layer: dict[str, pulumi.Resource]) -> list[pulumi.Resource]:
            """On a running cluster each master's member of a layer (etcd, API server, controllers)
            changes only after the one before it is done and healthy, so an update (an upgrade
            above all) never restarts two at once. A new cluster starts them together (etcd's
            founding members need each other for quorum)."""
            return [layer[earlier[-1].machine.name]] if before is not None and before.masters and earlier else []

        # 1. etcd on every master (founding members start in parallel and wait for quorum; a
        #    member that joins a running cluster does so after the running ones are healthy).
        self.etcd: dict[str, pulumi.Resource] = {}
        members: dict[str, pulumi.Output[EtcdMember]] = {}
        joined: list[HostAccess] = []  # members that join in this update, in order
        for i, m in enumerate(masters):
            n = m.machine.name
            if n in recorded:
                member = pulumi.Output.from_input(recorded[n])
                state = recorded[n].state
            elif not recorded:
                member = initial_cluster.apply(lambda ic: EtcdMember(initial_cluster=ic, state="new"))
                state = "new"
            else:
                # Joins after every member before it: one learner at a time.
                before_it = [*running, *joined]
                member = peer_list([r.machine.name for r in before_it] + [n],
                                   [r.machine.private_address for r in before_it] + [m.machine.private_address]
                                   ).apply(lambda ic: EtcdMember(initial_cluster=ic, state="existing"))
                state = "existing"
                joined.append(m)
            # A member that joined keeps what it joined with (the masters before it answer
            # `member add`), so its step stays the same on the next update.
            join = None if state == "new" else pulumi.Output.all(m.machine.private_address, https_urls(
                [r.machine.private_address for r in masters[:i]], 2379)).apply(
                lambda v: {"peer_url": f"https://{v[0]}:2380", "endpoints": v[1]})
            members[n] = member
            unit = pulumi.Output.all(m.machine.private_address, member).apply(lambda v, n=n: render(
                "systemd/etcd.service.j2", name=n, address=v[0], initial_cluster=v[1].initial_cluster,
                initial_cluster_state=v[1].state, cluster_token=token, heartbeat_ms=cfg.etcd.heartbeat_interval_ms,
                election_ms=cfg.etcd.election_timeout_ms))
            files = [File("/etc/systemd/system/etcd.service", unit),
                     File("/etc/etcd/pki/ca.crt", pki.etcd_ca.cert),
                     File("/etc/etcd/pki/server.crt", pki.etcd_server[n].cert),
                     File("/etc/etcd/pki/peer.crt", pki.etcd_peer[n].cert),
                     File("/etc/etcd/pki/healthcheck-client.crt", pki.etcd_healthcheck.cert)]
            secrets = [SecretFile("/etc/etcd/pki/server.key", pki.etcd_server[n].key),
                       SecretFile("/etc/etcd/pki/peer.key", pki.etcd_peer[n].key),
                       SecretFile("/etc/etcd/pki/healthcheck-client.key", pki.etcd_healthcheck.key)]
            if join is not None:
                # etcd's own admin (auth is on): member add and promote, against the running members.
                files.append(File("/etc/etcd/pki/root-client.crt", pki.etcd_root_client.cert))
                secrets.append(SecretFile("/etc/etcd/pki/root-client.key", pki.etcd_root_client.key))
                files.append(File("/etc/etcd/join.env", join.apply(
                    lambda j: f"KUBELAB_ETCD_ENDPOINTS={j['endpoints']}\nKUBELAB_ETCD_PEER_URL={j['peer_url']}\n")))
            self.etcd[n] = m.step("etcd", "scripts/install-etcd.sh.j2", StepSpec(
                units=["etcd"],
                binaries=[Binary("bin/etcd", "/usr/local/bin/etcd"), Binary("bin/etcdctl", "/usr/local/bin/etcdctl")],
                dirs=[("/var/lib/etcd", "0700"), ("/etc/etcd/pki", "0755")],
                files=files, secret_files=secrets,
                context={"join": join is not None},
            ), parent=self, depends_on=[self.etcd[r.machine.name] for r in [*running, *joined[:-1]]]
                if m in joined else one_after(masters[:i], self.etcd), timeout="30m")
        self.etcd_members = pulumi.Output.all(**members).apply(
            lambda ms: {n: {"initialCluster": m.initial_cluster, "initialClusterState": m.state} for n, m in ms.items()})
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

        # 2a. Every master after the first: checked as a voting member; removed from etcd
        #     (``member remove``, quorum kept) when the master leaves the stack, before its
        #     machine goes. Skipped when the whole cluster is being destroyed.
        self.members = [
            first.step(f"etcd-member-{m.machine.name}", "scripts/etcd-member.sh.j2", StepSpec(
                context={"member": m.machine.name},
                on_delete=("scripts/etcd-member-remove.sh.j2", {"member": m.machine.name, "marker": DESTROYING_MARK}),
            ), parent=self, depends_on=[self.etcd[m.machine.name], self.etcd_auth])
            for m in masters[1:]
        ]

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
            # Its own etcd member only (stacked etcd, as kubeadm does it): a member joining or
            # leaving changes no API server's flags.
            unit = pulumi.Output.from_input(m.machine.private_address).apply(lambda a: render(
                "systemd/kube-apiserver.service.j2", address=a, etcd_servers="https://127.0.0.1:2379", local_etcd=True,
                cluster_domain=net.cluster_domain, service_cidr=net.service_cidr,
                node_port_range=cfg.apiserver.service_node_port_range,
                etcd_check_timeout_s=cfg.etcd.client_check_timeout_s))
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
                       File("/etc/kubernetes/pki/apiserver.crt", pki.apiserver[n].cert),
                       File("/etc/kubernetes/pki/apiserver-etcd-client.crt", pki.apiserver_etcd_client.cert),
                       File("/etc/kubernetes/pki/apiserver-kubelet-client.crt", pki.apiserver_kubelet_client.cert),
                       File("/etc/kubernetes/pki/front-proxy-client.crt", pki.front_proxy_client.cert),
                       File("/etc/kubernetes/pki/service-account.pub", pki.service_account_pub)],
                secret_files=[SecretFile("/etc/kubernetes/pki/apiserver.key", pki.apiserver[n].key),
                              SecretFile("/etc/kubernetes/pki/apiserver-etcd-client.key", pki.apiserver_etcd_client.key),
                              SecretFile("/etc/kubernetes/pki/apiserver-kubelet-client.key", pki.apiserver_kubelet_client.key),
                              SecretFile("/etc/kubernetes/pki/front-proxy-client.key", pki.front_proxy_client.key),
                              SecretFile("/etc/kubernetes/pki/service-account.key", pki.service_account_key),
                              SecretFile("/etc/kubernetes/encryption-config.yaml", encryption),
                              SecretFile("/etc/kubernetes/admin.kubeconfig", admin_local)],
                checks=[Check("/usr/local/bin/kubectl --kubeconfig /etc/kubernetes/admin.kubeconfig get --raw /readyz", tries=90)],
            ), parent=self, depends_on=[*etcd_all, *one_after(masters[:masters.index(m)], self.apiserver)])
        api_all = list(self.apiserver.values())

        # 5. Let the API server reach kubelets (logs, exec, port-forward) under RBAC.
        self.apiserver_to_kubelet = first.step("rbac-apiserver-to-kubelet", "scripts/kubectl-apply.sh.j2", StepSpec(
            context={"manifest": render("addons/apiserver-to-kubelet-rbac.yaml.j2", user="kube-apiserver")},
        ), parent=self, depends_on=api_all)

        # 6. controller-manager and scheduler on every master, after its API server.
        self.controller_manager, self.scheduler = {}, {}
        for i, m in enumerate(masters):
            n = m.machine.name
            cm_kc = kubeconfig(cfg.name, LOCAL_API, pki.ca.cert, pki.controller_manager, "system:kube-controller-manager")
            self.controller_manager[n] = m.step("kube-controller-manager", "scripts/install-service.sh.j2", StepSpec(
                units=["kube-controller-manager"],
                binaries=[Binary("bin/kube-controller-manager", "/usr/local/bin/kube-controller-manager")],
                files=[File("/etc/systemd/system/kube-controller-manager.service", render(
                    "systemd/kube-controller-manager.service.j2", cluster_name=cfg.name, service_cidr=net.service_cidr))],
                secret_files=[SecretFile("/etc/kubernetes/pki/ca.key", pki.ca.key),
                              SecretFile("/etc/kubernetes/kube-controller-manager.kubeconfig", cm_kc)],
                # Healthy, then leading (leader_lease: the step waits until a live instance holds
                # it) before the next step, on a rolling upgrade the workers' drains, goes on.
                checks=[Check("curl -sfk https://127.0.0.1:10257/healthz -o /dev/null")],
                context={"leader_lease": "kube-controller-manager"},
            ), parent=self, depends_on=[self.apiserver[n], *one_after(masters[:i], self.controller_manager)])
            sched_kc = kubeconfig(cfg.name, LOCAL_API, pki.ca.cert, pki.scheduler, "system:kube-scheduler")
            self.scheduler[n] = m.step("kube-scheduler", "scripts/install-service.sh.j2", StepSpec(
                units=["kube-scheduler"],
                binaries=[Binary("bin/kube-scheduler", "/usr/local/bin/kube-scheduler")],
                files=[File("/etc/systemd/system/kube-scheduler.service", render("systemd/kube-scheduler.service.j2"))],
                secret_files=[SecretFile("/etc/kubernetes/kube-scheduler.kubeconfig", sched_kc)],
                checks=[Check("curl -sfk https://127.0.0.1:10259/healthz -o /dev/null")],
                context={"leader_lease": "kube-scheduler"},
            ), parent=self, depends_on=[self.apiserver[n], *one_after(masters[:i], self.scheduler)])

        # What a node's kubelet and kube-proxy need: an API server answering on every master
        # (not the controllers: they need nothing from a node to start, nor a node from them).
        self.api_ready: list[pulumi.Resource] = [*self.apiserver.values()]
        self.ready: list[pulumi.Resource] = [
            self.flannel_config, self.apiserver_to_kubelet, *self.members,
            *self.controller_manager.values(), *self.scheduler.values(),
        ]
        self.register_outputs({"etcd_servers": self.etcd_servers, "etcd_members": self.etcd_members})
