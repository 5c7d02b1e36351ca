"""Changes a running cluster cannot take in one update, refused from the stack's last outputs
(``components/transitions.py``; the engine tier runs the same check through a real preview)."""

from __future__ import annotations

import pytest

from components.config import ConfigError, parse_cluster_config
from components.transitions import Deployed, check_transition, deployed_from_outputs

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


@pytest.mark.parametrize("count", [3, 5])
def test_changing_the_masters_of_a_running_cluster_is_refused_with_the_way_forward(config_for, count):
    raw = config_for("libvirt")
    raw["masters"] = {"count": count}
    with pytest.raises(ConfigError) as err:
        check_transition(parse_cluster_config(raw), deployed_from_outputs(OUTPUTS))
    text = str(err.value)
    assert "nothing was created" in text
    assert f"masters: this stack runs 1 master(s) (master-1) and the config asks for {count}" in text
    assert "Keep masters.count at 1" in text and "`pulumi destroy`, then `pulumi up`" in text


def test_three_masters_to_one_is_refused_for_etcd_quorum(config_for):
    before = Deployed(masters=("master-1", "master-2", "master-3"), kubernetes="1.36.4")
    with pytest.raises(ConfigError, match=r"3 -> 1 can lose etcd's quorum"):
        check_transition(parse_cluster_config(config_for("libvirt")), before)


def test_a_skipped_or_backward_minor_version_is_refused(config_for):
    cfg = parse_cluster_config(config_for("libvirt"))
    with pytest.raises(ConfigError, match=r"versions.kubernetes: the cluster runs 1.34.2 .* skips a minor version.*"
                                          r"set 1.35.x first"):
        check_transition(cfg, Deployed(masters=("master-1",), kubernetes="1.34.2"))
    with pytest.raises(ConfigError, match=r"the cluster runs 1.37.2 .* going back a minor version"):
        check_transition(cfg, Deployed(masters=("master-1",), kubernetes="1.37.2"))
    check_transition(cfg, Deployed(masters=("master-1",), kubernetes="1.35.9"))  # one minor up: the upgrade path
