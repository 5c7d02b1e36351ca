"""Files a team starts from: the pull-request workflow, the example stacks, the README's diff table."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from components.config import parse_cluster_config
from tests.conftest import PUBKEY, REPO
from tests.diff_contract import readme_rows

sys.path.insert(0, str(REPO / "tools"))


def test_workflows_pass_actionlint():
    from toolchain import actionlint_path

    lint = actionlint_path()
    assert lint.exists(), f"{lint} is missing: `make test-deps` builds it (versions.toml [checks])"
    workflows = sorted((REPO / ".github/workflows").glob("*.yml"))
    assert workflows
    proc = subprocess.run([str(lint), "-no-color", *map(str, workflows)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_preview_workflow_comments_the_diff_and_gates_up():
    wf = yaml.safe_load((REPO / ".github/workflows/preview.yml").read_text())
    jobs = wf["jobs"]
    pulumi_steps = {name: next(s for s in job["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@"))
                    for name, job in jobs.items()}
    preview = pulumi_steps["preview"]["with"]
    assert (preview["command"], preview["diff"], preview["comment-on-pr"]) == ("preview", True, True)
    assert jobs["preview"]["permissions"]["pull-requests"] == "write"
    assert pulumi_steps["up"]["with"]["command"] == "up" and jobs["up"]["environment"] == "kubelab-up"
    uses = [s["uses"] for job in jobs.values() for s in job["steps"] if "uses" in s]
    assert all(re.search(r"@v\d+\.\d+\.\d+$", u) for u in uses), f"unpinned actions: {uses}"
    assert wf["env"]["PULUMI_VERSION"] == tomllib.loads((REPO / "versions.toml").read_text())["pulumi"]["cli"]


@pytest.mark.parametrize("stack", ["do-example", "static-example"])
def test_example_stacks_are_valid(stack, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (home / ".ssh/id_ed25519.pub").write_text(PUBKEY + "\n")
    monkeypatch.setenv("HOME", str(home))
    doc = yaml.safe_load((REPO / f"Pulumi.{stack}.yaml").read_text())
    cfg = parse_cluster_config(doc["config"]["kubelab:cluster"], stack)
    assert [n.role for n in cfg.nodes] == ["master", "worker", "worker"]
    readme = (REPO / "README.md").read_text()
    assert f"Pulumi.{stack}.yaml" in readme


def test_readme_diff_table_is_the_e2e_contract():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## What a pull request will show", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| change")]
    assert rows == readme_rows()


@pytest.mark.parametrize("topology", ["1+2", "1+4", "seed000", "seed000-ha"])
def test_diff_contract_expectations_hold_for_the_e2e_nodes(topology, config_for):
    """What the e2e computes before it previews: every case has an exact expectation for the
    nodes the e2e derives from its config (the real previews are the e2e's job)."""
    from tests.diff_contract import CASES, expected_ops
    from tests.test_e2e import _nodes, apply_topology

    raw = apply_topology(config_for(), topology)
    nodes = _nodes(raw)
    assert {"name", "role", "runs_workloads"} <= set(nodes[0])
    kubelet, apiserver, more_workers, memory = (expected_ops(c, raw, nodes, {}) for c in CASES[:4])
    assert kubelet == {f"{n['name']}-kubelet": "update" for n in nodes if n["runs_workloads"]}
    assert apiserver == {f"{n['name']}-kube-apiserver": "update" for n in nodes if n["role"] == "master"}
    new = f"worker-{sum(n['role'] == 'worker' for n in nodes) + 1}"
    assert more_workers == {"master-1-cluster-ready": "update", f"master-1-remove-node-{new}": "create"}
    assert set(memory) == {n["name"] for n in nodes if n["role"] == "master"}


def test_patch_version_case_expects_the_changed_uploads_and_the_steps_that_install_them():
    """Judged against the live stack's dependencies (synthetic here, from the real export in
    the e2e): a step that installs a changed file updates; one that only waits for it does not."""
    from tests.diff_contract import CASES, Live, expected_ops

    ctx = Live(frozenset({"bin/kubelet", "images/pause.tar"}), {
        "worker-1-upload-bin-kubelet": ["worker-1-wait-for-ssh"],
        "worker-1-upload-bin-containerd": ["worker-1-wait-for-ssh"],
        "worker-1-kubelet": ["worker-1-wait-for-ssh", "worker-1-upload-bin-kubelet", "worker-1-containerd"],
        "worker-1-containerd": ["worker-1-upload-bin-containerd"],
        "master-1-upload-images-pause.tar": ["master-1-wait-for-ssh"],
        "master-1-registry": ["master-1-upload-images-pause.tar"],
        "master-1-cluster-ready": ["worker-1-kubelet", "master-1-registry"],
    })
    assert expected_ops(CASES[4], {}, [], {}, ctx) == {
        "master-1-registry": "update", "master-1-upload-images-pause.tar": "update",
        "worker-1-kubelet": "update", "worker-1-upload-bin-kubelet": "update"}


def test_critical_path_follows_the_dependency_that_finished_last():
    """The e2e's critical path: from cluster-ready back through whatever each step waited for
    longest, components standing for their children (synthetic state, real export layout)."""
    from tests.test_e2e import critical_path

    def res(name: str, typ: str = "command:remote:Command", deps: tuple[str, ...] = (), parent: str = "") -> dict:
        return {"urn": f"urn:pulumi:e2e::kubelab::{typ}::{name}", "type": typ, "dependencies": list(deps), "parent": parent}

    comp = res("worker-1", "kubelab:worker:WorkerNode")
    resources = [
        res("vm", "libvirt:index/domain:Domain"),
        res("ssh", deps=("urn:pulumi:e2e::kubelab::libvirt:index/domain:Domain::vm",)),
        res("etcd", deps=("urn:pulumi:e2e::kubelab::command:remote:Command::ssh",)),
        comp,
        res("kubelet", deps=("urn:pulumi:e2e::kubelab::command:remote:Command::ssh",), parent=comp["urn"]),
        res("ready", deps=(comp["urn"], "urn:pulumi:e2e::kubelab::command:remote:Command::etcd")),
    ]
    times = {"vm": (0, 5, "create", "libvirt:index/domain:Domain"), "ssh": (5, 100, "create", "c"),
             "etcd": (100, 130, "create", "c"), "kubelet": (100, 250, "create", "c"), "ready": (250, 300, "create", "c")}
    chain = critical_path(times, {"deployment": {"resources": resources}}, "ready", 0)
    assert [c["name"] for c in chain] == ["vm", "ssh", "kubelet", "ready"]
    assert chain[2]["duration_s"] == 150


def test_rollout_seconds_from_creation_to_available():
    """The e2e's addon cost: creation to Available=True; a Deployment not yet Available is left out."""
    from tests.test_e2e import rollout_seconds

    deploys = {"items": [
        {"metadata": {"name": "coredns", "creationTimestamp": "2026-11-24T04:10:00Z"},
         "status": {"conditions": [{"type": "Progressing", "status": "True", "lastTransitionTime": "2026-11-24T04:10:01Z"},
                                   {"type": "Available", "status": "True", "lastTransitionTime": "2026-11-24T04:11:30Z"}]}},
        {"metadata": {"name": "metrics-server", "creationTimestamp": "2026-11-24T04:10:00Z"},
         "status": {"conditions": [{"type": "Available", "status": "False", "lastTransitionTime": "2026-11-24T04:10:02Z"}]}},
    ]}
    assert rollout_seconds(deploys) == {"coredns": 90.0}
