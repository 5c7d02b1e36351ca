"""Cluster addons applied with the admin kubeconfig on the first master: CoreDNS,
metrics-server, Dashboard."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import pulumi

from components.config import ClusterConfig
from components.host import File, HostAccess, SecretFile, StepSpec
from components.pki import ClusterPki
from components.render import render


def dashboard_images_missing(cfg: ClusterConfig) -> list[str]:
    """The Dashboard's images that neither the private registry (registry.preload) nor a
    registry_mirrors entry provides: the offline bundle has none of them."""
    preloaded = {p.image for p in cfg.registry.preload} if cfg.registry.enabled else set()
    mirrored = set(cfg.registry_mirrors)
    return [i for i in cfg.dashboard.images if i not in preloaded and i.split("/", 1)[0] not in mirrored]


class Addons(pulumi.ComponentResource):
    """Applies the enabled addons once the API server answers (``api_ready``).

    ``deployments`` lists (namespace, name) pairs the final readiness step waits to roll out;
    ``apiservices`` the aggregated APIs it waits to become Available.
    """

    def __init__(self, name: str, cfg: ClusterConfig, first_master: HostAccess, pki: ClusterPki,
                 api_ready: Sequence[pulumi.Resource], opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:addons:Addons", name, None, opts)
        self.steps: list[pulumi.Resource] = []
        self.deployments: list[dict[str, str]] = []
        self.apiservices: list[str] = []
        net = cfg.network
        if cfg.addons["coredns"]:
            manifest = render(
                "addons/coredns.yaml.j2", version=cfg.versions["coredns"], cluster_dns=net.cluster_dns,
                cluster_domain=net.cluster_domain, replicas=min(2, len(cfg.workload_nodes)),
                image=f"registry.k8s.io/coredns/coredns:v{cfg.versions['coredns']}")
            self.steps.append(first_master.step("addon-coredns", "scripts/kubectl-apply.sh.j2",
                                                StepSpec(context={"manifest": manifest}),
                                                parent=self, depends_on=api_ready))
            self.deployments.append({"namespace": "kube-system", "name": "coredns"})
        if cfg.addons["metrics_server"]:
            manifest = pki.ca.cert.apply(lambda ca: render(
                "addons/metrics-server.yaml.j2", version=cfg.versions["metrics_server"],
                image=f"registry.k8s.io/metrics-server/metrics-server:v{cfg.versions['metrics_server']}",
                ca_bundle=base64.b64encode(ca.encode()).decode()))
            tls_secret = pulumi.Output.all(pki.metrics_server.cert, pki.metrics_server.key).apply(
                lambda v: render("addons/metrics-server-tls.yaml.j2",
                                 crt=base64.b64encode(v[0].encode()).decode(), key=base64.b64encode(v[1].encode()).decode()))
            self.steps.append(first_master.step("addon-metrics-server", "scripts/kubectl-apply.sh.j2", StepSpec(
                dirs=[("/etc/kubernetes/addons", "0700")],
                files=[File("/etc/kubernetes/addons/metrics-server.yaml", manifest)],
                secret_files=[SecretFile("/etc/kubernetes/addons/metrics-server-tls.yaml", pulumi.Output.secret(tls_secret))],
                context={"manifest_files": ["/etc/kubernetes/addons/metrics-server-tls.yaml",
                                            "/etc/kubernetes/addons/metrics-server.yaml"]},
            ), parent=self, depends_on=api_ready))
            self.deployments.append({"namespace": "kube-system", "name": "metrics-server"})
            self.apiservices.append("v1beta1.metrics.k8s.io")
        if cfg.addons["dashboard"]:
            manifest = render("addons/dashboard.yaml.j2", version=cfg.addon_versions["dashboard"],
                              scraper_version=cfg.addon_versions["dashboard_metrics_scraper"], access=cfg.dashboard.access)
            self.steps.append(first_master.step("addon-dashboard", "scripts/kubectl-apply.sh.j2",
                                                StepSpec(context={"manifest": manifest}),
                                                parent=self, depends_on=api_ready))
            missing = dashboard_images_missing(cfg)
            if missing:
                # Applied all the same (a mirror may appear later), but never waited for.
                pulumi.log.warn(
                    f"addons.dashboard: no image archive or mirror provides {', '.join(missing)}; the nodes would "
                    f"have to pull them from docker.io, and cluster-ready does not wait for the Dashboard. Add the "
                    f"archives to registry.preload (docker save -o dashboard.tar IMAGE), or a docker.io entry to "
                    f"registry_mirrors.", self)
            else:
                self.deployments.append({"namespace": "kubernetes-dashboard", "name": "kubernetes-dashboard"})
        self.register_outputs({"enabled": sorted(k for k, v in cfg.addons.items() if v)})
