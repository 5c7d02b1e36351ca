"""Rolling changes on a running cluster (components/rollout.py, the control plane's chains):
the resource graph under mocks, with the stack's last outputs as the engine's readStackOutputs
answers them. What the drains and uncordons do on real nodes is for ``make e2e-upgrade``."""

from __future__ import annotations

import re
import subprocess

import pytest

from components.versions import bundle_key, load_versions
from tests.conftest import base_config, make_bundle
from tests.mockrun import Graph, run_program
from tests.test_rendered import unwrap

WORKERS = ("worker-1", "worker-2")
MASTERS = ("master-1", "master-2", "master-3")
CONTROL = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def lab(module_cache, outputs: dict | None = None, **versions: str) -> Graph:
    raw = base_config(module_cache, "libvirt")
    raw.update(masters={"count": 3}, workers={"count": 2})
    if versions:
        raw["versions"] = versions
        full = {**load_versions()["node"], **versions}
        make_bundle(module_cache / "bundles" / bundle_key(full), full)
    return run_program(raw, outputs=outputs)


@pytest.fixture(scope="module")
def new(module_cache) -> Graph:
    return lab(module_cache)


@pytest.fixture(scope="module")
def running(module_cache, new) -> Graph:
    """The same config again, on the stack ``new`` left running."""
    return lab(module_cache, {k: new.stack_outputs[k] for k in ("nodes", "kubernetesVersion", "etcdMembers")})


def names(g: Graph, urns: set[str]) -> set[str]:
    return {g.by_urn[u].name for u in urns if u in g.by_urn}


def test_a_new_cluster_starts_every_node_at_once(new):
    for w in WORKERS:
        drain = new.one(f"master-1-drain-{w}")
        # the first master answering SSH, no chain, no control plane
        assert names(new, new.direct_deps(drain)) <= {"master-1", "master-1-ssh-host-key", "master-1-wait-for-ssh"}
        assert new.depends_on(new.one(f"{w}-containerd"), drain)  # a no-op, but first
        assert not new.depends_on(new.one(f"{w}-containerd"), new.one("master-1-kube-apiserver"))
    for step in CONTROL:  # founding members start together (etcd needs quorum to start)
        assert not new.depends_on(new.one(f"master-2-{step}"), new.one(f"master-1-{step}"))
        assert not new.depends_on(new.one(f"master-3-{step}"), new.one(f"master-2-{step}"))


def test_on_a_running_cluster_the_control_plane_goes_first_one_member_at_a_time(running):
    for step in CONTROL:
        assert running.depends_on(running.one(f"master-2-{step}"), running.one(f"master-1-{step}")), step
        assert running.depends_on(running.one(f"master-3-{step}"), running.one(f"master-2-{step}")), step
    drain = running.one("master-1-drain-worker-1")
    for m in MASTERS:
        for step in CONTROL:
            assert running.depends_on(drain, running.one(f"{m}-{step}")), f"{m}-{step}"


def test_on_a_running_cluster_workers_go_one_after_another_between_drain_and_uncordon(running):
    first, second = WORKERS
    for w in WORKERS:
        drain, uncordon = running.one(f"master-1-drain-{w}"), running.one(f"master-1-uncordon-{w}")
        for step in ("containerd", "kubelet", "kube-proxy"):
            assert running.depends_on(running.one(f"{w}-{step}"), drain), step
            assert running.depends_on(uncordon, running.one(f"{w}-{step}")), step
        # flanneld and the load balancer stay outside the chain
        assert not running.depends_on(running.one(f"{w}-flanneld"), drain)
        assert not running.depends_on(running.one(f"{w}-apiserver-lb"), drain)
    assert running.depends_on(running.one(f"master-1-drain-{second}"), running.one(f"master-1-uncordon-{first}"))
    assert running.depends_on(running.one(f"{second}-kubelet"), running.one(f"{first}-kubelet"))
    assert running.depends_on(running.one("master-1-cluster-ready"), running.one(f"master-1-uncordon-{second}"))


def test_a_version_change_is_an_update_that_drains_and_uncordons(module_cache, new):
    before = {w: new.one(f"master-1-drain-{w}").inputs for w in WORKERS}
    newer = lab(module_cache, kubernetes="1.36.3")
    for w in WORKERS:
        drain, uncordon = newer.one(f"master-1-drain-{w}").inputs, newer.one(f"master-1-uncordon-{w}").inputs
        assert drain["create"] != before[w]["create"]  # the preview shows it as an update
        assert "kubernetes 1.36.3" in unwrap(drain["create"]) and "kubectl drain" not in unwrap(drain["create"])
        update = unwrap(drain["update"])
        assert f"kubectl drain {w} --ignore-daemonsets --delete-emptydir-data --force --timeout=600s" in update
        assert "kubectl cordon" in update and "kubelab.io/drained-for=v1.36.3" in update
        assert "'v1.36.3 True'" in unwrap(uncordon["update"]) and "kubectl uncordon" in unwrap(uncordon["update"])
        api_call = re.compile(r"^\s*(if !? *)?kubectl (get|drain|cordon|uncordon|annotate)", re.M)
        assert api_call.search(update)
        for create in (drain["create"], uncordon["create"]):  # a new node: no call to the API server
            assert not api_call.search(unwrap(create))


def test_a_kubelet_flag_change_rolls_without_a_drain(module_cache, new):
    raw = base_config(module_cache, "libvirt")
    raw.update(masters={"count": 3}, workers={"count": 2}, kubelet={"max_pods": 60})
    g = run_program(raw)
    for w in WORKERS:
        assert g.one(f"master-1-drain-{w}").inputs == new.one(f"master-1-drain-{w}").inputs


def test_a_drain_that_cannot_finish_stops_the_update(module_cache, tmp_path):
    """The update script under real bash with a kubectl that refuses to drain: the step fails,
    names the node, and never reaches its 'drained' line."""
    g = lab(module_cache, kubernetes="1.36.3")
    script = unwrap(g.one("master-1-drain-worker-1").inputs["update"])
    fake = tmp_path / "kubectl"
    fake.write_text('#!/bin/bash\ncase " $* " in *" drain "*) echo "Cannot evict pod: PDB" >&2; exit 1 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    script = script.replace("/usr/local/bin/kubectl", str(fake))
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "node worker-1 did not drain within 600s" in proc.stderr and "kubectl get pdb -A" in proc.stderr
    assert "drained" not in proc.stdout.replace("drain it first", "")


def test_a_node_already_at_the_version_is_not_drained(module_cache, tmp_path):
    """The drain's update also runs when the first master is replaced: a node that reports the
    target kubelet is left alone (real bash, a kubectl that answers for the node)."""
    g = lab(module_cache, kubernetes="1.36.3")
    script = unwrap(g.one("master-1-drain-worker-1").inputs["update"])
    fake = tmp_path / "kubectl"
    fake.write_text('#!/bin/bash\ncase " $* " in *" drain "*|*" cordon "*) echo "must not $*" >&2; exit 1 ;;\n'
                    '  *kubeletVersion*) printf v1.36.3 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "-c", script.replace("/usr/local/bin/kubectl", str(fake))],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "node worker-1 already runs kubelet v1.36.3: nothing to drain" in proc.stdout
