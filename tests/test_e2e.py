"""End to end on this machine: real VMs (libvirt, TCG here), real binaries, a real cluster.

From an empty stack: ``pulumi up`` → every node Ready → kubectl works with the exported
kubeconfig → a pod on each worker (its image only in the private registry, preloaded there) →
pod-to-pod across nodes (flannel) → pod to a Service ClusterIP → DNS through CoreDNS →
anonymous requests refused (apiserver, kubelet, etcd) → ``preview --expect-no-changes`` →
a second ``up`` changes and uploads nothing → no plaintext key in ``stack export`` →
``destroy`` leaves no domain, volume or network. Every run writes ``.e2e/timings.json``.

``KUBELAB_E2E_TOPOLOGY=seed000`` runs seed 000's topology instead (a master that is also a
node, and two more nodes), ``seed000-ha`` three masters that all run pods, ``ha`` three masters
and a worker, one master stopped and started again (``apply_topology``). Everything that crosses a
network runs inside the lab's network namespace.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from components.binaries import read_sums
from components.config import BackupConfig
from tests import diff_contract
from tests.pulumi_support import REAL_CACHE, REPO, Project, toolchain_bin

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(REPO / "lab"))
sys.path.insert(0, str(REPO / "tools"))

TOPOLOGY = os.environ.get("KUBELAB_E2E_TOPOLOGY", "1+2")
# The recreate loop (a second `up` of the destroyed stack) doubles the run; CI's 90-minute
# budget on a busy 2-core machine leaves it to `make e2e` (KUBELAB_E2E_RECREATE=0 in .ci/run).
RECREATE = os.environ.get("KUBELAB_E2E_RECREATE", "1") != "0"
# The machine stages (one worker's VM replaced, workers 2 -> 3 -> 2): about 25 minutes under TCG
# here, measured 2026-12 when `pulumi up` alone took 22 minutes on a loaded host; CI's 90 minutes
# leave them to `make e2e` (KUBELAB_E2E_MACHINES=0 in .ci/run), which runs them.
MACHINES = os.environ.get("KUBELAB_E2E_MACHINES", "1") != "0"
NAME = "kubelab-e2e"
# The upgrade topology: from the pinned release to the next minor's (both built into bundles).
UPGRADE_FROM, UPGRADE_TO = "1.36.4", "1.37.2"
NODE_CIDR = "10.241.0.0/24"
TIMINGS = REPO / ".e2e" / ("timings.json" if TOPOLOGY == "1+2" else f"timings-{TOPOLOGY}.json")
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10"]


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timings(dict):
    """Written after every phase, so a failed run still leaves what it measured."""

    def save(self) -> None:
        TIMINGS.parent.mkdir(exist_ok=True)
        TIMINGS.write_text(json.dumps(self, indent=2, sort_keys=True) + "\n")


def events(path: Path) -> list[dict]:
    """The engine's own event stream of one run (``--event-log``, see ``Project.run_logged``)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resource_times(evs: list[dict]) -> dict[str, tuple[float, float, str, str]]:
    """name -> (start, done, op, type) of every custom resource, from an engine event log."""
    start: dict[str, float] = {}
    out: dict[str, tuple[float, float, str, str]] = {}
    for e in evs:
        if "resourcePreEvent" in e:
            md = e["resourcePreEvent"]["metadata"]
            start[md["urn"]] = e["timestamp"]
        elif "resOutputsEvent" in e:
            md = e["resOutputsEvent"]["metadata"]
            urn = md["urn"]
            if md["type"].startswith("kubelab:") or md["type"].startswith("pulumi:"):
                continue  # components share names with their VMs; the stack and providers
            out[urn.rsplit("::", 1)[1]] = (start.get(urn, e["timestamp"]), e["timestamp"], md["op"], md["type"])
    return out


def touched(times: dict[str, tuple[float, float, str, str]]) -> dict[str, str]:
    """The operation of every resource a run changed (``resource_times``), by name."""
    return {k: v[2] for k, v in times.items() if v[2] not in ("same", "read")}


def slowest(times: dict[str, tuple[float, float, str, str]], t0: float, n: int = 20) -> list[dict]:
    """The ``n`` longest resources of a run, with start/end relative to the run's first event."""
    rows = sorted(times.items(), key=lambda kv: kv[1][1] - kv[1][0], reverse=True)[:n]
    return [{"name": k, "type": v[3], "op": v[2], "start_s": round(v[0] - t0, 1), "end_s": round(v[1] - t0, 1),
             "duration_s": round(v[1] - v[0], 1)} for k, v in rows]


def critical_path(times: dict[str, tuple[float, float, str, str]], state: dict, last: str, t0: float) -> list[dict]:
    """The chain of resources that decided when ``last`` finished: from ``last``, step back to
    the dependency that finished latest (the one it really waited for), until a resource that
    waited for nothing timed. ``state`` is ``pulumi stack export``; components in a dependency
    list stand for their children."""
    resources = state["deployment"]["resources"]
    by_urn = {r["urn"]: r for r in resources}
    children: dict[str, list[str]] = {}
    for r in resources:
        if r.get("parent"):
            children.setdefault(r["parent"], []).append(r["urn"])

    def timed(urn: str, seen: set[str]) -> list[str]:
        name = urn.rsplit("::", 1)[1]
        if name in times and not by_urn.get(urn, {}).get("type", "").startswith(("kubelab:", "pulumi:")):
            return [name]
        if urn in seen:
            return []
        seen.add(urn)
        return [n for c in children.get(urn, []) for n in timed(c, seen)]

    urn_of = {r["urn"].rsplit("::", 1)[1]: r["urn"] for r in resources if not r["type"].startswith(("kubelab:", "pulumi:"))}
    chain, name = [], last
    while name:
        start, end, _, typ = times[name]
        chain.append({"name": name, "type": typ, "start_s": round(start - t0, 1), "end_s": round(end - t0, 1),
                      "duration_s": round(end - start, 1)})
        deps = [n for d in by_urn[urn_of[name]].get("dependencies", []) for n in timed(d, set())]
        deps = [d for d in deps if times[d][1] <= start + 1]  # finished before this one began
        name = max(deps, key=lambda d: times[d][1]) if deps else ""
    return chain[::-1]


def uploaded_bytes(times: dict, state: dict) -> dict[str, int]:
    """Bytes uploaded per node: CopyToRemote resources created or updated in this run, at the
    size they travel (the file each one's asset names: a node archive or a gzipped image)."""
    paths = {r["urn"].rsplit("::", 1)[1]: r["inputs"]["source"]["path"]
             for r in state["deployment"]["resources"] if r["type"] == "command:remote:CopyToRemote"}
    per: dict[str, int] = {}
    for name in touched(times):
        if name not in paths:
            continue
        node = name.split("-upload-", 1)[0]
        per[node] = per.get(node, 0) + Path(paths[name]).stat().st_size
    return per


def archive_sizes(state: dict) -> dict[str, int]:
    """Each upload's bytes, by resource name (what a node archive costs, per node)."""
    return {r["urn"].rsplit("::", 1)[1]: Path(r["inputs"]["source"]["path"]).stat().st_size
            for r in state["deployment"]["resources"] if r["type"] == "command:remote:CopyToRemote"}


def rollout_seconds(deployments: dict) -> dict[str, float]:
    """Per kube-system Deployment (``kubectl get deploy -o json``): seconds from its creation
    to its Available condition, what an addon adds to the wait for a usable cluster."""
    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    out = {}
    for d in deployments["items"]:
        avail = next((c for c in d["status"].get("conditions", []) if c["type"] == "Available" and c["status"] == "True"), None)
        if avail:
            out[d["metadata"]["name"]] = round(at(avail["lastTransitionTime"]) - at(d["metadata"]["creationTimestamp"]), 1)
    return out


