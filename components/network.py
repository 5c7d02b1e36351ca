"""The pod network: flanneld on every node, configured through etcd (seed 000 and 001).

Masters run flanneld even when they run no pods: without it the API server cannot reach pod
addresses (webhooks, ``kubectl proxy`` to services, the Dashboard) — seed 001's failure list.
"""

from __future__ import annotations

import pulumi

from components.config import ClusterConfig
from components.control_plane import ControlPlane
from components.host import Binary, Check, File, HostAccess, SecretFile, StepSpec
from components.pki import ClusterPki
from components.render import render


class PodNetwork(pulumi.ComponentResource):
    """One flanneld per node, as soon as its network config is in etcd.

    flanneld talks to etcd only, so it starts while the API server and controllers come up;
    the kubelet (which needs the API server and flannel's subnet) waits for both.
    """

    def __init__(self, name: str, cfg: ClusterConfig, hosts: dict[str, HostAccess], pki: ClusterPki,
                 control_plane: ControlPlane, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:network:PodNetwork", name, None, opts)
        self.flanneld = {}
        for node in cfg.nodes:
            h = hosts[node.name]
            unit = pulumi.Output.all(h.machine.private_address, control_plane.etcd_servers).apply(lambda v, role=node.role: render(
                "systemd/flanneld.service.j2", address=v[0], etcd_servers=v[1], etcd_prefix=cfg.network.etcd_prefix,
                backend=cfg.network.flannel_backend, local_etcd=role == "master"))
            self.flanneld[node.name] = h.step("flanneld", "scripts/install-service.sh.j2", StepSpec(
                units=["flanneld"],
                binaries=[Binary("bin/flanneld", "/usr/local/bin/flanneld")],
                dirs=[("/var/lib/flannel", "0755"), ("/etc/flannel/pki", "0755")],
                files=[File("/etc/systemd/system/flanneld.service", unit),
                       File("/etc/flannel/pki/etcd-ca.crt", pki.etcd_ca.cert),
                       File("/etc/flannel/pki/etcd-client.crt", pki.flannel_etcd_client.cert)],
                secret_files=[SecretFile("/etc/flannel/pki/etcd-client.key", pki.flannel_etcd_client.key)],
                checks=[Check("test -s /run/flannel/subnet.env", tries=90)],
                remove=["/run/flannel"],
                cleanup=["ip link delete flannel.1"],
            ), parent=self, depends_on=[control_plane.flannel_config])
        self.register_outputs({"backend": cfg.network.flannel_backend, "etcd_prefix": cfg.network.etcd_prefix})
