"""Changes a running cluster cannot take in one update, refused from the stack's last outputs
(``components/transitions.py``; the engine tier runs the same check through a real preview)."""

from __future__ import annotations

import pytest

from components.config import ConfigError, parse_cluster_config
from components.transitions import Deployed, EtcdMember, check_transition, deployed_from_outputs, transition_warnings

OUTPUTS = {
    "apiserverUrl": "https://10.240.0.11:6443",
    "nodes": [{"name": "master-1", "role": "master"}, {"name": "worker-1", "role": "worker"},
              {"name": "worker-2", "role": "worker"}],
    "kubernetesVersion": "1.36.4",
}


def test_a_stack_without_outputs_takes_any_valid_config(config_for):
    assert deployed_from_outputs(None) is None
    assert deployed_from_outputs({}) is None  # never run, or destroyed
    raw = config_for("libvirt")
    raw["masters"] = {"count": 3}
    check_transition(parse_cluster_config(raw), None)


def test_the_running_cluster_is_read_from_the_outputs():
    assert deployed_from_outputs(OUTPUTS) == Deployed(masters=("master-1",), kubernetes="1.36.4")
    older = {k: v for k, v in OUTPUTS.items() if k != "kubernetesVersion"}  # stacks from before the output
    assert deployed_from_outputs(older) == Deployed(masters=("master-1",), kubernetes=None)


def test_workers_and_patch_versions_change_freely(config_for):
    raw = config_for("libvirt")
    raw["workers"] = {"count": 3}
    raw["versions"] = {"kubernetes": "1.36.3"}  # a patch back, same minor
    check_transition(parse_cluster_config(raw), deployed_from_outputs(OUTPUTS))


RECORDED = {**OUTPUTS, "etcdMembers": {"master-1": {"initialCluster": "master-1=https://10.240.0.11:2380",
                                                      "initialClusterState": "new"}}}
THREE = Deployed(masters=("master-1", "master-2", "master-3"), kubernetes="1.36.4",
                 etcd_members={n: EtcdMember("...", "new") for n in ("master-1", "master-2", "master-3")})


def masters(config_for, count: int):
    raw = config_for("libvirt")
    raw["masters"] = {"count": count}
    return parse_cluster_config(raw)


def test_a_new_cluster_needs_an_odd_number_of_etcd_members(config_for):
    with pytest.raises(ConfigError, match=r"masters.count: 2 masters means an even number of etcd members.*odd"):
        check_transition(masters(config_for, 2), None)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_masters_join_a_running_cluster_in_one_update(config_for, count):
    """They join one after another as learners: quorum never depends on a member not yet caught up."""
    before = deployed_from_outputs(RECORDED)
    check_transition(masters(config_for, count), before)
    assert bool(transition_warnings(masters(config_for, count), before)) == (count % 2 == 0)


def test_masters_leave_one_per_update_through_an_even_count(config_for):
    check_transition(masters(config_for, 2), THREE)
    assert "tolerate no more failures than 1" in transition_warnings(masters(config_for, 2), THREE)[0]
    with pytest.raises(ConfigError, match=r"3 -> 1 in one update can lose etcd's quorum.*set masters.count to 2 first"):
        check_transition(masters(config_for, 1), THREE)


def test_the_first_master_stays(config_for):
    before = Deployed(masters=("old-1", "master-1"), kubernetes="1.36.4",
                      etcd_members={"old-1": EtcdMember("...", "new"), "master-1": EtcdMember("...", "existing")})
    with pytest.raises(ConfigError, match=r"old-1 is the first master.*so it stays"):
        check_transition(masters(config_for, 1), before)


def test_a_stack_from_before_the_member_record_first_runs_once_unchanged(config_for):
    before = deployed_from_outputs(OUTPUTS)
    check_transition(masters(config_for, 1), before)
    with pytest.raises(ConfigError, match=r"predates the record .* Run `pulumi up` once with masters.count at 1"):
        check_transition(masters(config_for, 3), before)


def test_a_skipped_or_backward_minor_version_is_refused(config_for):
    cfg = parse_cluster_config(config_for("libvirt"))
    with pytest.raises(ConfigError, match=r"versions.kubernetes: the cluster runs 1.34.2 .* skips a minor version.*"
                                          r"set 1.35.x first"):
        check_transition(cfg, Deployed(masters=("master-1",), kubernetes="1.34.2"))
    with pytest.raises(ConfigError, match=r"the cluster runs 1.37.2 .* going back a minor version"):
        check_transition(cfg, Deployed(masters=("master-1",), kubernetes="1.37.2"))
    check_transition(cfg, Deployed(masters=("master-1",), kubernetes="1.35.9"))  # one minor up: the upgrade path


class _Invoke:
    """Stands in for ``pulumi.runtime.invoke``: fails with each of ``errors`` in turn, then
    returns ``outputs`` as the engine's readStackOutputs would."""

    def __init__(self, errors: list[str], outputs: dict) -> None:
        self.errors, self.outputs, self.calls = list(errors), outputs, 0

    def __call__(self, token: str, args: dict):
        self.calls += 1
        assert token == "pulumi:pulumi:readStackOutputs" and args["name"].endswith("/kubelab/dev")
        if self.errors:
            raise Exception(self.errors.pop(0))
        return type("InvokeResult", (), {"value": {"outputs": self.outputs}})()


@pytest.fixture
def engine_stack(monkeypatch):
    import pulumi

    monkeypatch.setattr(pulumi, "get_organization", lambda: "organization")
    monkeypatch.setattr(pulumi, "get_project", lambda: "kubelab")
    monkeypatch.setattr(pulumi, "get_stack", lambda: "dev")

    def install(invoke: _Invoke) -> _Invoke:
        monkeypatch.setattr(pulumi.runtime, "invoke", invoke)
        return invoke

    return install


RACE = ("invoke of pulumi:pulumi:readStackOutputs failed: invocation of pulumi:pulumi:readStackOutputs "
        "returned an error: failed to load checkpoint: EOF")


def test_a_read_that_meets_the_engines_checkpoint_write_is_tried_again(engine_stack):
    from components.transitions import read_deployed

    invoke = engine_stack(_Invoke([RACE, RACE], OUTPUTS))
    assert read_deployed(pause_s=0) == Deployed(masters=("master-1",), kubernetes="1.36.4")
    assert invoke.calls == 3


def test_a_read_that_keeps_failing_or_fails_otherwise_is_raised(engine_stack):
    from components.transitions import READ_ATTEMPTS, read_deployed

    invoke = engine_stack(_Invoke([RACE] * READ_ATTEMPTS, OUTPUTS))
    with pytest.raises(Exception, match="failed to load checkpoint: EOF"):
        read_deployed(pause_s=0)
    assert invoke.calls == READ_ATTEMPTS
    invoke = engine_stack(_Invoke(["snapshot integrity failure; refusing to use it"], OUTPUTS))
    with pytest.raises(Exception, match="snapshot integrity failure"):
        read_deployed(pause_s=0)
    assert invoke.calls == 1