class HostCpu:
    """This machine's CPU use, sampled from ``/proc/stat`` in the background for the whole run.

    With the VMs emulated (TCG), every guest instruction costs host CPU: when the host's cores
    are busy all through ``pulumi up``, starting steps earlier or in parallel cannot make the
    cluster Ready sooner, only doing less work can. This is the number that tells which case
    a run was in.
    """

    def __init__(self, every: float = 2.0):
        self.samples: list[tuple[float, int, int]] = []  # (wall time, busy jiffies, total jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        total = sum(vals[:8])  # guest time is already counted in user
        return total - idle, total

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), *self._read()))
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def busy(self, start: float, end: float) -> float | None:
        """Fraction of all host cores busy between two wall times (None: too few samples)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][2] == inside[0][2]:
            return None
        return round((inside[-1][1] - inside[0][1]) / (inside[-1][2] - inside[0][2]), 3)

    def profile(self, start: float, end: float, step: float = 60.0) -> list[float | None]:
        """``busy`` per ``step`` seconds from ``start`` (how the load moved through the run)."""
        out, t = [], start
        while t < end:
            out.append(self.busy(t, min(t + step, end)))
            t += step
        return out


def cpu_slowdown(in_ns, address: str, key: Path, mib: int = 64) -> dict[str, float]:
    """One fixed CPU-bound job (sha256 of ``mib`` MiB of zeros) timed on this host and on a
    node: how much slower the emulated guest is, to scale CPU-bound steps to KVM."""
    job = f"head -c {mib}M /dev/zero | sha256sum >/dev/null"
    t0 = time.monotonic()
    subprocess.run(["bash", "-c", job], check=True)
    host_s = time.monotonic() - t0
    script = f"s=$(date +%s.%N); {job}; e=$(date +%s.%N); echo \"$s $e\""
    out = in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{address}", script, timeout=600).stdout.split()
    node_s = float(out[1]) - float(out[0])
    return {"host_s": round(host_s, 3), "node_s": round(node_s, 3), "factor": round(node_s / host_s, 1)}


GO_DURATION_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}


def pod_timeline(pods: dict, evs: dict, t0: float) -> list[dict]:
    """Per kube-system pod, seconds after ``pulumi up`` began (``t0``): created, scheduled,
    ready, and its image pull as the kubelet reports it. What ``cluster-ready`` waits for,
    taken apart (``kubectl get pods,events -o json``)."""
    def at(stamp: str | None) -> float | None:
        return round(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - t0, 1) if stamp else None

    pulls = {}
    for e in evs["items"]:
        m = re.search(r" in ([0-9.hms]+) \(", e.get("message", "")) if e.get("reason") == "Pulled" else None
        if m:  # a Go duration: 850ms, 12.3s, 1m2.3s
            pulls[e["involvedObject"]["name"]] = round(
                sum(float(v) * GO_DURATION_UNITS[u] for v, u in re.findall(r"([0-9.]+)(ms|h|m|s)", m.group(1))), 1)
    out = []
    for p in pods["items"]:
        cond = {c["type"]: c.get("lastTransitionTime") for c in p["status"].get("conditions", [])}
        out.append({"pod": p["metadata"]["name"], "node": p["spec"].get("nodeName"),
                    "created_s": at(p["metadata"]["creationTimestamp"]), "scheduled_s": at(cond.get("PodScheduled")),
                    "ready_s": at(cond.get("Ready")), "pull_s": pulls.get(p["metadata"]["name"])})
    return sorted(out, key=lambda r: r["created_s"] or 0)


def first_event(evs: list[dict]) -> float:
    return min((e["timestamp"] for e in evs if "timestamp" in e), default=0)


NODE_UNITS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelab-apiserver-lb", "flanneld", "containerd", "kubelet", "kube-proxy")


def node_journals(in_ns, nodes_cfg: list[dict], key: Path, dest: Path, lines: int = 60) -> None:
    """After a failure, before the destroy: each node's unit states and journal tails, printed
    and written to ``dest`` (what a user would look at first on the node itself)."""
    script = (f"for u in {' '.join(NODE_UNITS)}; do systemctl cat $u >/dev/null 2>&1 || continue; "
              f"echo \"--- $u: $(systemctl is-active $u)\"; sudo -n journalctl -u $u -n {lines} --no-pager -o short-monotonic; done; "
              "echo '--- pod sandboxes'; sudo -n /usr/local/bin/ctr -n k8s.io containers ls 2>&1 | tail -n 20 || true")
    out = []
    for n in nodes_cfg:
        proc = in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{n['address']}", script, check=False, timeout=120)
        out.append(f"===== node {n['name']} (exit {proc.returncode}) =====\n{proc.stdout}{proc.stderr}")
    dest.write_text("\n".join(out))
    print("\n".join(out)[-30000:], flush=True)


def leftovers(lab, name: str) -> list[str]:
    """Domains, networks, volumes and pool files of the cluster that still exist."""
    return [f"{kind} {obj}" for kind, obj in lab.leftovers(name)]


@pytest.fixture(scope="module")
def prerequisites() -> dict[str, Path]:
    """The node bundle, the base image and the lab SSH key (the Pulumi toolchain is checked
    by the tests that run pulumi)."""
    bundle = diff_contract.bundle_dir()
    image = REAL_CACHE / "images" / "debian-trixie.qcow2"
    if not (bundle / "SHA256SUMS").exists():
        pytest.skip(f"NODE BUNDLE MISSING ({bundle}); run `make tools`")
    if not image.exists():
        pytest.skip(f"BASE IMAGE MISSING ({image}); run `make image`")
    key = REAL_CACHE / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kubelab-lab", "-f", str(key)], check=True)
    return {"bundle": bundle, "image": image, "key": key}


def netcheck_image(dest: Path) -> Path:
    """Build the test workload and package it as an image archive; `pulumi up` pushes it into
    the private registry (registry.preload), so the pods pull it from there."""
    binary = dest / "netcheck"
    subprocess.run(["go", "build", "-trimpath", "-o", str(binary), "."], cwd=REPO / "tests/netcheck", check=True,
                   env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"})
    from bundle_build import write_oci_archive  # tools/bundle_build.py

    archive = dest / "netcheck.tar"
    write_oci_archive(archive, "kubelab.local/netcheck:e2e", {"netcheck": (binary.read_bytes(), 0o755)},
                      {"Entrypoint": ["/netcheck"], "Cmd": ["serve"]})
    return archive


def apply_topology(raw: dict, topology: str) -> dict:
    """The e2e topologies on top of the dev stack's settings (1 master + 2 workers, seed 001).

    - ``seed000``: seed 000's three CoreOS hosts, "coreos-1 Master, coreos-2 Minion1, coreos-3
      Minion2 ... the master is also a minion", flannel's config under ``/coreos.com/network``.
      (Seed 000 ran etcd on all three hosts for fleet; kubelab runs etcd on its masters.)
    - ``1+4``: four workers, to compare bring-up with 1+2 (the speed issue's scaling goal).
    - ``ha``: three masters and one worker (the lifecycle issue's HA control plane): one master
      is stopped and started again while the cluster keeps serving (``verify_master_outage``).
    - ``grow``: one master and one worker; a second master joins the running cluster and
      leaves it again (``verify_master_join_leave``): etcd members added and removed live.
    - ``upgrade``: the dev stack at Kubernetes ``UPGRADE_FROM``, upgraded live to ``UPGRADE_TO``
      while a Service is probed once a second (``verify_rolling_upgrade``).
    - ``seed000-ha``: every host a master that also runs pods, so etcd is on all three as in
      seed 000, with an apiserver on each too. Under TCG on 2 host cores this is more than the
      machine gives (measured: etcd slower than its clients' deadlines, a master unreachable).
    """
    if topology == "seed000":
        raw["masters_run_workloads"] = True
        raw.setdefault("network", {})["etcd_prefix"] = "/coreos.com/network"
    elif topology == "seed000-ha":
        raw["masters"] = {**raw.get("masters", {}), "count": 3, "memory_mib": 2560, "cpus": 1}
        raw["workers"] = {**raw.get("workers", {}), "count": 0}
        raw["masters_run_workloads"] = True
        raw.setdefault("network", {})["etcd_prefix"] = "/coreos.com/network"
    elif topology == "1+4":
        raw["workers"] = {**raw.get("workers", {}), "count": 4}
    elif topology == "ha":
        raw["masters"] = {**raw.get("masters", {}), "count": 3, "memory_mib": 2048, "cpus": 1}
        raw["workers"] = {**raw.get("workers", {}), "count": 1}
    elif topology == "grow":
        # The dev stack's masters (2 vCPUs): with one, the first master's API server timed
        # requests out under TCG (measured) and a joining member's API server never got ready.
        raw["workers"] = {**raw.get("workers", {}), "count": 1}
    elif topology == "upgrade":
        raw["versions"] = {**(raw.get("versions") or {}), "kubernetes": UPGRADE_FROM}
    elif topology != "1+2":
        raise ValueError(f"KUBELAB_E2E_TOPOLOGY={topology!r}: choose 1+2, 1+4, ha, grow, upgrade, seed000 or seed000-ha")
    return raw


def cluster_config(pre: dict[str, Path], netcheck: Path) -> dict:
    raw = yaml.safe_load((REPO / "Pulumi.dev.yaml").read_text())["config"]["kubelab:cluster"]
    # The test workload exists only in the private registry (on by default in the lab).
    raw.setdefault("registry", {})["preload"] = [str(netcheck)]
    # The Dashboard, whose images cannot be had here: applied, checked, never waited for.
    raw.setdefault("addons", {})["dashboard"] = True
    raw["name"] = NAME
    raw["network"]["node_cidr"] = NODE_CIDR
    raw["libvirt"]["network_name"] = NAME
    raw["libvirt"]["image"] = str(pre["image"])
    raw["ssh"]["private_key_file"] = str(pre["key"])
    return apply_topology(raw, TOPOLOGY)


def test_lab_cluster_end_to_end(tmp_path, prerequisites):
    from harness import Lab  # lab/harness.py

    toolchain_bin()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    t = Timings(passed=False, commit=commit, topology=TOPOLOGY)
    t.save()
    # The diff contract's patch case previews the stack on a second bundle: built (or found in
    # the cache) now, before any VM competes for the CPU.
    if not (diff_contract.bundle_dir(diff_contract.PATCH_VERSIONS) / ".done").exists():
        from bundle_build import build_bundle  # tools/bundle_build.py

        log(f"building the node bundle for {diff_contract.PATCH_VERSIONS} (the diff contract's patch case)")
        build_bundle({}, overrides=diff_contract.PATCH_VERSIONS)
    # The node archives (binaries.prepare_archives) are made once per bundle on the deploy host,
    # like the bundle itself: made (or found) now, before any VM competes for the CPU, for this
    # stack and for the patch case's bundle, and timed apart from `pulumi up`.
    upgrade = [{"kubernetes": UPGRADE_TO}] if TOPOLOGY == "upgrade" else []
    for versions in upgrade:  # the upgrade's target release, built (or found) before the VMs start
        if not (diff_contract.bundle_dir(versions) / ".done").exists():
            from bundle_build import build_bundle  # tools/bundle_build.py

            log(f"building the node bundle for {versions} (the rolling upgrade's target)")
            build_bundle({}, overrides=versions)
    raw = cluster_config(prerequisites, netcheck_image(tmp_path))
    t0 = time.monotonic()
    for versions in ({}, diff_contract.PATCH_VERSIONS, *upgrade):
        prepare = ("import json, sys\nfrom components.binaries import prepare_archives, resolve\n"
                   "from components.config import parse_cluster_config\n"
                   "cfg = parse_cluster_config(json.load(sys.stdin), 'e2e')\n"
                   "prepare_archives(cfg, resolve(cfg.binaries, cfg.versions))\n")
        subprocess.run([sys.executable, "-c", prepare], cwd=REPO, check=True, text=True, timeout=3600,
                       input=json.dumps({**raw, "versions": {**(raw.get("versions") or {}), **versions}}),
                       env={**os.environ, "KUBELAB_CACHE": str(REAL_CACHE)})
    t["archives_ready_s"] = round(time.monotonic() - t0, 1)
    t.save()
    lab = Lab(state_file=tmp_path / "lab-state.json")
    lab.up()
    cpu = HostCpu()
    # An earlier run cut short (killed, or a destroy that failed) must not break this one:
    # CI reuses the machine, and libvirt keeps the definitions.
    stale = lab.purge(NAME)
    if stale:
        log(f"removed what an earlier run left behind: {stale}")
    nodes_cfg = _nodes(raw)
    project = Project(tmp_path, "e2e", raw, prefix=lab.exec_prefix())
    bundle = prerequisites["bundle"]
    kubectl_bin = str(bundle / "bin/kubectl")
    destroyed = False

    def in_ns(*cmd: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*lab.exec_prefix(), *cmd], capture_output=True, text=True, check=False, timeout=timeout, input=input)
        if check and proc.returncode != 0:  # with what it said: CalledProcessError shows neither stream
            raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)[:600]}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
        return proc

    def up(label: str, timeout: float = 3600) -> tuple[float, dict]:
        """A timed ``pulumi up`` with the engine's event log; its per-resource times."""
        ev = tmp_path / f"{label}.events.jsonl"
        t0 = time.monotonic()
        proc = project.run_logged(ev, "up", "--yes", "--skip-preview", check=False, timeout=timeout)
        took = round(time.monotonic() - t0, 1)
        evs = events(ev)
        times = resource_times(evs)
        if proc.returncode != 0:
            t[f"{label}_failed_s"] = took
            t.save()
            raise AssertionError(f"pulumi up ({label}) failed after {took} s:\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}")
        summary = next((e["summaryEvent"] for e in evs if "summaryEvent" in e), {})
        return took, {"times": times, "t0": first_event(evs), "engine_s": summary.get("durationSeconds")}

    def fetch_kubeconfig() -> Path:
        kc = tmp_path / "kubeconfig"
        kc.write_text(project.run("stack", "output", "kubeconfig", "--show-secrets", "--stack", "e2e").stdout)
        return kc

    try:
        # --- pulumi up from an empty stack --------------------------------------------------
        log("pulumi up (from an empty stack)")
        t["up_total_s"], run1 = up("up1")
        times, up_start = run1["times"], run1["t0"]
        boots = [times[f"{n['name']}-wait-for-ssh"][1] - times[n["name"]][0] for n in nodes_cfg
                 if f"{n['name']}-wait-for-ssh" in times and n["name"] in times]
        if boots:
            t["vm_boot_to_ssh_s"] = round(max(boots), 1)
        ready = [v for k, v in times.items() if k.endswith("-cluster-ready")]
        assert ready, "no cluster-ready step in the engine's events"
        t["up_to_ready_s"] = round(ready[0][1] - up_start, 1)
        if boots:  # R in the speed issue: what everything after the boot costs, in boots
            t["ready_over_boot"] = round(t["up_to_ready_s"] / t["vm_boot_to_ssh_s"], 2)
        state1 = json.loads(project.run("stack", "export", "--stack", "e2e").stdout)
        t["uploaded_bytes_per_node"] = uploaded_bytes(times, state1)
        t["upload_bytes"] = archive_sizes(state1)
        unpacks = {k: round(v[1] - v[0], 1) for k, v in times.items() if "-unpack-" in k}
        t["unpack_s"] = unpacks  # on the node: check, unxz, untar, check every file
        registry_step = times.get(f"{nodes_cfg[0]['name']}-registry")
        if registry_step:  # start the registry, unpack and push every archive (the step's own output has each push)
            t["registry_step_s"] = round(registry_step[1] - registry_step[0], 1)
        t["slowest_resources"] = slowest(times, up_start)
        ready_at = ready[0][1]
        t["host_cpu"] = {"cores": os.cpu_count(), "busy_up_to_ready": cpu.busy(up_start, ready_at),
                         "busy_per_minute": cpu.profile(up_start, ready_at)}
        try:  # a measurement: its failure is recorded, never fails the run
            t["critical_path"] = critical_path(times, state1, next(k for k in times if k.endswith("-cluster-ready")), up_start)
        except Exception as exc:
            t["critical_path"] = f"not computed: {exc!r}"
        t["resources"] = len(times)
        t["nodes"] = len(nodes_cfg)
        t.save()
        log(f"up done in {t['up_total_s']} s ({len(times)} resources, Ready at {t['up_to_ready_s']} s)")

        kubeconfig = fetch_kubeconfig()
        outputs = json.loads(project.run("stack", "output", "--json", "--stack", "e2e").stdout)
        assert outputs["kubeconfig"] == "[secret]"
        api = outputs["apiserverUrl"]

        verify_cluster(in_ns, kubeconfig, kubectl_bin, nodes_cfg, api, prerequisites, tmp_path, raw["network"]["service_cidr"])
        if TOPOLOGY == "ha":
            verify_master_outage(in_ns, kubeconfig, kubectl_bin, nodes_cfg, prerequisites["key"], t)
        if TOPOLOGY == "grow":
            verify_master_join_leave(project, raw, nodes_cfg, up, in_ns, kubeconfig, kubectl_bin, prerequisites["key"],
                                     lab, t)
        if TOPOLOGY == "upgrade":
            verify_rolling_upgrade(project, raw, nodes_cfg, up, in_ns, kubeconfig, kubectl_bin, prerequisites["key"], t)
        verify_registry(in_ns, kubeconfig, outputs["registryUrl"], nodes_cfg, tmp_path)
        verify_dashboard(in_ns, kubeconfig, kubectl_bin)
        verify_security(in_ns, kubeconfig, kubectl_bin, nodes_cfg[0]["address"], prerequisites["key"], raw["network"]["etcd_prefix"])
        try:  # a measurement: what each addon costs (bytes per workload node, seconds to Available)
            deploys = json.loads(in_ns(kubectl_bin, "--kubeconfig", str(kubeconfig), "-n", "kube-system", "get",
                                       "deployments", "-o", "json").stdout)
            sums = read_sums(bundle / "SHA256SUMS")
            # Uploaded once, to the registry's master (nodes pull what they run from it).
            t["addons"] = {"rollout_s": rollout_seconds(deploys), "image_bytes_to_registry": {
                f: (REAL_CACHE / "blobs" / f"{sums[f]}.gz").stat().st_size for f in sums if f.startswith("images/")}}
            get = [kubectl_bin, "--kubeconfig", str(kubeconfig), "-n", "kube-system", "get", "-o", "json"]
            t["kube_system_pods"] = pod_timeline(json.loads(in_ns(*get, "pods").stdout),
                                                 json.loads(in_ns(*get, "events").stdout), up_start)
        except Exception as exc:
            t["addons"] = f"not measured: {exc!r}"
        try:  # a measurement: how much slower than this host a node computes (TCG here)
            t["cpu_slowdown"] = cpu_slowdown(in_ns, nodes_cfg[-1]["address"], prerequisites["key"])
        except Exception as exc:
            t["cpu_slowdown"] = f"not measured: {exc!r}"
        t["checks"] = {}
        try:
            verify_control_plane_reaches_services(in_ns, kubeconfig, kubectl_bin, nodes_cfg, tmp_path, t["checks"])
        finally:
            t.save()

        # --- no-op: preview and a second up change and upload nothing ------------------------
        t0, wall0 = time.monotonic(), time.time()
        proc = project.run("preview", "--expect-no-changes", "--diff", check=False, timeout=1200)
        t["noop_preview_s"] = round(time.monotonic() - t0, 1)
        t.save()
        assert proc.returncode == 0, f"a no-op preview planned changes:\n{proc.stdout[-12000:]}\n{proc.stderr[-3000:]}"
        t["noop_up_s"], run2 = up("up2", timeout=1200)
        # The no-ops run on this host's CPU, which the emulated VMs share: how busy it was.
        t["host_cpu"]["busy_during_noops"] = cpu.busy(wall0, time.time())
        t["noop_up_engine_s"] = run2["engine_s"]
        changed = sorted(f"{k} ({op})" for k, op in touched(run2["times"]).items())
        t["noop_uploaded_bytes"] = sum(uploaded_bytes(run2["times"], state1).values())
        t.save()
        assert run2["times"], "the no-op up reported no resources: the event log is not being read"
        assert changed == [], f"second up changed {changed}"
        assert t["noop_uploaded_bytes"] == 0
        log(f"no-op preview {t['noop_preview_s']} s, no-op up {t['noop_up_s']} s")

        # --- the pull-request diff contract: each change previewed against the live stack ----
        t0 = time.monotonic()
        t["diff_contract"] = []
        # grow: the master changes instead; upgrade: the version change instead (its patch case
        # would go back a minor from the upgraded release)
        for case in diff_contract.CASES if TOPOLOGY not in ("grow", "upgrade") else []:
            result = diff_contract.run_case(project, raw, nodes_cfg, case)
            t["diff_contract"].append(result)
            t.save()
            log(f"diff contract, {case.change}: {'as promised' if result['ok'] else 'BROKEN'} "
                f"({len(result['planned'])} planned; diff {result['diff_excerpt'][:1]})")
        t["diff_contract_s"] = round(time.monotonic() - t0, 1)
        t.save()
        broken = [r for r in t["diff_contract"] if not r["ok"]]
        assert not broken, f"the preview diff contract is broken:\n{json.dumps(broken, indent=1)}"
        proc = project.run("preview", "--expect-no-changes", check=False, timeout=1200)
        assert proc.returncode == 0, f"the stack config was not put back:\n{proc.stdout[-6000:]}"

        # --- a replaced machine comes back with all of its steps, and only its own -----------
        if TOPOLOGY == "1+2" and not MACHINES:
            t["replace_worker_s"] = t["scale_up_s"] = "not run: KUBELAB_E2E_MACHINES=0 (CI's time budget; `make e2e` runs it)"
            log("!!! machine stages NOT run (KUBELAB_E2E_MACHINES=0): worker replacement, scaling 2 -> 3 -> 2; `make e2e` runs them")
        if TOPOLOGY == "1+2" and MACHINES:
            victim = nodes_cfg[-1]["name"]
            urn = next(r["urn"] for r in json.loads(project.run("stack", "export", "--stack", "e2e").stdout)["deployment"]["resources"]
                       if r["type"] == "libvirt:index/volume:Volume" and r["urn"].endswith(f"::{victim}-root"))
            log(f"replace {victim}'s disk (and so its VM): pulumi up --replace {urn}")
            ev = tmp_path / "replace.events.jsonl"
            t0 = time.monotonic()
            proc = project.run_logged(ev, "up", "--yes", "--skip-preview", "--replace", urn, check=False, timeout=3600)
            t["replace_worker_s"] = round(time.monotonic() - t0, 1)
            t.save()
            assert proc.returncode == 0, f"replace failed:\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
            rerun = sorted(touched(resource_times(events(ev))))
            assert rerun and all(k.startswith(f"{victim}") for k in rerun), f"replacing {victim} touched {rerun}"
            assert {f"{victim}-kubelet", f"{victim}-upload-node", f"{victim}-unpack-node"} <= set(rerun), rerun
            kubectl_ns = [kubectl_bin, "--kubeconfig", str(kubeconfig)]
            in_ns(*kubectl_ns, "wait", "--for=condition=Ready", f"node/{victim}", "--timeout=600s", timeout=660)
            booted = in_ns("ssh", *SSH_OPTS, "-i", str(prerequisites["key"]), f"kubelab@{nodes_cfg[-1]['address']}",
                           "cat /proc/sys/kernel/random/boot_id; uptime -s").stdout
            log(f"{victim} replaced in {t['replace_worker_s']} s and Ready again ({len(rerun)} resources re-run; boot {booted.split()[0]})")
            proc = project.run("preview", "--expect-no-changes", check=False, timeout=1200)
            assert proc.returncode == 0, f"preview after the replacement planned changes:\n{proc.stdout[-8000:]}"

        # --- scaling workers: 2 -> 3 creates only the new node's resources, 3 -> 2 drains it -----
        if TOPOLOGY == "1+2" and MACHINES:
            verify_scaling(project, raw, nodes_cfg, up, in_ns, kubeconfig, kubectl_bin, lab, t)

        # --- etcd: a snapshot through the timer's service, then a restore that brings data back -
        if sum(n["role"] == "master" for n in nodes_cfg) == 1:  # the restore tool's scope
            verify_backup_restore(project, in_ns, kubeconfig, kubectl_bin, nodes_cfg, prerequisites["key"], t)

        # --- no plaintext private key in the state -------------------------------------------
        state = project.run("stack", "export", "--stack", "e2e").stdout
        assert "PRIVATE KEY" not in state
        assert "client-key-data" not in state

        # --- destroy leaves nothing behind ---------------------------------------------------
        t0 = time.monotonic()
        ev = tmp_path / "destroy.events.jsonl"
        project.run_logged(ev, "destroy", "--yes", "--skip-preview", timeout=1800)
        t["destroy_s"] = round(time.monotonic() - t0, 1)
        destroyed = True
        try:  # a measurement: where a destroy's seconds go
            dev = events(ev)
            t["destroy_slowest"] = slowest(resource_times(dev), first_event(dev), n=12)
            # the engine's own count, beside the wall clock (CLI start, plugins, state writes)
            t["destroy_engine_s"] = next((e["summaryEvent"] for e in dev if "summaryEvent" in e), {}).get("durationSeconds")
        except Exception as exc:
            t["destroy_slowest"] = f"not measured: {exc!r}"
        assert leftovers(lab, NAME) == [], f"left behind: {leftovers(lab, NAME)}"
        t.save()
        log(f"destroy in {t['destroy_s']} s left nothing behind")

        # --- the ephemeral-lab loop: the same stack comes back --------------------------------
        if not RECREATE:
            t["recreate_s"] = "not run: KUBELAB_E2E_RECREATE=0 (CI's time budget; `make e2e` runs it)"
            t["passed"] = True
            t.save()
            log("e2e passed (the recreate loop was not run: KUBELAB_E2E_RECREATE=0)")
            return
        log("pulumi up again (recreate the destroyed lab)")
        destroyed = False
        t["recreate_s"], _ = up("up3")
        t.save()
        kubeconfig = fetch_kubeconfig()
        nodes = json.loads(in_ns(kubectl_bin, "--kubeconfig", str(kubeconfig), "get", "nodes", "-o", "json").stdout)["items"]
        ready_nodes = sorted(n["metadata"]["name"] for n in nodes
                             if {c["type"]: c["status"] for c in n["status"]["conditions"]}.get("Ready") == "True")
        assert ready_nodes == sorted(n["name"] for n in nodes_cfg if n["runs_workloads"]), ready_nodes
        log(f"recreated in {t['recreate_s']} s, nodes Ready: {ready_nodes}")
        t0 = time.monotonic()
        project.run("destroy", "--yes", "--skip-preview", timeout=1800)
        t["destroy2_s"] = round(time.monotonic() - t0, 1)
        destroyed = True
        assert leftovers(lab, NAME) == [], f"left behind: {leftovers(lab, NAME)}"
        t["passed"] = True
        t.save()
        log("e2e passed")
    finally:
        if not destroyed:
            # Kept beside the timings (pytest's tmp dirs are cleaned after three runs).
            journals = TIMINGS.with_name(f"node-journals-{TOPOLOGY}.txt")
            log(f"after a failure: each node's units and journals (also in {journals.relative_to(REPO)})")
            try:
                node_journals(in_ns, stack_nodes(project, nodes_cfg), prerequisites["key"], journals, lines=300)
            except Exception as exc:  # the cleanup below must still run
                log(f"could not collect the node journals: {exc}")
            log("cleaning up after a failure: pulumi destroy")
            project.run("destroy", "--yes", "--skip-preview", check=False, timeout=1800)
            left = lab.purge(NAME)
            if left:
                log(f"pulumi destroy left these behind (removed now): {left}")
        cpu.stop()
        lab.down()
        t.save()
        summary = {k: t.get(k) for k in ("passed", "nodes", "vm_boot_to_ssh_s", "up_total_s", "up_to_ready_s",
                                          "noop_preview_s", "noop_up_s", "noop_uploaded_bytes", "replace_worker_s",
                                          "scale_up_s", "scale_down_s",
                                          "destroy_s", "recreate_s", "destroy2_s", "ready_over_boot",
                                          "registry_step_s", "host_cpu", "cpu_slowdown", "checks")}
        print(f"\ne2e timings ({TOPOLOGY}): {json.dumps(summary)}  -> {TIMINGS.relative_to(REPO)}")


def stack_nodes(project: Project, fallback: list[dict]) -> list[dict]:
    """The nodes the stack's last update left (a master that joined included), else ``fallback``."""
    try:
        nodes = json.loads(project.run("stack", "output", "nodes", "--json", "--stack", "e2e", timeout=120).stdout)
        return [n for n in nodes if n.get("name") and n.get("address")] or fallback
    except Exception:
        return fallback


SPREAD = "spread"  # the scaling phase's Deployment: one replica per worker while there are three


def verify_master_outage(in_ns, kubeconfig: Path, kubectl_bin: str, nodes_cfg: list[dict], key: Path, t: Timings) -> None:
    """One master's VM stopped hard (``virsh destroy``): the cluster keeps serving (kubectl
    works, a Deployment scales, its new pod starts, the worker stays Ready behind its load
    balancer, etcd keeps quorum with two of three); started again, etcd has three healthy
    members and the load balancers take the master back. The stopped master is the last one:
    the exported ``apiserverUrl`` is the first master's (README, What runs where)."""
    masters = [n for n in nodes_cfg if n["role"] == "master"]
    victim, first = masters[-1], masters[0]
    workers = [n for n in nodes_cfg if n["role"] != "master"]
    kubectl = [kubectl_bin, "--kubeconfig", str(kubeconfig)]
    virsh = ["virsh", "-c", "qemu:///system"]
    endpoints = ",".join(f"https://{m['address']}:2379" for m in masters)
    etcd_health = ("sudo /usr/local/bin/etcdctl --endpoints=" + endpoints + " --cacert=/etc/etcd/pki/ca.crt "
                   "--cert=/etc/etcd/pki/healthcheck-client.crt --key=/etc/etcd/pki/healthcheck-client.key "
                   "--command-timeout=10s endpoint health -w json")

    def ssh(node: dict, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{node['address']}", cmd, check=check, timeout=180)

    def healthy() -> list[str]:
        out = ssh(first, etcd_health, check=False).stdout
        try:
            return sorted(e["endpoint"] for e in json.loads(out) if e.get("health"))
        except ValueError:
            return []

    def lb_state(w: dict) -> str:
        """What the worker's load balancer last said of the victim (UP, DOWN, or "" if nothing)."""
        log_ = ssh(w, "sudo journalctl -u kubelab-apiserver-lb --no-pager -o cat", check=False).stdout
        said = re.findall(rf"Server kube-apiserver/{victim['name']} is (UP|DOWN)", log_)
        return said[-1] if said else ""

    def until(what: str, pred, timeout: float = 900) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if pred():
                return round(time.monotonic() - t0, 1)
            time.sleep(5)
        raise AssertionError(f"{what}: not so after {timeout} s")

    out: dict[str, object] = {"stopped": victim["name"]}
    in_ns(*virsh, "destroy", f"{NAME}-{victim['name']}")
    log(f"master outage: {victim['name']} stopped (virsh destroy)")
    t0 = time.monotonic()
    in_ns(*kubectl, "create", "deployment", "outage", "--image=kubelab.local/netcheck:e2e", "--replicas=1")
    in_ns(*kubectl, "rollout", "status", "deployment/outage", "--timeout=900s", timeout=960)
    in_ns(*kubectl, "scale", "deployment/outage", "--replicas=2")
    in_ns(*kubectl, "rollout", "status", "deployment/outage", "--timeout=900s", timeout=960)
    out["deployment_scaled_s"] = round(time.monotonic() - t0, 1)
    for w in workers:
        in_ns(*kubectl, "wait", "--for=condition=Ready", f"node/{w['name']}", "--timeout=300s", timeout=360)
        out[f"{w['name']}_marked_down_s"] = until(
            f"{w['name']}'s load balancer marks {victim['name']} down",
            lambda w=w: lb_state(w) == "DOWN", timeout=120)
    alive = sorted(f"https://{m['address']}:2379" for m in masters if m is not victim)
    assert healthy() == alive, f"etcd with {victim['name']} stopped: healthy {healthy()}, expected {alive}"
    log(f"master outage: the cluster kept serving (deployment scaled in {out['deployment_scaled_s']} s, etcd {len(alive)}/3)")

    in_ns(*virsh, "start", f"{NAME}-{victim['name']}")
    t0 = time.monotonic()
    want = sorted(f"https://{m['address']}:2379" for m in masters)
    out["etcd_three_healthy_s"] = until("etcd has three healthy members again", lambda: healthy() == want)
    for w in workers:
        until(f"{w['name']}'s load balancer takes {victim['name']} back",
              lambda w=w: lb_state(w) == "UP")
    out["back_s"] = round(time.monotonic() - t0, 1)
    in_ns(*kubectl, "delete", "deployment", "outage", "--wait=true", "--timeout=300s", timeout=360)
    t["master_outage"] = out
    t.save()
    log(f"master outage: {victim['name']} back, etcd 3/3 healthy after {out['etcd_three_healthy_s']} s")


def verify_master_join_leave(project: Project, raw: dict, nodes_cfg: list[dict], up, in_ns, kubeconfig: Path,
                             kubectl_bin: str, key: Path, lab, t: Timings) -> None:
    """``masters.count`` 1 -> 2 -> 1 on the live stack (the lifecycle issue's member changes).

    Join: the preview plans creates for the new master (its machine, certificates, steps, and
    its etcd-member step on the first master) and updates only of flanneld's etcd endpoints,
    the load balancers' server lists and the restore script; no step of the running master's
    etcd or API server. The new member joins as a learner and is promoted: two voting, healthy
    members; its API server answers. Leave: the preview plans exactly the deletes; the member
    is removed from etcd before its machine goes; one healthy member; nothing of it is left in
    libvirt; a preview after it is clean."""
    first = nodes_cfg[0]
    new = f"master-{raw['masters'].get('count', 1) + 1}"
    kubectl = [kubectl_bin, "--kubeconfig", str(kubeconfig)]
    bigger = json.loads(json.dumps(raw))
    bigger["masters"]["count"] = raw["masters"].get("count", 1) + 1
    allowed_updates = {f"{n['name']}-flanneld" for n in nodes_cfg} | {f"{n['name']}-apiserver-lb" for n in nodes_cfg} | {
        f"{first['name']}-etcd-backup"}

    def ssh(address: str, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{address}", cmd, check=check, timeout=180)

    def members() -> list[dict]:
        out = ssh(first["address"], "sudo ETCDCTL_API=3 /usr/local/bin/etcdctl --endpoints=https://127.0.0.1:2379 "
                  "--cacert=/etc/etcd/pki/ca.crt --cert=/etc/etcd/pki/root-client.crt "
                  "--key=/etc/etcd/pki/root-client.key member list -w json").stdout
        return [{"name": m.get("name", ""), "learner": bool(m.get("isLearner")), "peer": m["peerURLs"][0]}
                for m in json.loads(out)["members"]]

    out: dict[str, object] = {"master": new}
    try:
        project.set_cluster(bigger)
        ops, _ = diff_contract.planned_ops(project, f"masters.count {bigger['masters']['count']}")
    except BaseException:
        project.set_cluster(raw)
        raise
    creates = sorted(k for k, v in ops.items() if v == "create")
    others = {k: v for k, v in ops.items() if v != "create"}
    out["join_planned"] = {"creates": len(creates), "others": others}
    assert f"{first['name']}-etcd-member-{new}" in creates and f"{new}-etcd" in creates, creates
    assert all(new in k.split("-key")[0].split("-csr")[0] for k in creates), f"creates beyond {new}: {creates}"
    assert set(others) <= allowed_updates | {NAME} and set(others.values()) <= {"update"}, others
    for step in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert f"{first['name']}-{step}" not in ops, f"joining {new} changes the running master's {step}"
    log(f"master join: {len(creates)} creates, updates {sorted(others)}")
    out["join_s"], run = up("master-join")
    ms = members()
    assert sorted(m["name"] for m in ms) == sorted([first["name"], new]) and not any(m["learner"] for m in ms), ms
    address = next(m["peer"] for m in ms if m["name"] == new).split("//")[1].split(":")[0]
    # Ready once is what its step checked; under TCG a second etcd member on a starved host can
    # make /readyz flap for a while after (measured: its etcd check timing out), so asked again.
    for out["readyz_tries"] in range(1, 31):
        ready = ssh(address, "sudo /usr/local/bin/kubectl --kubeconfig /etc/kubernetes/admin.kubeconfig get --raw "
                    "'/readyz?verbose' 2>&1 | grep -v '^\\[+\\]'", check=False)
        if ready.returncode == 0 and ready.stdout.strip() == "readyz check passed":
            break
        log(f"master join: {new}'s /readyz not ok yet: {ready.stdout.strip()[-300:]}")
        time.sleep(10)
    assert ready.stdout.strip() == "readyz check passed", ready.stdout
    in_ns(*kubectl, "create", "deployment", "joined", "--image=kubelab.local/netcheck:e2e", "--replicas=1")
    in_ns(*kubectl, "rollout", "status", "deployment/joined", "--timeout=600s", timeout=660)
    in_ns(*kubectl, "delete", "deployment", "joined", "--wait=true", "--timeout=300s", timeout=360)
    log(f"master join: {new} is a voting etcd member and its API server is ready ({out['join_s']} s)")

    project.set_cluster(raw)
    ops_down, _ = diff_contract.planned_ops(project, f"masters.count {raw['masters'].get('count', 1)}")
    deletes = sorted(k for k, v in ops_down.items() if v == "delete")
    out["leave_planned"] = {"deletes": len(deletes), "others": {k: v for k, v in ops_down.items() if v != "delete"}}
    assert deletes == creates, f"leaving deletes {deletes}, joining created {creates}"
    out["leave_s"], run = up("master-leave")
    times = run["times"]
    removal = times[f"{first['name']}-etcd-member-{new}"]
    assert removal[1] <= times[new][0], f"{new}'s machine went before it left etcd: {removal} vs {times[new]}"
    ms = members()
    assert [m["name"] for m in ms] == [first["name"]], ms
    in_ns(*kubectl, "get", "--raw", "/readyz")
    left = [x for x in leftovers(lab, NAME) if new in x]
    assert left == [], f"{new} left behind: {left}"
    proc = project.run("preview", "--expect-no-changes", check=False, timeout=1200)
    assert proc.returncode == 0, f"preview after {new} left planned changes:\n{proc.stdout[-8000:]}"
    t["master_join_leave"] = out
    t.save()
    log(f"master leave: {new} removed from etcd, then its machine ({out['leave_s']} s); etcd has 1 member")


UPGRADE_WEB = "upgrade-web"


def upgrade_workload(replicas: int) -> str:
    """What the rolling upgrade must keep serving: a Deployment spread over the workers behind
    a Service, with a PodDisruptionBudget that lets a drain evict one pod at a time. A pod being
    evicted keeps serving for a few seconds (preStop sleep) while every node's kube-proxy drops it
    from the Service, as a production workload would."""
    labels = {"app": UPGRADE_WEB}
    return yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": UPGRADE_WEB},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                      "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": labels}}],
                      "terminationGracePeriodSeconds": 30,
                      "containers": [{"name": "netcheck", "image": "kubelab.local/netcheck:e2e", "args": ["serve"],
                                      "imagePullPolicy": "IfNotPresent",
                                      "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
                                      # 5 s to answer, not the 1 s default. Measured: the replica
                                      # left on the drained worker's peer turned not ready for 60 s
                                      # while that 1-vCPU emulated node started the moved replica
                                      # (the node stayed Ready; a 1 s probe on a starved node is the
                                      # likely cause), and the Service had no ready endpoint.
                                      "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 2,
                                                         "timeoutSeconds": 5}}]}}}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": UPGRADE_WEB},
         "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": UPGRADE_WEB},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    ])


