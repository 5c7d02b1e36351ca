"""Masters joining and leaving a running cluster: the resource graph under mocks, with the
stack's last outputs as the engine's readStackOutputs answers them (``tests/mockrun.py``).
What the etcd commands do on real members is for the e2e tier (``make e2e-grow``)."""

from __future__ import annotations

import pytest

from tests.conftest import base_config
from tests.mockrun import Graph, run_program

CMD = "command:remote:Command"


def outputs_of(g: Graph) -> dict:
    """What the next update reads back: the outputs the transition check and etcd need."""
    return {k: g.stack_outputs[k] for k in ("nodes", "kubernetesVersion", "etcdMembers")}


def lab(module_cache, masters: int, outputs: dict | None = None) -> Graph:
    raw = base_config(module_cache, "libvirt")
    raw.update(masters={"count": masters}, workers={"count": 1})
    return run_program(raw, outputs=outputs)


@pytest.fixture(scope="module")
def one(module_cache) -> Graph:
    return lab(module_cache, 1)


@pytest.fixture(scope="module")
def grown(module_cache, one) -> Graph:
    """1 -> 2 masters on the running stack ``one``."""
    return lab(module_cache, 2, outputs_of(one))


@pytest.fixture(scope="module")
def three(module_cache) -> Graph:
    return lab(module_cache, 3)


def unit(g: Graph, master: str) -> str:
    return g.one(f"{master}-etcd").inputs["create"]


def test_founding_members_are_recorded_as_they_started(three):
    members = three.stack_outputs["etcdMembers"]
    assert set(members) == {"master-1", "master-2", "master-3"}
    ic = "master-1=https://10.240.0.11:2380,master-2=https://10.240.0.12:2380,master-3=https://10.240.0.13:2380"
    assert all(m == {"initialCluster": ic, "initialClusterState": "new"} for m in members.values())
    for n in members:
        assert f"--initial-cluster={ic}" in unit(three, n) and "--initial-cluster-state=new" in unit(three, n)
        assert "member add" not in unit(three, n)  # founding members start together


def test_a_master_added_later_joins_as_a_learner_after_the_running_members(grown, one):
    create = unit(grown, "master-2")
    assert "--initial-cluster=master-1=https://10.240.0.11:2380,master-2=https://10.240.0.12:2380" in create
    assert "--initial-cluster-state=existing" in create
    assert 'member add master-2 --learner --peer-urls="$KUBELAB_ETCD_PEER_URL"' in create
    assert "member promote" in create
    assert "KUBELAB_ETCD_ENDPOINTS=https://10.240.0.11:2379" in create  # the running member, not itself
    assert grown.depends_on(grown.one("master-2-etcd"), grown.one("master-1-etcd"))
    assert grown.stack_outputs["etcdMembers"]["master-2"]["initialClusterState"] == "existing"


def test_a_running_member_and_its_api_server_keep_their_steps_when_a_master_joins(grown, one):
    """A running member's unit keeps the flags it started with; API servers use their own etcd
    member and certificate, so no step of master-1 changes (flanneld's etcd endpoints do)."""
    before = {r.name: r.inputs for r in one.find(CMD) if r.name.startswith("master-1-")}
    after = {r.name: r.inputs for r in grown.find(CMD) if r.name.startswith("master-1-")}
    changed = {n for n in before if before[n] != after.get(n)}
    assert changed == {"master-1-flanneld", "master-1-etcd-backup"}, changed
    assert set(after) - set(before) == {"master-1-etcd-member-master-2"}
    assert grown.stack_outputs["etcdMembers"]["master-1"] == one.stack_outputs["etcdMembers"]["master-1"]


def test_two_masters_join_one_after_the_other(module_cache, one):
    g = lab(module_cache, 3, outputs_of(one))
    assert g.depends_on(g.one("master-3-etcd"), g.one("master-2-etcd"))
    assert ("--initial-cluster=master-1=https://10.240.0.11:2380,master-2=https://10.240.0.12:2380,"
            "master-3=https://10.240.0.13:2380") in unit(g, "master-3")
    # every master before it answers its `member add`
    assert "KUBELAB_ETCD_ENDPOINTS=https://10.240.0.11:2379,https://10.240.0.12:2379\n" in unit(g, "master-3")


def test_a_no_op_after_the_join_changes_nothing(module_cache, grown):
    again = lab(module_cache, 2, outputs_of(grown))
    assert {r.name: r.inputs for r in again.find(CMD)} == {r.name: r.inputs for r in grown.find(CMD)}


def test_every_master_after_the_first_is_checked_and_removed_from_etcd_before_its_machine_goes(three):
    for n in ("master-2", "master-3"):
        step = three.one(f"master-1-etcd-member-{n}")
        assert three.depends_on(step, three.one(f"{n}-etcd"))
        assert three.depends_on(step, three.one("master-1-etcd-auth"))
        assert f"-v n={n} '$3 == n && $2 == \"started\" && $6 == \"false\"" in step.inputs["create"]
        assert "etcdctl member remove" in step.inputs["delete"]
        assert "if [ -e /var/lib/kubelab/cluster-destroying ]" in step.inputs["delete"]
        assert three.depends_on(three.one("master-1-cluster-ready"), step)
    assert not three.find(CMD, "master-1-etcd-member-master-1")


def test_a_master_removed_leaves_the_others_steps_alone(module_cache, three):
    shrunk = lab(module_cache, 2, outputs_of(three))
    assert not [r for r in shrunk.find(CMD) if r.name.startswith("master-3-") or r.name.endswith("master-3")]
    for n in ("master-1", "master-2"):
        assert unit(shrunk, n) == unit(three, n)  # the unit it started with
        assert shrunk.one(f"{n}-kube-apiserver").inputs == three.one(f"{n}-kube-apiserver").inputs


def test_api_servers_use_their_own_etcd_member_and_certificate(three):
    for n in ("master-1", "master-2", "master-3"):
        create = three.one(f"{n}-kube-apiserver").inputs["create"]
        assert "--etcd-servers=https://127.0.0.1:2379 " in create
    certs = {r.name for r in three.find("tls:index/locallySignedCert:LocallySignedCert")}
    assert {"kube-apiserver-master-1", "kube-apiserver-master-2", "kube-apiserver-master-3"} <= certs
