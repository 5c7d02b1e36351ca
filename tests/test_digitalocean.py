"""DigitalOcean platform under mocks: VPC, firewall rules, tags, sizes, stable user data."""

from __future__ import annotations

import pytest

from tests.conftest import base_config
from tests.mockrun import Graph, run_program

DROPLET = "digitalocean:index/droplet:Droplet"


@pytest.fixture(scope="module")
def do_graph(module_cache) -> Graph:
    raw = base_config(module_cache, "digitalocean")
    raw["digitalocean"]["reserved_ip"] = True
    raw["masters"] = {"count": 3, "size": "s-2vcpu-4gb"}
    return run_program(raw)


def value(v):
    return v["value"] if isinstance(v, dict) and "value" in v else v


def test_vpc_from_node_cidr(do_graph):
    (vpc,) = do_graph.find("digitalocean:index/vpc:Vpc")
    assert vpc.inputs["ipRange"] == "10.240.0.0/24"
    assert vpc.inputs["region"] == "fra1"


def test_droplets_per_role_with_sizes_tags_and_private_network(do_graph):
    droplets = {d.name: d for d in do_graph.find(DROPLET)}
    assert sorted(droplets) == ["master-1", "master-2", "master-3", "worker-1", "worker-2"]
    assert droplets["master-1"].inputs["size"] == "s-2vcpu-4gb"
    assert droplets["worker-1"].inputs["size"] == "s-2vcpu-2gb"
    assert droplets["worker-1"].inputs["image"] == "debian-13-x64"
    vpc_urn = do_graph.find("digitalocean:index/vpc:Vpc")[0].urn
    for d in droplets.values():
        assert vpc_urn in d.property_dependencies["vpcUuid"]
        assert len(d.inputs["tags"]) == 2  # cluster tag + role tag
        assert "BEGIN OPENSSH PRIVATE KEY" in value(d.inputs["userData"])  # the host key handed over...
        assert isinstance(d.inputs["userData"], dict) and "value" in d.inputs["userData"]  # ...as a secret
    tags = {t.inputs["name"] for t in do_graph.find("digitalocean:index/tag:Tag")}
    assert tags == {"kubelab-test", "kubelab-test-master", "kubelab-test-worker"}


def test_firewall_rules(do_graph):
    (fw,) = do_graph.find("digitalocean:index/firewall:Firewall")
    rules = {(r["protocol"], r.get("portRange", ""), tuple(r.get("sourceAddresses", [])), tuple(r.get("sourceTags", [])))
             for r in fw.inputs["inboundRules"]}
    allowed = ("203.0.113.7/32",)
    assert ("tcp", "22", allowed, ()) in rules
    assert ("tcp", "6443", allowed, ()) in rules
    for proto, ports in (("tcp", "6443"), ("tcp", "2379-2380"), ("tcp", "10250"), ("udp", "8472"), ("tcp", "30000-32767")):
        assert (proto, ports, (), ("kubelab-test",)) in rules, (proto, ports)
    opened = {r[1] for r in rules}
    assert not opened & {"10251", "10252", "10255", "10257", "10259"}  # localhost-only or gone
    assert all(r[2] in ((), allowed) for r in rules), "only allowed_cidrs reach the droplets from outside"
    assert {r["protocol"] for r in fw.inputs["outboundRules"]} == {"tcp", "udp", "icmp"}
    assert "5000" not in opened  # no private registry unless asked for on DigitalOcean


def test_private_registry_is_reachable_between_droplets_only(module_cache):
    raw = base_config(module_cache, "digitalocean")
    raw["registry"] = {"enabled": True}
    (fw,) = run_program(raw).find("digitalocean:index/firewall:Firewall")
    registry = [r for r in fw.inputs["inboundRules"] if r.get("portRange") == "5000"]
    assert registry == [{"protocol": "tcp", "portRange": "5000", "sourceTags": ["kubelab-test"]}]


def test_reserved_ip_is_the_api_endpoint(do_graph):
    assert do_graph.find("digitalocean:index/reservedIpAssignment:ReservedIpAssignment")
    assert do_graph.stack_outputs["apiserverUrl"] == "https://198.51.100.5:6443"


def test_project_holds_the_droplets(do_graph):
    (pr,) = do_graph.find("digitalocean:index/projectResources:ProjectResources")
    assert len(pr.inputs["resources"]) == 6  # 5 droplets + the reserved IP


def test_bootstrap_uses_public_address_and_configures_private(do_graph):
    kubelet = do_graph.one("worker-1-kubelet")
    conn = value(kubelet.inputs["connection"])
    assert conn["host"].startswith("203.0.113.") and conn["user"] == "root"
    assert "--node-ip=10.240.0." in kubelet.inputs["create"]


def test_user_data_is_stable_across_runs(module_cache):
    """User data forces droplet replacement: two runs must render it byte for byte alike."""
    raw = base_config(module_cache, "digitalocean")
    first = {d.name: value(d.inputs["userData"]) for d in run_program(raw).find(DROPLET)}
    second = {d.name: value(d.inputs["userData"]) for d in run_program(raw).find(DROPLET)}
    assert first == second
