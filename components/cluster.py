"""The cluster, top to bottom in bootstrap order."""

from __future__ import annotations

import pulumi

from components.addons import Addons
from components.apiserver_lb import ApiServerLoadBalancer
from components.binaries import Bundle, prepare_archives
from components.config import ClusterConfig
from components.control_plane import DESTROYING_MARK, LOCAL_API, ControlPlane
from components.host import HostAccess, StepSpec
from components.network import PodNetwork
from components.pki import ClusterPki, kubeconfig
from components.platforms import platform
from components.registry import Registry
from components.rollout import Rollout
from components.transitions import Deployed
from components.worker import ServiceProxy, WorkerNode

DRAIN_TIMEOUT = "300s"


class Cluster(pulumi.ComponentResource):
    """A Kubernetes cluster from release binaries on the configured platform.

    Outputs: ``apiserver_url``, ``kubeconfig`` (secret, admin), ``nodes`` (name, role,
    address, private address, host key), ``registry_url`` (the private registry, or "").
    """

    def __init__(self, name: str, cfg: ClusterConfig, bundle: Bundle, before: Deployed | None = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:index:Cluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        # 1. Machines: VMs, droplets or existing hosts, behind one contract.
        fleet = platform(cfg.platform)(cfg, self)
        machines = {m.name: m for m in fleet.machines}
        masters = [machines[n.name] for n in cfg.master_nodes]

        # 2. PKI, held in state.
        pki = ClusterPki(
            "pki", cfg,
            public_endpoints=[fleet.api_endpoint],
            node_addresses={m.name: [m.private_address, m.host] for m in fleet.machines},
            opts=child,
        )

        # 3. Every host answers on SSH and has finished booting, and gets its binaries as a few
        #    xz archives (compressed here once per bundle, side by side, before any is needed).
        archives = prepare_archives(cfg, bundle)
        hosts = {m.name: HostAccess(m, bundle, archives[m.name], opts=child) for m in fleet.machines}
        first = hosts[masters[0].name]

        # 4. Control plane: etcd → kube-apiserver → controller-manager, scheduler. ``before``
        #    (what the stack runs now) says which etcd members are running and which one joins.
        control_plane = ControlPlane("control-plane", cfg, hosts, pki, before, opts=child)

        # 5. The private registry on the first master, seeded with every image the cluster
        #    runs. It needs nothing from the control plane, so it is seeded while etcd and the
        #    API server start; only the addons wait for it (measured: after the control plane it
        #    was the longest link of `pulumi up`'s critical path).
        registry = (Registry("registry", cfg, first, pki, opts=child)
                    if cfg.registry.enabled else None)

        # 6. Pod network: flanneld on every node.
        pod_network = PodNetwork("pod-network", cfg, hosts, pki, control_plane, opts=child)

        # 7. Every node reaches the API at https://127.0.0.1:6443: a master its own API server,
        #    any other node a node-local load balancer in front of every master (installed
        #    while the control plane bootstraps).
        lbs = {n.name: ApiServerLoadBalancer(hosts[n.name], pki, masters, opts=child)
               for n in cfg.load_balanced_nodes}

        def api_path(node: str) -> list[pulumi.Resource]:
            """What a node's kubelet and kube-proxy wait for: every API server, and the node's
            load balancer in front of them if it has one."""
            return [*control_plane.api_ready, *([lbs[node].step] if node in lbs else [])]

        # 8. Nodes that run workloads: containerd → kubelet → kube-proxy (once the API server
        #    answers; the controllers and scheduler start beside them). On a running cluster
        #    the workers take a change one at a time after the control plane (whose members
        #    go one after another): each drained before its steps, uncordoned after them.
        rollout = Rollout("rollout", cfg, first, [*control_plane.api_ready, *control_plane.ready],
                          running=before is not None and bool(before.masters), opts=child)
        workers = []
        for n in cfg.workload_nodes:
            workers.append(WorkerNode(n, cfg, hosts[n.name], pki, LOCAL_API, api_path(n.name),
                                      pod_network.flanneld[n.name], registry.url if registry else None,
                                      gate=rollout.drain(n), opts=child))
            rollout.uncordon(n, workers[-1].steps)

        # 8b. Masters that run no pods still run kube-proxy: the API server and the host reach
        #    Services (webhooks, aggregated APIs) like every other node.
        proxies = [
            ServiceProxy(cfg, hosts[n.name], pki, LOCAL_API,
                         [*api_path(n.name), pod_network.flanneld[n.name]], opts=child)
            for n in cfg.master_nodes if not n.runs_workloads
        ]

        # 9. Addons: CoreDNS, metrics-server (and the Dashboard when enabled), applied once the
        #    API server answers (the scheduler places their pods when it is up). Their images
        #    come from the registry when there is one.
        addons = Addons("addons", cfg, first, pki, [*control_plane.api_ready, *([registry.step] if registry else [])],
                        opts=child)

        # 10. A node removed from the stack is drained and its Node object deleted, from the
        #    first master, before its machine goes (deleted before the node's own steps).
        removals = [
            first.step(f"remove-node-{w.node}", "scripts/node-removal.sh.j2", StepSpec(
                context={"target": w.node},
                on_delete=("scripts/remove-node.sh.j2", {"target": w.node, "marker": DESTROYING_MARK,
                                                         "drain_timeout": DRAIN_TIMEOUT}),
            ), parent=self, depends_on=[*w.steps, *control_plane.ready])
            for w in workers if w.node != masters[0].name
        ]

        # 11. Done only when every node is Ready and the addons have rolled out. On destroy of
        #    the whole cluster it goes first and marks it, so the removals above skip draining.
        self.ready = first.step("cluster-ready", "scripts/wait-cluster-ready.sh.j2", StepSpec(
            context={"expected_nodes": [n.name for n in cfg.workload_nodes], "tries": 180,
                     "deployments": addons.deployments, "apiservices": addons.apiservices,
                     "rollout_timeout": "1200s", "marker": DESTROYING_MARK},
            on_delete=("scripts/cluster-destroying.sh.j2", {"marker": DESTROYING_MARK}),
        ), parent=self, depends_on=[*[s for w in workers for s in w.steps], *pod_network.flanneld.values(),
                                    *addons.steps, *removals, *rollout.done(), *[p.kube_proxy for p in proxies]], timeout="45m")

        self.apiserver_url = pulumi.Output.concat("https://", fleet.api_endpoint, ":6443")
        self.kubeconfig = kubeconfig(cfg.name, self.apiserver_url, pki.ca.cert, pki.admin, "admin")
        # hostKey: the node's SSH host key (public), to pin when you ssh to it yourself.
        self.nodes = pulumi.Output.all(*[
            pulumi.Output.all(m.host, m.private_address, m.host_key).apply(
                lambda v, m=m: {"name": m.name, "role": m.role, "address": v[0], "privateAddress": v[1],
                                "hostKey": v[2]})
            for m in fleet.machines
        ])
        # registryUrl: where nodes pull from (the first master's private address), or "" when off.
        self.registry_url = registry.url if registry else pulumi.Output.from_input("")
        # etcdMembers: how each member first started; the next update keeps a running member's unit.
        self.etcd_members = control_plane.etcd_members
        self.register_outputs({"apiserver_url": self.apiserver_url, "kubeconfig": self.kubeconfig, "nodes": self.nodes,
                               "registry_url": self.registry_url, "etcd_members": self.etcd_members})
