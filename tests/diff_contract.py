"""The pull-request diff contract: what ``pulumi preview`` plans for each kind of change.

One definition, used twice: the e2e runs every case as a real ``pulumi preview --json`` and
``--diff`` against the live lab stack (then puts the config back), and a fast test checks that
the README's "What a pull request will show" table is exactly ``readme_rows()``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from components.binaries import read_sums
from components.versions import bundle_key, load_versions
from tests.pulumi_support import REAL_CACHE, Project, planned

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Steps a new node must change besides its own resources: the wait for every node to be Ready
# lists all nodes, and the node's drain-on-removal step lives on the first master.
SHARED_ON_NEW_NODE = ("{first}-cluster-ready: update", "{first}-remove-node-{new}: create")


@dataclass(frozen=True)
class Case:
    change: str  # README wording of the change
    shows: str  # README wording of what the preview plans
    mutate: Callable[[dict], None]
    line: str  # a changed line the human --diff shows (the new value)


# A served Kubernetes patch release beside the pinned one (versions.toml [node]): the module
# proxy serves 1.36.1, 1.36.3 and 1.36.4 of this minor. Its bundle is built like any stack's
# that pins another version (`make bundle STACK=...`); the e2e builds it if it is missing.
OTHER_KUBERNETES_PATCH = "1.36.3"
PATCH_VERSIONS = {"kubernetes": OTHER_KUBERNETES_PATCH}  # the case's `versions` settings


def _other_patch(raw: dict) -> None:
    raw["versions"] = {**(raw.get("versions") or {}), **PATCH_VERSIONS}


@dataclass(frozen=True)
class Live:
    """What the patch case is judged by: the bundle files whose bytes differ between the two
    versions, and each step's and upload's dependencies in the live stack (by name)."""

    changed_files: frozenset[str] = frozenset()
    dependencies: dict[str, list[str]] = field(default_factory=dict)
    creates: dict[str, str] = field(default_factory=dict)  # each step's script as the stack holds it


def bundle_dir(overrides: dict[str, str] | None = None) -> Path:
    """The bundle a stack with these ``versions`` uses (binaries.source: directory)."""
    return REAL_CACHE / "bundles" / bundle_key({**load_versions()["node"], **(overrides or {})})


def live(project: Project) -> Live:
    sums_now = read_sums(bundle_dir() / "SHA256SUMS")
    sums_other = read_sums(bundle_dir(PATCH_VERSIONS) / "SHA256SUMS")
    changed = frozenset(f for f, s in sums_now.items() if sums_other.get(f) != s)
    resources = json.loads(project.run("stack", "export", "--stack", project.stack).stdout)["deployment"]["resources"]
    name = {r["urn"]: r["urn"].rsplit("::", 1)[1] for r in resources}
    remote = [r for r in resources if r["type"].startswith("command:remote:")]
    deps = {name[r["urn"]]: [name[d] for d in r.get("dependencies", []) if d in name] for r in remote}
    creates = {name[r["urn"]]: str(r.get("inputs", {}).get("create", "")) for r in remote}
    return Live(changed, deps, creates)


def patch_updates(changed_files: set[str] | frozenset[str], creates: dict[str, str],
                  dependencies: dict[str, list[str]]) -> dict[str, str]:
    """What new bytes in ``changed_files`` must update, and nothing else: each node archive that
    carries one (its upload and its unpack step), each image upload of one, and each step that
    installs one (``install_bin``) or uses a changed image upload."""
    unpacks = {n for n, c in creates.items() if "-unpack-" in n and any(f"  {f}\n" in c for f in changed_files)}
    archives = {n.replace("-unpack-", "-upload-", 1) for n in unpacks}
    dashed = {f.replace("/", "-") for f in changed_files}
    files = {n for n in dependencies if "-upload-" in n and n.split("-upload-", 1)[1] in dashed}
    installs = {n for n, c in creates.items() if any(f"install_bin {f} " in c for f in changed_files)}
    installs |= {n for n, deps in dependencies.items() if n not in files and files & set(deps)}
    # Each worker's drain and uncordon steps name the versions it runs (components/rollout.py).
    rollout = {n for n in creates if "-drain-" in n or "-uncordon-" in n} if changed_files else set()
    return {n: "update" for n in sorted(unpacks | archives | files | installs | rollout)}


def _more_workers(raw: dict) -> None:
    raw["workers"] = {**raw.get("workers", {}), "count": raw.get("workers", {}).get("count", 2) + 1}


def _more_master_memory(raw: dict) -> None:
    raw["masters"] = {**raw.get("masters", {}), "memory_mib": raw.get("masters", {}).get("memory_mib", 2048) + 512}


CASES = [
    Case("a kubelet setting (`kubelet.max_pods: 60`)", "an update of each workload node's `kubelet` step, nothing else",
         lambda r: r.update(kubelet={"max_pods": 60}), "maxPods: 60"),
    Case("an apiserver flag (`apiserver.service_node_port_range: 31000-31999`)",
         "an update of each master's `kube-apiserver` step, nothing else",
         lambda r: r.update(apiserver={"service_node_port_range": "31000-31999"}), "--service-node-port-range=31000-31999"),
    Case("`workers.count` + 1", "creates for the new node only (machine, certificates, uploads, steps), plus an update "
         "of `cluster-ready` (it lists every node) and the create of the new node's `remove-node-<node>` step",
         _more_workers, "worker-"),
    Case("`masters.memory_mib` + 512 on libvirt", "each master domain's update, or its replace where the libvirt "
         "provider decides so, and then the re-run of that master's own uploads and steps (its new machine "
         "identity); no other node's", _more_master_memory, "memory"),
    Case(f"a Kubernetes patch version (`versions.kubernetes: {OTHER_KUBERNETES_PATCH}`, pinned: "
         f"{load_versions()['node']['kubernetes']})", "an update of each node archive holding a changed binary (its upload "
         "and unpack step), of each step that installs one and of each worker's drain and uncordon steps (they name "
         "the versions it runs: the update drains it first), nothing else (no machine, no other step)", _other_patch,
         "install_bin bin/kube-apiserver"),
]


def readme_rows() -> list[str]:
    return [f"| {c.change} | {c.shows} |" for c in CASES]


def expected_ops(case: Case, raw: dict, nodes: list[dict], ops: dict[str, str], ctx: Live | None = None) -> dict[str, str]:
    """The exact operations ``case`` must plan on this topology (the memory case is judged
    partly by ``ops``: the provider decides update or replace)."""
    if case.mutate is _other_patch:
        assert ctx is not None, "the patch case is judged against the live stack (diff_contract.live)"
        return patch_updates(ctx.changed_files, ctx.creates, ctx.dependencies)
    masters = [n["name"] for n in nodes if n["role"] == "master"]
    workload = [n["name"] for n in nodes if n["runs_workloads"]]
    first = masters[0]
    if case.mutate is CASES[0].mutate:
        return {f"{n}-kubelet": "update" for n in workload}
    if case.mutate is CASES[1].mutate:
        return {f"{n}-kube-apiserver": "update" for n in masters}
    if case.mutate is _more_workers:
        new = f"worker-{sum(1 for n in nodes if n['role'] == 'worker') + 1}"
        want = dict(s.format(first=first, new=new).split(": ") for s in SHARED_ON_NEW_NODE)
        want.update({name: "create" for name in ops if new in name and name not in want})
        return want
    if case.mutate is _more_master_memory:
        want: dict[str, str] = {}
        for m in masters:
            if ops.get(m) == "update":
                want[m] = "update"
            else:  # replaced: the domain's replace steps, and its own uploads and steps re-run
                want.update({k: v for k, v in ops.items() if k == m or k.startswith(f"{m}-")})
                want.setdefault(m, "replace")
        return want
    raise AssertionError(f"no expectation for {case.change}")


def planned_ops(project: Project, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """What a real ``pulumi preview`` of the stack's current config would change: every
    operation by name (as the contract names them), and those of custom resources alone (the
    engine's events list only those, and a component can share its name with one: the
    ``worker-3`` Machine and its ``worker-3`` domain)."""
    preview, proc = project.preview_json(check=False)
    assert proc.returncode == 0, f"preview of {what} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    steps = [s for s in planned(preview) if s["op"] not in ("same", "read")]
    return ({s["name"]: s["op"] for s in steps},
            {s["name"]: s["op"] for s in steps if not (s["type"] or "").startswith("kubelab:")})


def run_case(project: Project, raw: dict, nodes: list[dict], case: Case) -> dict:
    """Preview ``case`` against the live stack; the planned operations, the diff line, a verdict."""
    changed = copy.deepcopy(raw)
    case.mutate(changed)
    project.set_cluster(changed)
    try:
        ops, _ = planned_ops(project, case.change)
        human = ANSI.sub("", project.run("preview", "--diff", timeout=1200).stdout)
    finally:
        project.set_cluster(raw)
    diff_lines = [ln for ln in human.splitlines() if ln.lstrip().startswith(("+", "~")) and case.line in ln]
    want = expected_ops(case, raw, nodes, ops, live(project) if case.mutate is _other_patch else None)
    return {"change": case.change, "planned": ops, "expected": want, "ok": ops == want and bool(diff_lines),
            "diff_excerpt": diff_lines[:6]}