def upgrade_probe(url: str) -> str:
    """The probe: a DaemonSet (a drain leaves its pods alone), one GET a second on every worker."""
    labels = {"app": "upgrade-probe"}
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "upgrade-probe"},
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "probe", "image": "kubelab.local/netcheck:e2e", "args": ["probe", url],
                            "imagePullPolicy": "IfNotPresent"}]}}}})


def failure_spans(fails: list[tuple[str, int]], gap: int = 5) -> list[dict]:
    """Failed probe requests as runs per node: a run ends at a gap of more than ``gap`` s."""
    spans: list[dict] = []
    for node, ts in sorted(fails):
        if spans and spans[-1]["node"] == node and ts - spans[-1]["last"] <= gap:
            spans[-1]["last"], spans[-1]["count"] = ts, spans[-1]["count"] + 1
        else:
            spans.append({"node": node, "first": ts, "last": ts, "count": 1})
    return spans


class UpgradeWatch:
    """What the data plane looked like through the rolling upgrade, recorded only when it changed
    (a failed probe request needs its why): every few seconds the Service's endpoints as its
    EndpointSlices say (node, ready, serving, terminating) and each node's Ready condition, from
    the API; every ``node_every`` s, on each worker, how many endpoints kube-proxy programmed for
    the Service, whether it programmed its no-endpoints REJECT, and how many flannel routes the
    node has. Read ``changes`` beside the probe's failures."""

    def __init__(self, in_ns, kubectl: list[str], service: str, workers: list[dict], key: Path,
                 every: float = 3.0, node_every: float = 15.0):
        self.changes: list[dict] = []
        self._last: dict[str, object] = {}
        self._stop = threading.Event()
        self._args = (in_ns, kubectl, service, workers, key, every, node_every)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self, what: str, value: object) -> None:
        if self._last.get(what) != value:
            self._last[what] = value
            self.changes.append({"t": round(time.time(), 1), "what": what, "value": value})

    def _run(self) -> None:
        in_ns, kubectl, service, workers, key, every, node_every = self._args
        rule = f"default/{service}"
        script = (f"sudo -n iptables-save -t nat | grep -F -- '{rule}' | grep -c -- '-j KUBE-SEP' || true; "
                  f"sudo -n iptables-save -t filter | grep -F -- '{rule}' | grep -c 'has no endpoints' || true; "
                  "ip route | grep -c 'dev flannel' || true")
        next_node = 0.0
        while not self._stop.is_set():
            try:
                slices = json.loads(in_ns(*kubectl, "get", "endpointslices", "-l", f"kubernetes.io/service-name={service}",
                                          "-o", "json", timeout=30).stdout)["items"]
                self._note("endpoints", sorted(
                    f"{s['metadata']['name']}:{e.get('nodeName')}:"
                    + "".join(k[0] for k in ("ready", "serving", "terminating") if (e.get("conditions") or {}).get(k))
                    for s in slices for e in s.get("endpoints") or []))
                nodes = json.loads(in_ns(*kubectl, "get", "nodes", "-o", "json", timeout=30).stdout)["items"]
                self._note("nodes_ready", {n["metadata"]["name"]: next((c["status"] for c in n["status"].get("conditions", [])
                                                                        if c["type"] == "Ready"), "?") for n in nodes})
            except Exception as exc:  # the API is down for a while during the upgrade: that is data too
                self._note("api", f"unreadable: {type(exc).__name__}")
            else:
                self._note("api", "ok")
            if time.monotonic() >= next_node:
                next_node = time.monotonic() + node_every
                for w in workers:
                    try:
                        proc = in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{w['address']}", script, check=False, timeout=60)
                    except subprocess.TimeoutExpired:  # a stalled node is data too; the record goes on
                        self._note(f"{w['name']}_dataplane", "unreadable (ssh timed out)")
                        continue
                    counts = proc.stdout.split()
                    self._note(f"{w['name']}_dataplane", dict(zip(("kube_proxy_endpoints", "reject_rule", "flannel_routes"), counts, strict=True))
                               if proc.returncode == 0 and len(counts) == 3 else f"unreadable (ssh exit {proc.returncode})")
            self._stop.wait(every)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.changes


