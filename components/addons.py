"""Cluster addons applied with the admin kubeconfig on the first master: CoreDNS, Dashboard."""

from __future__ import annotations

from collections.abc import Sequence

import pulumi

from components.config import ClusterConfig
from components.host import HostAccess, StepSpec
from components.render import render


class Addons(pulumi.ComponentResource):
    """Applies the enabled addons once the control plane is ready.

    ``deployments`` lists (namespace, name) pairs the final readiness step waits to roll out.
    """

    def __init__(self, name: str, cfg: ClusterConfig, first_master: HostAccess,
                 control_plane_ready: Sequence[pulumi.Resource], opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:addons:Addons", name, None, opts)
        self.steps: list[pulumi.Resource] = []
        self.deployments: list[dict[str, str]] = []
        net = cfg.network
        if cfg.addons["coredns"]:
            manifest = render(
                "addons/coredns.yaml.j2", version=cfg.versions["coredns"], cluster_dns=net.cluster_dns,
                cluster_domain=net.cluster_domain, replicas=min(2, len(cfg.workload_nodes)),
                image=f"registry.k8s.io/coredns/coredns:v{cfg.versions['coredns']}")
            self.steps.append(first_master.step("addon-coredns", "scripts/kubectl-apply.sh.j2",
                                                StepSpec(context={"manifest": manifest}),
                                                parent=self, depends_on=control_plane_ready))
            self.deployments.append({"namespace": "kube-system", "name": "coredns"})
        if cfg.addons["dashboard"]:
            manifest = render("addons/dashboard.yaml.j2", version=cfg.addon_versions["dashboard"],
                              scraper_version=cfg.addon_versions["dashboard_metrics_scraper"])
            self.steps.append(first_master.step("addon-dashboard", "scripts/kubectl-apply.sh.j2",
                                                StepSpec(context={"manifest": manifest}),
                                                parent=self, depends_on=control_plane_ready))
            self.deployments.append({"namespace": "kubernetes-dashboard", "name": "kubernetes-dashboard"})
        self.register_outputs({"enabled": sorted(k for k, v in cfg.addons.items() if v)})
