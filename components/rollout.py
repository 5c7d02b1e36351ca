"""Changes reach a running cluster's workers one node at a time, each drained first.

On a new cluster every node installs at once (bring-up speed). On a running one (the stack's
last outputs list nodes) a change goes node by node: the control plane first (``ControlPlane``
chains its members layer by layer: etcd one member after the other, then each API server
after the previous one's ``/readyz``), then each worker in config order:

    drain-<w>     (first master)  cordon and drain <w>, PodDisruptionBudgets respected, when
                                  the versions it runs change; else nothing
    <w>'s runtime and kubelet     containerd, kubelet, kube-proxy (WorkerNode)
    uncordon-<w>  (first master)  <w> Ready with the new kubelet, then schedulable again
    drain-<next worker> ...

Both steps are no-ops on create (a new node has nothing to drain); their scripts name the
versions the node runs, so a version change is an update of both, shown in the preview, and
the update runs the drain or the uncordon. The chain is wired only on a running cluster, so a
first bring-up costs nothing. flanneld and the node-local load balancer are not in the chain:
a restart of either changes nothing a running pod depends on (the vxlan device and routes stay).
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi

from components.config import ClusterConfig, NodeSpec
from components.host import HostAccess, StepSpec

DRAIN_TIMEOUT = "600s"
# What a worker's runtime and kubelet are, by versions.toml key: a change of any drains it first.
WORKER_VERSIONS = ("kubernetes", "containerd", "runc", "cni_plugins", "flannel_cni_plugin")
# The kubelab annotation on a Node cordoned for an update: only those are uncordoned after it.
DRAINED = "kubelab.io/drained-for"


def worker_versions(cfg: ClusterConfig) -> str:
    """The versions a worker runs, as its drain and uncordon steps show them."""
    return ", ".join(f"{k.replace('_', '-')} {cfg.versions[k]}" for k in WORKER_VERSIONS)


class Rollout(pulumi.ComponentResource):
    """The drain and uncordon steps around each worker (see the module docstring): ``drain``
    before a worker's steps are declared (they depend on it), ``uncordon`` after them."""

    def __init__(self, name: str, cfg: ClusterConfig, first: HostAccess, control_plane: Sequence[pulumi.Resource],
                 running: bool, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:rollout:Rollout", name, None, opts)
        self._first = first
        self.running = running
        self._ctx = {"versions": worker_versions(cfg), "kubelet_version": f"v{cfg.versions['kubernetes']}",
                     "annotation": DRAINED, "drain_timeout": DRAIN_TIMEOUT}
        # The next drain waits for this: the control plane, then the previous worker's uncordon.
        self._previous: list[pulumi.Resource] = list(control_plane)
        self.order: list[str] = []
        self.steps: list[pulumi.Resource] = []

    def _step(self, kind: str, node: str, depends_on: Sequence[pulumi.Resource]) -> pulumi.Resource:
        template, ctx = f"scripts/rollout-{kind}.sh.j2", {**self._ctx, "target": node}
        step = self._first.step(f"{kind}-{node}", template, StepSpec(
            context={**ctx, "action": "create"}, update=(template, {**ctx, "action": "update"}),
            on_delete=("scripts/rollout-forget.sh.j2", {"target": node}),
        ), parent=self, depends_on=depends_on, timeout="30m")
        self.steps.append(step)
        return step

    def drain(self, node: NodeSpec) -> list[pulumi.Resource]:
        """What the worker's steps wait for: its drain (nothing for a master, whose members
        ``ControlPlane`` chains)."""
        if node.role != "worker":
            return []
        self.order.append(node.name)
        return [self._step("drain", node.name, self._previous if self.running else [])]

    def uncordon(self, node: NodeSpec, steps: Sequence[pulumi.Resource]) -> None:
        """After the worker's ``steps``: Ready at the new version, schedulable again."""
        if node.role != "worker":
            return
        self._previous = [self._step("uncordon", node.name, steps)]

    def done(self) -> list[pulumi.Resource]:
        self.register_outputs({"order": self.order})
        return self.steps
