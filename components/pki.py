"""The cluster PKI, held in Pulumi state with pulumi-tls.

Keys and certificates are resources: created once, kept in state (private keys encrypted as
secrets), never regenerated on a no-op run. A certificate inside its early-renewal window is
re-issued by ``pulumi up`` and the steps that install it re-run.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_tls as tls

from components.config import ClusterConfig

CA_HOURS = 10 * 365 * 24
LEAF_HOURS = 365 * 24
EARLY_RENEWAL_HOURS = 30 * 24

SERVER = ["digital_signature", "key_encipherment", "server_auth"]
CLIENT = ["digital_signature", "key_encipherment", "client_auth"]
PEER = ["digital_signature", "key_encipherment", "server_auth", "client_auth"]


# etcd user of the snapshot timer (etcd lets only the root role take snapshots).
BACKUP_ETCD_USER = "kubelab-etcd-backup"


@dataclass
class KeyPair:
    """A certificate (public) and its private key (secret), both PEM."""

    cert: pulumi.Output[str]
    key: pulumi.Output[str]


class ClusterPki(pulumi.ComponentResource):
    """Every CA, certificate and key the cluster needs.

    Attributes are :class:`KeyPair` objects; per-node ones are dicts keyed by node name.
    """

    def __init__(
        self,
        name: str,
        cfg: ClusterConfig,
        public_endpoints: Sequence[pulumi.Input[str]],
        node_addresses: dict[str, Sequence[pulumi.Input[str]]],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("kubelab:pki:ClusterPki", name, None, opts)
        self._child = pulumi.ResourceOptions(parent=self)

        # Certificate authorities.
        self.ca = self._ca("kubernetes-ca", "kubernetes-ca")
        self.etcd_ca = self._ca("etcd-ca", "etcd-ca")
        self.front_proxy_ca = self._ca("front-proxy-ca", "front-proxy-ca")

        # etcd: one server and one peer certificate per member; clients.
        self.etcd_server: dict[str, KeyPair] = {}
        self.etcd_peer: dict[str, KeyPair] = {}
        for node in cfg.master_nodes:
            addrs = list(node_addresses[node.name])
            self.etcd_server[node.name] = self._leaf(
                f"etcd-server-{node.name}", self.etcd_ca, node.name, None, SERVER,
                dns=[node.name, "localhost"], ips=[*addrs, "127.0.0.1"])
            self.etcd_peer[node.name] = self._leaf(
                f"etcd-peer-{node.name}", self.etcd_ca, node.name, None, PEER,
                dns=[node.name], ips=addrs)
        self.etcd_healthcheck = self._leaf("etcd-healthcheck-client", self.etcd_ca, "kube-etcd-healthcheck-client", None, CLIENT)
        self.apiserver_etcd_client = self._leaf("apiserver-etcd-client", self.etcd_ca, "kube-apiserver-etcd-client", None, CLIENT)
        self.flannel_etcd_client = self._leaf("flannel-etcd-client", self.etcd_ca, "flannel", None, CLIENT)
        # kubelab's own etcd admin (etcd user "root"): enables auth, writes flannel's config.
        self.etcd_root_client = self._leaf("etcd-root-client", self.etcd_ca, "root", None, CLIENT)
        # The snapshot timer on every master: etcd lets only the root role take snapshots.
        self.etcd_backup_client = (self._leaf("etcd-backup-client", self.etcd_ca, BACKUP_ETCD_USER, None, CLIENT)
                                   if cfg.backup.enabled else None)

        # Control plane.
        domain = cfg.network.cluster_domain
        # One serving certificate per API server, for its own addresses and the cluster's
        # endpoints: a master added or removed changes no other master's certificate.
        self.apiserver: dict[str, KeyPair] = {}
        for node in cfg.master_nodes:
            self.apiserver[node.name] = self._leaf(
                f"kube-apiserver-{node.name}", self.ca, "kube-apiserver", None, SERVER,
                dns=["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                     f"kubernetes.default.svc.{domain}", "localhost", node.name],
                ips=[cfg.network.kubernetes_service_ip, "127.0.0.1", *node_addresses[node.name], *public_endpoints])
        self.apiserver_kubelet_client = self._leaf(
            "apiserver-kubelet-client", self.ca, "kube-apiserver", None, CLIENT)
        self.controller_manager = self._leaf(
            "kube-controller-manager", self.ca, "system:kube-controller-manager", None, CLIENT)
        self.scheduler = self._leaf("kube-scheduler", self.ca, "system:kube-scheduler", None, CLIENT)
        self.admin = self._leaf("admin", self.ca, "admin", "system:masters", CLIENT)
        self.kube_proxy = self._leaf("kube-proxy", self.ca, "system:kube-proxy", "system:node-proxier", CLIENT)
        # The node-local API load balancers' health checks (GET /readyz: any authenticated user
        # may, through system:public-info-viewer); only nodes that run no API server have one.
        self.apiserver_lb_healthcheck = (
            self._leaf("apiserver-lb-healthcheck", self.ca, "kubelab:apiserver-lb-healthcheck", None, CLIENT)
            if cfg.load_balanced_nodes else None)
        self.front_proxy_client = self._leaf("front-proxy-client", self.front_proxy_ca, "front-proxy-client", None, CLIENT)
        # metrics-server's serving certificate: the APIService trusts the cluster CA (no
        # insecureSkipTLSVerify), the API server dials it by its Service name.
        svc = "metrics-server.kube-system.svc"
        self.metrics_server = self._leaf("metrics-server-serving", self.ca, svc, None, SERVER,
                                         dns=[svc, f"{svc}.{cfg.network.cluster_domain}"])

        # The private registry on the first master: every node's containerd trusts the cluster CA.
        self.registry = (self._leaf("registry-serving", self.ca, "kubelab-registry", None, SERVER,
                                    dns=["kubelab-registry", cfg.master_nodes[0].name],
                                    ips=list(node_addresses[cfg.master_nodes[0].name]))
                         if cfg.registry.enabled and not cfg.registry.insecure else None)

        # Per node: a client certificate for the Node authorizer and a serving certificate.
        self.kubelet_client: dict[str, KeyPair] = {}
        self.kubelet_serving: dict[str, KeyPair] = {}
        for node in cfg.workload_nodes:
            addrs = list(node_addresses[node.name])
            self.kubelet_client[node.name] = self._leaf(
                f"kubelet-client-{node.name}", self.ca, f"system:node:{node.name}", "system:nodes", CLIENT)
            self.kubelet_serving[node.name] = self._leaf(
                f"kubelet-serving-{node.name}", self.ca, f"system:node:{node.name}", "system:nodes", SERVER,
                dns=[node.name], ips=addrs)

        # Service-account signing key pair (public half for the apiserver).
        sa = self._key("service-account")
        self.service_account_key = pulumi.Output.secret(sa.private_key_pem)
        self.service_account_pub = sa.public_key_pem

        # Encryption at rest for Secrets: a 32-byte key derived from a state-held random
        # private key, so it is stable across runs and never appears in plain text.
        seed = self._key("secrets-encryption-seed")
        self.encryption_key = pulumi.Output.secret(seed.private_key_pem.apply(
            lambda pem: base64.b64encode(hashlib.sha256(b"kubelab-secretbox-v1\0" + pem.encode()).digest()).decode()))

        self.register_outputs({
            "ca_cert": self.ca.cert,
            "etcd_ca_cert": self.etcd_ca.cert,
            "front_proxy_ca_cert": self.front_proxy_ca.cert,
        })

    def _key(self, name: str) -> tls.PrivateKey:
        return tls.PrivateKey(name, algorithm="ECDSA", ecdsa_curve="P256", opts=self._child)

    def _ca(self, name: str, cn: str) -> KeyPair:
        key = self._key(f"{name}-key")
        cert = tls.SelfSignedCert(
            name,
            private_key_pem=key.private_key_pem,
            is_ca_certificate=True,
            subject=tls.SelfSignedCertSubjectArgs(common_name=cn, organization="kubelab"),
            allowed_uses=["cert_signing", "crl_signing", "digital_signature", "key_encipherment"],
            validity_period_hours=CA_HOURS,
            early_renewal_hours=EARLY_RENEWAL_HOURS,
            opts=self._child,
        )
        return KeyPair(cert.cert_pem, pulumi.Output.secret(key.private_key_pem))

    def _leaf(
        self,
        name: str,
        ca: KeyPair,
        cn: str,
        org: str | None,
        uses: list[str],
        dns: Sequence[pulumi.Input[str]] = (),
        ips: Sequence[pulumi.Input[str]] = (),
    ) -> KeyPair:
        key = self._key(f"{name}-key")
        csr = tls.CertRequest(
            f"{name}-csr",
            private_key_pem=key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=cn, organization=org),
            dns_names=list(dns),
            ip_addresses=pulumi.Output.all(*ips).apply(lambda xs: sorted(set(xs))),
            opts=self._child,
        )
        cert = tls.LocallySignedCert(
            name,
            cert_request_pem=csr.cert_request_pem,
            ca_cert_pem=ca.cert,
            ca_private_key_pem=ca.key,
            allowed_uses=uses,
            validity_period_hours=LEAF_HOURS,
            early_renewal_hours=EARLY_RENEWAL_HOURS,
            opts=self._child,
        )
        return KeyPair(cert.cert_pem, pulumi.Output.secret(key.private_key_pem))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubeconfig(cluster: str, server: pulumi.Input[str], ca: pulumi.Input[str], pair: KeyPair, user: str) -> pulumi.Output[str]:
    """A kubeconfig with embedded client credentials (a secret)."""
    from components.render import render

    return pulumi.Output.secret(pulumi.Output.all(server, ca, pair.cert, pair.key).apply(
        lambda v: render("config/kubeconfig.yaml.j2", cluster=cluster, server=v[0], ca_data=b64(v[1]),
                         cert_data=b64(v[2]), key_data=b64(v[3]), user=user)))
