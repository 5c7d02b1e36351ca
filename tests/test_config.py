"""The validation catalogue: every refused input names the setting and the fix."""

from __future__ import annotations

import pytest

from components.config import ConfigError, parse_cluster_config


def refused(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_cluster_config(raw)
    return str(exc.value)


def test_valid_lab_config_parses_with_defaults(config_for):
    cfg = parse_cluster_config(config_for("libvirt"))
    assert [n.name for n in cfg.nodes] == ["master-1", "worker-1", "worker-2"]
    assert [n.address for n in cfg.nodes] == ["10.240.0.11", "10.240.0.21", "10.240.0.22"]
    assert cfg.network.kubernetes_service_ip == "10.32.0.1"
    assert cfg.network.cluster_dns == "10.32.0.10"
    assert cfg.network.flannel_backend == "vxlan"
    assert cfg.versions["kubernetes"] == "1.36.4"
    assert cfg.addons == {"coredns": True, "metrics_server": True, "dashboard": False}
    assert [n.name for n in cfg.workload_nodes] == ["worker-1", "worker-2"]
    assert (cfg.pod_security.enforce, cfg.pod_security.warn) == ("baseline", "restricted")
    assert cfg.kubelet.max_pods == 110
    assert cfg.apiserver.node_port_range == (30000, 32767)
    assert (cfg.etcd.heartbeat_interval_ms, cfg.etcd.election_timeout_ms) == (100, 1000)  # etcd's own
    assert (cfg.backup.enabled, cfg.backup.interval, cfg.backup.keep) == (True, "6h", 7)


def test_seed_000_master_is_also_a_node(config_for):
    raw = config_for()
    raw.update(masters={"count": 3}, workers={"count": 0}, masters_run_workloads=True)
    cfg = parse_cluster_config(raw)
    assert [n.name for n in cfg.workload_nodes] == ["master-1", "master-2", "master-3"]


def test_versions_accept_leading_v(config_for):
    raw = config_for()
    raw["versions"] = {"kubernetes": "v1.35.2"}
    assert parse_cluster_config(raw).versions["kubernetes"] == "1.35.2"


CASES = [
    # (id, mutation, expected fragments)
    ("pod-overlaps-service", lambda r: r.setdefault("network", {}).update(pod_cidr="10.32.0.0/16"),
     ["network.service_cidr", "overlaps network.pod_cidr"]),
    ("pod-overlaps-node", lambda r: r.setdefault("network", {}).update(pod_cidr="10.240.0.0/16"),
     ["network.pod_cidr", "overlaps network.node_cidr"]),
    ("service-overlaps-node", lambda r: r.setdefault("network", {}).update(service_cidr="10.240.0.0/24"),
     ["network.service_cidr", "overlaps network.node_cidr"]),
    ("pod-overlaps-access-network", lambda r: r.setdefault("network", {}).update(access_cidrs=["10.200.5.0/24"]),
     ["network.pod_cidr", "lock you out of SSH", "access_cidrs[0]"]),
    ("pod-contains-static-host", lambda r: r["network"].update(pod_cidr="192.168.0.0/16", node_cidr="10.240.0.0/24"),
     ["network.pod_cidr", "svr001", "lock you out of SSH"]),
    ("service-too-small", lambda r: r.setdefault("network", {}).update(service_cidr="10.32.0.0/28", cluster_dns="10.32.0.10"),
     ["network.service_cidr", "/24 or larger"]),
    ("dns-outside-service", lambda r: r.setdefault("network", {}).update(cluster_dns="10.96.0.10"),
     ["network.cluster_dns", "inside network.service_cidr"]),
    ("dns-is-kubernetes-ip", lambda r: r.setdefault("network", {}).update(cluster_dns="10.32.0.1"),
     ["network.cluster_dns", "other than the first"]),
    ("invalid-cidr", lambda r: r.setdefault("network", {}).update(pod_cidr="10.200.0.0/33"),
     ["network.pod_cidr", "not a valid CIDR"]),
    ("zero-masters", lambda r: r.update(masters={"count": 0}),
     ["masters.count", "at least one master"]),
    ("unknown-platform", lambda r: r.update(platform="vsphere"),
     ["platform", "unknown platform 'vsphere'", "libvirt, digitalocean, static"]),
    ("unknown-flannel-backend", lambda r: r.setdefault("network", {}).update(flannel_backend="udp-magic"),
     ["network.flannel_backend", "vxlan"]),
    ("malformed-version", lambda r: r.update(versions={"kubernetes": "1.36"}),
     ["versions.kubernetes", "MAJOR.MINOR.PATCH"]),
    ("unsupported-version", lambda r: r.update(versions={"kubernetes": "1.20.15"}),
     ["versions.kubernetes", "not supported", "1.33 to 1.37"]),
    ("unsupported-containerd", lambda r: r.update(versions={"containerd": "1.7.20"}),
     ["versions.containerd", "not supported"]),
    ("unknown-version-key", lambda r: r.update(versions={"docker": "20.10.0"}),
     ["versions.docker", "unknown setting"]),
    ("missing-ssh-key", lambda r: r.update(ssh={"private_key_file": "/nonexistent/id_ed25519"}),
     ["ssh.private_key_file", "does not exist", "ssh-keygen"]),
    ("master-memory", lambda r: r["masters"].update(memory_mib=1024),
     ["masters.memory_mib", "at least 2048"]),
    ("duplicate-names", lambda r: r.update(masters={"nodes": [{"name": "n1"}]}, workers={"nodes": [{"name": "n1"}, {"name": "n2"}]}),
     ["node name 'n1' is used 2 times"]),
    ("duplicate-addresses", lambda r: r.update(workers={"nodes": [{"name": "a", "address": "10.240.0.30"}, {"name": "b", "address": "10.240.0.30"}]}),
     ["address 10.240.0.30 is already used by node a"]),
    ("address-outside-node-cidr", lambda r: r.update(workers={"nodes": [{"name": "a", "address": "10.9.9.9"}]}),
     ["node a", "outside network.node_cidr 10.240.0.0/24"]),
    ("unknown-addon", lambda r: r.update(addons={"istio": True}),
     ["addons.istio", "unknown addon", "coredns, metrics_server, dashboard"]),
    ("count-vs-nodes", lambda r: r.update(workers={"count": 3, "nodes": [{"name": "a"}]}),
     ["workers.count", "disagrees"]),
    ("no-workload-nodes", lambda r: r.update(workers={"count": 0}),
     ["no node runs workloads", "masters_run_workloads"]),
    ("unknown-top-level", lambda r: r.update(flanel={}),
     ["cluster.flanel", "unknown setting"]),
    ("bad-binary-source", lambda r: r.update(binaries={"source": "ftp"}),
     ["binaries.source", "download", "directory"]),
    ("bad-registry-mirror", lambda r: r.update(registry_mirrors={"docker.io": ["10.240.0.11:5000"]}),
     ["registry_mirrors.docker.io", "http://"]),
    ("bad-etcd-prefix", lambda r: r.setdefault("network", {}).update(etcd_prefix="kube/network/"),
     ["network.etcd_prefix", "/kube/network"]),
    ("libvirt-missing-image", lambda r: r["libvirt"].update(image="/nonexistent/image.qcow2"),
     ["libvirt.image", "does not exist", "make image"]),
    ("libvirt-bad-domain-type", lambda r: r["libvirt"].update(domain_type="xen"),
     ["libvirt.domain_type", "kvm", "qemu"]),
    ("tcg-with-host-passthrough", lambda r: r["libvirt"].update(cpu_mode="host-passthrough"),
     ["libvirt.cpu_mode", "host-passthrough needs domain_type kvm"]),
    ("section-for-other-platform", lambda r: r.update(digitalocean={"region": "fra1"}),
     ["digitalocean: only used with platform digitalocean"]),
    ("bad-node-name", lambda r: r.update(workers={"nodes": [{"name": "Worker_1"}]}),
     ["node name 'Worker_1'", "DNS label"]),
    ("bad-pod-security-level", lambda r: r.update(pod_security={"enforce": "strict"}),
     ["pod_security.enforce: 'strict' is not a Pod Security level", "privileged, baseline, restricted"]),
    ("bad-pod-security-exemption", lambda r: r.update(pod_security={"exempt_namespaces": ["Kube_System"]}),
     ["pod_security.exempt_namespaces: 'Kube_System'", "DNS label"]),
    ("max-pods-beyond-flannel-subnet", lambda r: r.update(kubelet={"max_pods": 500}),
     ["kubelet.max_pods: 500", "/24", "10 to 250"]),
    ("node-port-range-malformed", lambda r: r.update(apiserver={"service_node_port_range": "30000:32767"}),
     ["apiserver.service_node_port_range: '30000:32767'", "LOW-HIGH"]),
    ("node-port-range-over-host-ports", lambda r: r.update(apiserver={"service_node_port_range": "6000-11000"}),
     ["apiserver.service_node_port_range: 6000-11000", "6443 (kube-apiserver)", "10250 (kubelet)"]),
    ("etcd-election-too-short-for-heartbeat", lambda r: r.update(etcd={"heartbeat_interval_ms": 500, "election_timeout_ms": 1000}),
     ["etcd.election_timeout_ms: 1000", "at least 5 x etcd.heartbeat_interval_ms (2500)"]),
    ("etcd-heartbeat-out-of-range", lambda r: r.update(etcd={"heartbeat_interval_ms": 0}),
     ["etcd.heartbeat_interval_ms: 0", "10 to 5000"]),
    ("backup-interval-not-a-span", lambda r: r.update(backup={"interval": "6 hours"}),
     ["backup.interval: '6 hours'", "30min, 6h, 1d"]),
    ("backup-keep-zero", lambda r: r.update(backup={"keep": 0}), ["backup.keep: 0", "1 to 100"]),
    ("unknown-kubelet-setting", lambda r: r.update(kubelet={"maxPods": 20}),
     ["kubelet.maxPods", "unknown setting"]),
]


@pytest.mark.parametrize(("mutate", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(config_for, mutate, fragments):
    platform = "static" if "static-host" in str(fragments) or "svr001" in fragments else "libvirt"
    raw = config_for(platform)
    mutate(raw)
    message = refused(raw)
    assert "nothing was created" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_all_problems_reported_together(config_for):
    raw = config_for()
    raw.update(masters={"count": 0}, addons={"istio": True}, platform="libvirt")
    raw.setdefault("network", {}).update(cluster_dns="1.2.3.4")
    message = refused(raw)
    assert message.count("\n  - ") == 3


DO_CASES = [
    ("do-unknown-region", lambda r: r["digitalocean"].update(region="mars1"), ["digitalocean.region", "mars1"]),
    ("do-bad-image", lambda r: r["digitalocean"].update(image="windows-2019"), ["digitalocean.image", "debian-13-x64"]),
    ("do-bad-size", lambda r: r["workers"].update(size="huge"), ["workers.size", "not a DigitalOcean size slug"]),
    ("do-small-master", lambda r: r["masters"].update(size="s-1vcpu-1gb"), ["masters.size", "at least 2 GB"]),
    ("do-empty-allowed", lambda r: r["digitalocean"].update(allowed_cidrs=[]), ["digitalocean.allowed_cidrs", "lock you out"]),
]


@pytest.mark.parametrize(("mutate", "fragments"), [c[1:] for c in DO_CASES], ids=[c[0] for c in DO_CASES])
def test_refused_digitalocean(config_for, mutate, fragments):
    raw = config_for("digitalocean")
    mutate(raw)
    message = refused(raw)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_static_hosts_need_roles_and_addresses(config_for):
    raw = config_for("static")
    raw["static"]["hosts"][1].pop("address")
    raw["static"]["hosts"][2]["role"] = "minion"
    message = refused(raw)
    assert "static.hosts[1]: name and address are required" in message
    assert "static.hosts[2].role: 'minion' must be master or worker" in message


def test_committed_dev_stack_is_valid(cache):
    import yaml

    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "Pulumi.dev.yaml").read_text())["config"]["kubelab:cluster"]
    cfg = parse_cluster_config(raw, "dev")
    assert cfg.platform == "libvirt" and cfg.libvirt is not None
    assert (len(cfg.master_nodes), len(cfg.workload_nodes)) == (1, 2)
    assert cfg.ssh.private_key_file == str(cache / "ssh/id_ed25519")
    assert cfg.libvirt.image == str(cache / "images/debian-trixie.qcow2")
    assert cfg.network.etcd_prefix == "/kube/network"  # seed 001's custom prefix


def test_upstream_dns_must_be_real_resolvers(config_for):
    raw = config_for()
    raw["network"] = {"upstream_dns": ["127.0.0.53", "dns.example"]}
    message = refused(raw)
    assert "network.upstream_dns[0]: 127.0.0.53 is a loopback address" in message
    assert "network.upstream_dns[1]: 'dns.example' is not an IP address" in message