def verify_rolling_upgrade(project: Project, raw: dict, nodes_cfg: list[dict], up, in_ns, kubeconfig: Path,
                           kubectl_bin: str, key: Path, t: Timings) -> None:
    """``versions.kubernetes`` UPGRADE_FROM -> UPGRADE_TO on the live stack (the lifecycle
    issue's rolling upgrade): the preview plans updates only, among them each worker's drain and
    uncordon; `pulumi up` changes the control plane first, then one worker at a time between its
    drain and its uncordon; every node and the API server report the new version; a Service
    probed once a second from every worker through the whole `pulumi up` failed no request; a
    preview after it is clean."""
    kubectl = [kubectl_bin, "--kubeconfig", str(kubeconfig)]
    masters = [n["name"] for n in nodes_cfg if n["role"] == "master"]
    workers = [n["name"] for n in nodes_cfg if n["role"] == "worker"]
    first, want = masters[0], f"v{UPGRADE_TO}"
    out: dict[str, object] = {"from": UPGRADE_FROM, "to": UPGRADE_TO}

    in_ns(*kubectl, "apply", "-f", "-", input=upgrade_workload(len(workers)))
    in_ns(*kubectl, "rollout", "status", f"deployment/{UPGRADE_WEB}", "--timeout=600s", timeout=660)
    ip = in_ns(*kubectl, "get", "service", UPGRADE_WEB, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    # By ClusterIP: what is measured is the Service, not CoreDNS (whose pods the drains move too).
    in_ns(*kubectl, "apply", "-f", "-", input=upgrade_probe(f"http://{ip}/"))
    in_ns(*kubectl, "rollout", "status", "daemonset/upgrade-probe", "--timeout=600s", timeout=660)

    def probe_lines() -> list[tuple[str, int, str]]:
        pods = json.loads(in_ns(*kubectl, "get", "pods", "-l", "app=upgrade-probe", "-o", "json").stdout)["items"]
        lines = []
        for p in pods:
            text = in_ns(*kubectl, "logs", p["metadata"]["name"], timeout=120).stdout
            for ln in text.splitlines():
                parts = ln.split(" ", 2)
                if len(parts) >= 2 and parts[0] in ("ok", "FAIL") and parts[1].isdigit():
                    lines.append((parts[0], int(parts[1]), p["spec"]["nodeName"] + ": " + ln))
        return lines

    deadline = time.monotonic() + 300
    while sum(1 for r in probe_lines() if r[0] == "ok") < 5 * len(workers):
        assert time.monotonic() < deadline, f"the probe never answered: {probe_lines()[-10:]}"
        time.sleep(5)

    newer = json.loads(json.dumps(raw))
    newer["versions"] = {**(newer.get("versions") or {}), "kubernetes": UPGRADE_TO}
    project.set_cluster(newer)
    ops, _ = diff_contract.planned_ops(project, f"versions.kubernetes {UPGRADE_TO}")
    out["planned"] = {op: sum(1 for v in ops.values() if v == op) for op in sorted(set(ops.values()))}
    out["planned_steps"] = sorted(ops)
    t["rolling_upgrade"] = out
    t.save()
    assert set(ops.values()) == {"update"}, f"the upgrade plans more than updates: {ops}"
    for w in workers:
        assert {f"{first}-drain-{w}", f"{first}-uncordon-{w}", f"{w}-kubelet", f"{w}-kube-proxy"} <= set(ops), sorted(ops)
    for m in masters:
        assert {f"{m}-kube-apiserver", f"{m}-kube-controller-manager", f"{m}-kube-scheduler"} <= set(ops), sorted(ops)
    assert not any(k.endswith("-etcd") or k.endswith("-containerd") for k in ops), sorted(ops)
    log(f"rolling upgrade to {UPGRADE_TO}: {out['planned']} planned")

    started = time.time()
    watch = UpgradeWatch(in_ns, kubectl, UPGRADE_WEB, [n for n in nodes_cfg if n["role"] == "worker"], key, node_every=30.0)
    try:
        out["up_s"], run = up("upgrade", timeout=5400)
    finally:
        out["dataplane"] = watch.stop()
        t["rolling_upgrade"] = out
        t.save()
    ended = time.time()
    times = run["times"]
    # The order: the control plane, then each worker between its drain and its uncordon, in turn.
    control = [times[f"{m}-{s}"] for m in masters for s in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")]
    previous_end, order = max(c[1] for c in control), []
    for w in workers:
        drain, uncordon, kubelet = times[f"{first}-drain-{w}"], times[f"{first}-uncordon-{w}"], times[f"{w}-kubelet"]
        assert drain[0] >= previous_end - 1, f"{w}'s drain started before the step before it ended: {drain} vs {previous_end}"
        assert drain[1] <= kubelet[0] and kubelet[1] <= uncordon[0], f"{w}: drain {drain}, kubelet {kubelet}, uncordon {uncordon}"
        order.append({"node": w, "drain_s": round(drain[1] - drain[0], 1), "steps_s": round(uncordon[0] - drain[1], 1),
                      "uncordon_s": round(uncordon[1] - uncordon[0], 1)})
        previous_end = uncordon[1]
    out["order"] = order

    nodes = json.loads(in_ns(*kubectl, "get", "nodes", "-o", "json").stdout)["items"]
    versions = {n["metadata"]["name"]: n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes}
    out["node_versions"] = versions
    server = json.loads(in_ns(*kubectl, "version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    out["apiserver_version"] = server
    cordoned = [n["metadata"]["name"] for n in nodes if n["spec"].get("unschedulable")]
    lines = [r for r in probe_lines() if started <= r[1] <= ended]
    failed = [r[2] for r in lines if r[0] == "FAIL"]
    took = [int(m.group(1)) for r in lines if r[0] == "ok" and (m := re.search(r" ms=(\d+)", r[2]))]
    out["probe"] = {"requests": len(lines), "failed": len(failed), "failures": failed,
                    # answered, but slower than 3 s (the probe waits 10 s before it calls a request failed)
                    "answered_over_3s": sum(1 for ms in took if ms > 3000), "slowest_ms": max(took, default=None),
                    # each run of failures on a node: first and last second, how many
                    "failed_spans": failure_spans([(r[2].split(":", 1)[0], r[1]) for r in lines if r[0] == "FAIL"])}
    out["steps"] = {k: [round(v[0] - started, 1), round(v[1] - started, 1)] for k, v in sorted(times.items(), key=lambda kv: kv[1][0])}
    t["rolling_upgrade"] = out
    t.save()
    assert set(versions.values()) == {want} and server == want, (versions, server)
    assert cordoned == [], f"still cordoned after the upgrade: {cordoned}"
    assert len(lines) >= 0.5 * len(workers) * (ended - started), f"the probe ran {len(lines)} times in {ended - started:.0f} s"
    # The preview first, so that a run with failed requests still says whether it is clean.
    proc = project.run("preview", "--expect-no-changes", check=False, timeout=1200)
    out["noop_preview_after_ok"] = proc.returncode == 0
    t.save()
    assert failed == [], f"{len(failed)} of {len(lines)} probe requests failed during the upgrade: {failed[:10]}"
    assert proc.returncode == 0, f"preview after the upgrade planned changes:\n{proc.stdout[-8000:]}"
    raw["versions"] = newer["versions"]  # the stack runs the new release from here on
    in_ns(*kubectl, "delete", "daemonset/upgrade-probe", f"deployment/{UPGRADE_WEB}", f"service/{UPGRADE_WEB}",
          f"pdb/{UPGRADE_WEB}", "--wait=true", "--timeout=300s", timeout=360)
    log(f"rolling upgrade: {out['up_s']} s, every node {want}, {len(lines)} probe requests, {len(failed)} failed")


def spread_deployment(replicas: int) -> str:
    """A Deployment that puts at most one more pod on a node than on any other (hard spread by
    hostname), behind a PodDisruptionBudget that lets a drain evict one pod at a time."""
    labels = {"app": SPREAD}
    return yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": SPREAD},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                      "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": labels}}],
                      "containers": [{"name": "netcheck", "image": "kubelab.local/netcheck:e2e", "args": ["serve"],
                                      "imagePullPolicy": "IfNotPresent",
                                      "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]}}}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": SPREAD},
         "spec": {"minAvailable": replicas - 1, "selector": {"matchLabels": labels}}},
    ])


def verify_scaling(project: Project, raw: dict, nodes_cfg: list[dict], up, in_ns, kubeconfig: Path, kubectl_bin: str,
                   lab, t: dict) -> None:
    """``workers.count`` 2 -> 3 -> 2 on the live stack (the lifecycle issue's scaling e2e).

    Up: the preview plans creates for the new node only, plus the two named shared steps (the
    diff contract's ``workers.count + 1`` row); the up touches exactly what was planned; the new
    node joins Ready and takes pods. Down: the preview plans the exact mirror (deletes of every
    resource the up created, the shared ``cluster-ready`` updated); the up drains the node
    (respecting a PodDisruptionBudget) and deletes its Node object before its machine goes; the
    pods run on the remaining workers; nothing of the node is left in libvirt or the cluster."""
    scale_case = next(c for c in diff_contract.CASES if c.change.startswith("`workers.count`"))
    bigger = json.loads(json.dumps(raw))
    scale_case.mutate(bigger)
    new = f"worker-{bigger['workers']['count']}"
    first = nodes_cfg[0]["name"]
    kubectl = [kubectl_bin, "--kubeconfig", str(kubeconfig)]

    def plan(cluster: dict) -> tuple[dict[str, str], dict[str, str]]:
        project.set_cluster(cluster)
        return diff_contract.planned_ops(project, f"workers.count {cluster.get('workers', {}).get('count')}")

    # --- 2 -> 3 -------------------------------------------------------------------------------
    try:
        ops_up, custom_up = plan(bigger)
        want = diff_contract.expected_ops(scale_case, raw, nodes_cfg, ops_up)
        assert ops_up == want, f"scale-up preview planned {ops_up}, expected {want}"
        t["scale_up_planned"] = len(ops_up)
        log(f"scale up to 3 workers: {len(ops_up)} planned ({sum(v == 'create' for v in ops_up.values())} creates)")
        took, run = up("scale-up")
    except BaseException:
        project.set_cluster(raw)
        raise
    t["scale_up_s"] = took
    did = touched(run["times"])
    assert did == custom_up, f"scale-up touched {did}, planned {custom_up}"
    in_ns(*kubectl, "wait", "--for=condition=Ready", f"node/{new}", "--timeout=600s", timeout=660)
    in_ns(*kubectl, "apply", "-f", "-", input=spread_deployment(3))
    in_ns(*kubectl, "rollout", "status", f"deployment/{SPREAD}", "--timeout=600s", timeout=660)
    pods = json.loads(in_ns(*kubectl, "get", "pods", "-l", f"app={SPREAD}", "-o", "json").stdout)["items"]
    spread = sorted(p["spec"]["nodeName"] for p in pods)
    workers_now = sorted([*(n["name"] for n in nodes_cfg if n["runs_workloads"]), new])
    assert spread == workers_now, f"{SPREAD} pods on {spread}, expected one on each of {workers_now}"
    t.save()
    log(f"{new} joined Ready in {took} s; {SPREAD} pods on {spread}")

    # --- 3 -> 2 -------------------------------------------------------------------------------
    ops_down, custom_down = plan(raw)
    mirror = {k: "delete" for k, v in ops_up.items() if v == "create"}
    mirror.update({k: v for k, v in ops_up.items() if v != "create"})  # cluster-ready lists the nodes again
    assert ops_down == mirror, f"scale-down preview planned {ops_down}, expected {mirror}"
    t["scale_down_planned"] = len(ops_down)
    log(f"scale down to 2 workers: {len(ops_down)} planned ({sum(v == 'delete' for v in ops_down.values())} deletes)")
    took, run = up("scale-down")
    t["scale_down_s"] = took
    times = run["times"]
    did = touched(times)
    assert did == custom_down, f"scale-down touched {did}, planned {custom_down}"
    removal = times[f"{first}-remove-node-{new}"]
    assert removal[1] <= times[new][0], f"{new}'s machine went before it was drained: {removal} vs {times[new]}"
    names = sorted(n["metadata"]["name"] for n in json.loads(in_ns(*kubectl, "get", "nodes", "-o", "json").stdout)["items"])
    assert names == sorted(n["name"] for n in nodes_cfg if n["runs_workloads"]), f"registered after scale-down: {names}"
    in_ns(*kubectl, "rollout", "status", f"deployment/{SPREAD}", "--timeout=600s", timeout=660)
    pods = json.loads(in_ns(*kubectl, "get", "pods", "-l", f"app={SPREAD}", "-o", "json").stdout)["items"]
    moved = sorted(p["spec"].get("nodeName", "") for p in pods if p["metadata"].get("deletionTimestamp") is None)
    assert len(moved) == 3 and new not in moved, f"{SPREAD} pods after scale-down: {moved}"
    left = [x for x in leftovers(lab, NAME) if new in x]
    assert left == [], f"{new} left behind: {left}"
    proc = project.run("preview", "--expect-no-changes", check=False, timeout=1200)
    assert proc.returncode == 0, f"preview after the scale-down planned changes:\n{proc.stdout[-8000:]}"
    in_ns(*kubectl, "delete", "deployment,poddisruptionbudget", SPREAD, "--wait=true", timeout=300)
    t["scaling"] = {"new_node": new, "up_planned": ops_up, "down_planned": ops_down, "pods_after_up": spread,
                    "pods_after_down": moved, "drained_before_machine_s": round(times[new][0] - removal[1], 1)}
    t.save()
    log(f"{new} drained, its Node deleted, then its machine: {took} s; {SPREAD} pods now on {moved}")


def verify_cluster(in_ns, kubeconfig: Path, kubectl_bin: str, nodes_cfg: list[dict], api: str, pre: dict[str, Path],
                   tmp: Path, service_cidr: str) -> None:
    """Nodes Ready; a pod per worker from a local image; flannel, Service and DNS; anonymous refused."""

    def kubectl(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
        proc = in_ns(kubectl_bin, "--kubeconfig", str(kubeconfig), *args, check=False, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc.stdout

    # --- every node Ready, through the exported kubeconfig --------------------------------
    nodes = json.loads(kubectl("get", "nodes", "-o", "json"))["items"]
    workload = [n["name"] for n in nodes_cfg if n["runs_workloads"]]
    assert sorted(n["metadata"]["name"] for n in nodes) == sorted(workload)
    for n in nodes:
        cond = {c["type"]: c["status"] for c in n["status"]["conditions"]}
        assert cond["Ready"] == "True", n["metadata"]["name"]
    log("nodes Ready: " + ", ".join(workload))

    # --- every node that is not a master reaches the API through its own load balancer ------
    key = str(pre["key"])
    for n in nodes_cfg:
        if n["role"] != "master":
            script = ("set -e; systemctl is-active kubelab-apiserver-lb; "
                      "sudo grep -h '^ *server:' /var/lib/kubelet/kubeconfig /var/lib/kube-proxy/kubeconfig; "
                      "sudo curl -sS --cacert /etc/kubelab/apiserver-lb/ca.crt --cert /etc/kubelab/apiserver-lb/healthcheck.pem "
                      "https://127.0.0.1:6443/readyz; echo")
            out = in_ns("ssh", *SSH_OPTS, "-i", key, f"kubelab@{n['address']}", script).stdout.split()
            assert out == ["active", "server:", "https://127.0.0.1:6443", "server:", "https://127.0.0.1:6443", "ok"], \
                f"{n['name']}: {out}"
    log("every worker's kubelet and kube-proxy go through its node-local load balancer")

    # --- a pod on each worker, its image only in the private registry ----------------------
    for n in nodes_cfg:
        if n["runs_workloads"]:
            listed = in_ns("ssh", *SSH_OPTS, "-i", key, f"kubelab@{n['address']}",
                           "sudo /usr/local/bin/ctr -n k8s.io images ls -q").stdout
            assert "netcheck" not in listed, f"{n['name']} has the test image before any pod pulled it:\n{listed}"
    pods = []
    for i, node in enumerate(workload[:2] if len(workload) >= 2 else workload * 2):
        pods.append(f"netcheck-{i}")
        kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"netcheck-{i}", "labels": {"app": "netcheck"}},
            "spec": {"nodeName": node, "containers": [{
                "name": "netcheck", "image": "kubelab.local/netcheck:e2e", "imagePullPolicy": "IfNotPresent",
                "args": ["serve"], "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]}}))
    kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "netcheck"},
        "spec": {"selector": {"app": "netcheck"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
    kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=netcheck", "--timeout=600s", timeout=660)
    ips = {p: kubectl("get", "pod", p, "-o", "jsonpath={.status.podIP}") for p in pods}
    log(f"pods Ready: {ips}")

    # --- pod to pod across nodes (flannel), pod to Service, DNS (CoreDNS) ----------------
    out = kubectl("exec", pods[0], "--", "/netcheck", "get", f"http://{ips[pods[1]]}:8080/")
    assert f"hello from {pods[1]}" in out
    out = kubectl("exec", pods[1], "--", "/netcheck", "get", f"http://{ips[pods[0]]}:8080/")
    assert f"hello from {pods[0]}" in out
    svc_ip = kubectl("get", "svc", "netcheck", "-o", "jsonpath={.spec.clusterIP}")
    out = kubectl("exec", pods[0], "--", "/netcheck", "get", f"http://{svc_ip}/")
    assert "hello from netcheck-" in out
    out = kubectl("exec", pods[0], "--", "/netcheck", "lookup", "netcheck.default.svc.cluster.local")
    assert svc_ip in out
    out = kubectl("exec", pods[1], "--", "/netcheck", "lookup", "kubernetes.default")
    assert service_cidr.rsplit(".", 1)[0] in out
    log("pod-to-pod, pod-to-service and DNS work")

    # --- anonymous requests are refused ---------------------------------------------------
    master, worker = nodes_cfg[0]["address"], next(n["address"] for n in nodes_cfg if n["runs_workloads"])
    code = in_ns("curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", f"{api}/api/v1/namespaces").stdout
    assert code in ("401", "403"), f"apiserver answered {code} to an anonymous request"
    code = in_ns("curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", f"https://{worker}:10250/pods").stdout
    assert code == "401", f"kubelet answered {code} to an anonymous request"
    etcd = in_ns("curl", "-sk", "--max-time", "10", f"https://{master}:2379/version", check=False)
    assert etcd.returncode != 0 and "etcd" not in etcd.stdout, "etcd answered without a client certificate"
    log("anonymous apiserver/kubelet/etcd refused")


def verify_registry(in_ns, kubeconfig: Path, url: str, nodes_cfg: list[dict], tmp: Path) -> None:
    """The private registry: TLS from the cluster CA, holds the bundle's images and the preloaded
    test image, refuses plain HTTP and refuses writes from the network."""
    master = next(n for n in nodes_cfg if n["role"] == "master")
    assert url == f"https://{master['address']}:5000", url
    ca = tmp / "cluster-ca.crt"
    cluster = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]
    ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    catalog = json.loads(in_ns("curl", "-sf", "--cacert", str(ca), f"{url}/v2/_catalog").stdout)["repositories"]
    for repo in ("kubelab.local/netcheck", "registry.k8s.io/coredns/coredns", "registry.k8s.io/pause"):
        assert repo in catalog, catalog
    plain = in_ns("curl", "-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://{master['address']}:5000/v2/_catalog", check=False).stdout
    assert plain != "200", "the registry answered plain HTTP"
    write = in_ns("curl", "-s", "--cacert", str(ca), "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}",
                  f"{url}/v2/kubelab.local/intruder/blobs/uploads/", check=False).stdout
    assert not write.startswith("2"), f"the registry accepted a push from the network ({write})"
    log(f"registry {url}: {len(catalog)} repositories over TLS; plain HTTP answered {plain}, a push {write}")


def verify_dashboard(in_ns, kubeconfig: Path, kubectl_bin: str) -> None:
    """The Dashboard's objects as the real API server holds them (its images are not available
    here, so its pods cannot run), and a login account that may read and not write."""
    kubectl = [kubectl_bin, "--kubeconfig", str(kubeconfig), "-n", "kubernetes-dashboard"]
    in_ns(*kubectl, "get", "deployment/kubernetes-dashboard", "deployment/dashboard-metrics-scraper",
          "service/kubernetes-dashboard", "serviceaccount/kubelab-dashboard-login")
    login = "system:serviceaccount:kubernetes-dashboard:kubelab-dashboard-login"
    assert in_ns(*kubectl, "auth", "can-i", "list", "pods", "--all-namespaces", f"--as={login}", check=False).stdout.strip() == "yes"
    assert in_ns(*kubectl, "auth", "can-i", "delete", "pods", f"--as={login}", check=False).stdout.strip() == "no"
    token = in_ns(*kubectl, "create", "token", "kubelab-dashboard-login").stdout.strip()
    assert token.count(".") == 2, "no token for the Dashboard login account"
    log("Dashboard applied; its login account reads and may not write")


def verify_security(in_ns, kubeconfig: Path, kubectl_bin: str, master: str, key: Path, etcd_prefix: str) -> None:
    """etcd auth: flannel's key (on every node) reads flannel's prefix and nothing else. The
    audit log records a Secret's metadata and never its data."""

    def on_master(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{master}", cmd, check=check, timeout=120)

    def etcd_get(args: str) -> subprocess.CompletedProcess[str]:
        """etcdctl as flannel; asked again when etcd is slow rather than saying no (measured in
        the 3-master run under TCG, right after a member came back: the first get exited 1)."""
        for _ in range(6):
            proc = on_master(f"{etcdctl} {args}", check=False)
            if "deadline exceeded" not in proc.stderr and "timed out" not in proc.stderr:
                break
            time.sleep(10)
        return proc

    etcdctl = ("sudo ETCDCTL_API=3 /usr/local/bin/etcdctl --endpoints=https://127.0.0.1:2379 --cacert=/etc/etcd/pki/ca.crt "
               "--cert=/etc/flannel/pki/etcd-client.crt --key=/etc/flannel/pki/etcd-client.key --command-timeout=30s")
    ok = etcd_get(f"get {etcd_prefix}/config --print-value-only")
    assert ok.returncode == 0 and '"Network"' in ok.stdout, ok.stdout + ok.stderr
    denied = etcd_get("get /registry/secrets/ --prefix --keys-only")
    assert denied.returncode != 0 and "permission denied" in denied.stderr, denied.stdout + denied.stderr
    assert "/registry/secrets" not in denied.stdout
    log("etcd: flannel's key reads its prefix, and is refused the cluster's Secrets")

    marker = f"kubelab-e2e-{os.getpid()}-do-not-log"
    secret = in_ns(kubectl_bin, "--kubeconfig", str(kubeconfig), "create", "secret", "generic", "e2e-audit-probe",
                   f"--from-literal=token={marker}", check=False)
    assert secret.returncode == 0, secret.stderr
    audit = on_master("sudo cat /var/log/kubernetes/audit.log").stdout
    assert "e2e-audit-probe" in audit, "the audit log does not record Secret writes"
    assert marker not in audit and base64.b64encode(marker.encode()).decode() not in audit, "a Secret's data is in the audit log"
    log("audit log records the Secret's metadata, not its data")


WEBHOOK_NS = "e2e-webhook"


def verify_backup_restore(project: Project, in_ns, kubeconfig: Path, kubectl_bin: str, nodes_cfg: list[dict],
                          key: Path, t: Timings) -> None:
    """``make etcd-backup`` / ``make etcd-restore``'s tool against the live stack: a ConfigMap
    made, a snapshot taken, the ConfigMap deleted, the snapshot restored: it is back and every
    node is Ready. Records the snapshot's size and the time each part took."""
    kubectl = [kubectl_bin, "--kubeconfig", str(kubeconfig)]
    master = next(n for n in nodes_cfg if n["role"] == "master")

    def etcd_ops(action: str) -> float:
        t0 = time.monotonic()
        proc = subprocess.run([*project.prefix, str(REPO / ".venv/bin/python"), str(REPO / "tools/etcd_ops.py"), action,
                               "--stack", project.stack], cwd=project.dir, env=project.env, capture_output=True,
                              text=True, timeout=1200, check=False)
        assert proc.returncode == 0, f"etcd_ops.py {action} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        return round(time.monotonic() - t0, 1)

    timer = in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{master['address']}",
                  "systemctl is-active etcd-backup.timer", check=False).stdout.strip()
    assert timer == "active", f"etcd-backup.timer on {master['name']}: {timer}"
    in_ns(*kubectl, "-n", "default", "create", "configmap", "kubelab-restore-probe", "--from-literal=before=backup")
    t["etcd_backup_s"] = etcd_ops("backup")
    size = in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{master['address']}",
                 f"sudo -n sh -c 'stat -c %s $(ls -1t {BackupConfig.directory}/etcd-*.db | head -n 1)'").stdout
    t["etcd_backup_bytes"] = int(size.strip())
    in_ns(*kubectl, "-n", "default", "delete", "configmap", "kubelab-restore-probe")
    t0 = time.monotonic()
    t["etcd_restore_s"] = etcd_ops("restore")
    deadline = time.monotonic() + 900
    while in_ns(*kubectl, "-n", "default", "get", "configmap", "kubelab-restore-probe", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the ConfigMap did not come back after the restore"
        time.sleep(5)
    # Every watch in the cluster re-lists after the restore (the revision was bumped), so the
    # API server is briefly swamped: on seed 000's master, which also runs pods, `kubectl wait`
    # itself failed on a TLS handshake timeout. Ask again until the deadline; say why at the end.
    while True:
        proc = in_ns(*kubectl, "wait", "--for=condition=Ready", "nodes", "--all", "--timeout=60s", check=False, timeout=120)
        if proc.returncode == 0:
            break
        if time.monotonic() > deadline:
            nodes = in_ns(*kubectl, "get", "nodes", "-o", "wide", check=False)
            raise AssertionError(f"nodes not Ready after the restore: {proc.stderr}{proc.stdout}\n{nodes.stdout}{nodes.stderr}")
        time.sleep(5)
    t["etcd_restore_to_ready_s"] = round(time.monotonic() - t0, 1)
    t.save()
    log(f"etcd snapshot {t['etcd_backup_bytes']} bytes in {t['etcd_backup_s']} s; restored in {t['etcd_restore_s']} s, "
        f"ConfigMap back and nodes Ready after {t['etcd_restore_to_ready_s']} s")


def verify_control_plane_reaches_services(in_ns, kubeconfig: Path, kubectl_bin: str, nodes_cfg: list[dict],
                                          tmp: Path, checks: dict[str, bool]) -> None:
    """The API server reaches Services: a validating webhook behind a Service (its own CA), the
    metrics.k8s.io aggregated API (metrics-server), and ``kubectl top nodes``. Each result is a
    named boolean in ``checks``; a failure names the piece that failed and shows its state."""

    def kubectl(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = in_ns(kubectl_bin, "--kubeconfig", str(kubeconfig), *args, check=False, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc

    def state(*cmds: tuple[str, ...]) -> str:
        return "\n".join(f"$ kubectl {' '.join(c)}\n{(p := kubectl(*c, check=False)).stdout}{p.stderr}" for c in cmds)

    # --- a validating webhook behind a Service, TLS from its own CA -------------------------
    svc = "netcheck-webhook"
    dns = f"{svc}.{WEBHOOK_NS}.svc"
    openssl = ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run([*openssl, "-x509", "-days", "2", "-keyout", str(tmp / "wh-ca.key"), "-out", str(tmp / "wh-ca.crt"),
                    "-subj", "/CN=kubelab-e2e-webhook-ca"], check=True, capture_output=True)
    subprocess.run([*openssl, "-keyout", str(tmp / "wh.key"), "-out", str(tmp / "wh.csr"), "-subj", f"/CN={dns}"],
                   check=True, capture_output=True)
    (tmp / "wh.ext").write_text(f"subjectAltName=DNS:{dns}\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(tmp / "wh.csr"), "-CA", str(tmp / "wh-ca.crt"), "-CAkey",
                    str(tmp / "wh-ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(tmp / "wh.ext"),
                    "-out", str(tmp / "wh.crt")], check=True, capture_output=True)
    kubectl("create", "namespace", WEBHOOK_NS)
    kubectl("label", "namespace", WEBHOOK_NS, "kubelab.io/e2e=webhook")
    kubectl("-n", WEBHOOK_NS, "create", "secret", "tls", "webhook-tls", "--cert", str(tmp / "wh.crt"), "--key", str(tmp / "wh.key"))
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": svc, "namespace": WEBHOOK_NS, "labels": {"app": svc}},
         "spec": {"containers": [{"name": "webhook", "image": "kubelab.local/netcheck:e2e", "imagePullPolicy": "IfNotPresent",
                                  "args": ["webhook", "/tls/tls.crt", "/tls/tls.key"], "ports": [{"containerPort": 8443}],
                                  "readinessProbe": {"tcpSocket": {"port": 8443}},
                                  "volumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}]}],
                  "volumes": [{"name": "tls", "secret": {"secretName": "webhook-tls"}}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc, "namespace": WEBHOOK_NS},
         "spec": {"selector": {"app": svc}, "ports": [{"port": 443, "targetPort": 8443}]}}]))
    kubectl("-n", WEBHOOK_NS, "wait", "--for=condition=Ready", f"pod/{svc}", "--timeout=300s", timeout=330)
    kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "kubelab-e2e-deny-labelled"},
        "webhooks": [{"name": "deny-labelled.kubelab.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Fail", "timeoutSeconds": 10,
                      "namespaceSelector": {"matchLabels": {"kubelab.io/e2e": "webhook"}},
                      "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
                      "clientConfig": {"service": {"name": svc, "namespace": WEBHOOK_NS, "path": "/validate", "port": 443},
                                       "caBundle": base64.b64encode((tmp / "wh-ca.crt").read_bytes()).decode()}}]}))
    denied = allowed = None
    for attempt in range(20):  # the webhook configuration reaches the API server's cache in a few seconds
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"labelled-{attempt}", "namespace": WEBHOOK_NS,
                                                                      "labels": {"kubelab.io/deny": "true"}}}
        denied = kubectl("create", "-f", "-", check=False, input=yaml.safe_dump(cm))
        if denied.returncode != 0 and "netcheck webhook denies" in denied.stderr:
            break
        time.sleep(3)
    allowed = kubectl("-n", WEBHOOK_NS, "create", "configmap", "unlabelled", "--from-literal=a=b", check=False)
    checks["webhook"] = bool(denied is not None and denied.returncode != 0 and "netcheck webhook denies" in denied.stderr
                             and allowed.returncode == 0)
    assert checks["webhook"], (
        f"webhook: labelled ConfigMap -> {denied.stderr if denied else ''}{denied.stdout if denied else ''}; "
        f"unlabelled -> {allowed.stderr}\nthe webhook Service and its pod:\n"
        + state(("-n", WEBHOOK_NS, "get", "svc,endpointslices,pods", "-o", "wide"), ("-n", WEBHOOK_NS, "logs", svc, "--tail=30")))
    log("validating webhook behind a Service: labelled ConfigMap denied, unlabelled admitted")

    # --- the metrics.k8s.io aggregated API and kubectl top ----------------------------------
    workload = sorted(n["name"] for n in nodes_cfg if n["runs_workloads"])
    got: list[str] = []
    proc = None
    for _ in range(60):  # metrics-server has a node's first sample after one scrape (15 s)
        proc = kubectl("get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes", check=False)
        if proc.returncode == 0:
            got = sorted(i["metadata"]["name"] for i in json.loads(proc.stdout).get("items", []))
            if got == workload:
                break
        time.sleep(5)
    checks["aggregated_api"] = got == workload
    why = state(("get", "apiservice", "v1beta1.metrics.k8s.io", "-o", "jsonpath={.status.conditions}"),
                ("-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=metrics-server", "-o", "wide"),
                ("-n", "kube-system", "logs", "deployment/metrics-server", "--tail=30"))
    assert checks["aggregated_api"], f"aggregated API: nodes {got}, want {workload}; {proc.stderr if proc else ''}\n{why}"
    top = kubectl("top", "nodes", "--no-headers", check=False)
    listed = sorted(line.split()[0] for line in top.stdout.splitlines() if line.strip())
    checks["kubectl_top"] = top.returncode == 0 and listed == workload
    assert checks["kubectl_top"], f"kubectl top nodes: {top.stdout}{top.stderr}\n{why}"
    log(f"metrics.k8s.io answers through the API server; kubectl top nodes lists {listed}")


def _nodes(raw: dict) -> list[dict]:
    """The nodes and addresses the config will produce (same rules as components.config)."""
    from components.config import parse_cluster_config

    cfg = parse_cluster_config(raw, "e2e")
    return [{"name": n.name, "role": n.role, "address": n.address, "runs_workloads": n.runs_workloads} for n in cfg.nodes]
