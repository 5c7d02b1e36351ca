"""Bootstrap replay on real VMs (marker ``e2e``; needs the node bundle and the base image,
not the Pulumi providers): plain VMs from virsh get the program's real remote steps, in the
program's dependency order, and must become a working cluster; a second replay must succeed
unchanged (idempotent scripts); the teardown must remove Kubernetes and keep the machines.
See tests/replay.py for what this stands in for."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.mockrun import run_program
from tests.plain_vms import PlainVm, create, destroy, running, wait_ssh
from tests.pulumi_support import REAL_CACHE, REPO
from tests.replay import Replayer
from tests.test_e2e import SSH_OPTS, Timings, log, prerequisites, verify_cluster  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(REPO / "lab"))

NETWORK = "kubelab-replay"
GATEWAY = "10.243.0.1"
UNITS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "flanneld", "containerd", "kubelet", "kube-proxy")
VMS = [PlainVm("svr001", "10.243.0.11"), PlainVm("svr002", "10.243.0.12"), PlainVm("svr003", "10.243.0.13")]


def test_bootstrap_replay_on_real_vms(tmp_path, prerequisites, monkeypatch):  # noqa: F811
    from harness import Lab

    import tests.test_e2e as e2e

    monkeypatch.setattr(e2e, "TIMINGS", REPO / ".e2e" / "replay-timings.json")
    t = Timings(passed=False, topology="replay-1+2")
    t.save()
    lab = Lab(state_file=tmp_path / "lab-state.json")
    lab.up()
    key = prerequisites["key"]
    prefix = lab.exec_prefix()

    def in_ns(*cmd: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=check, timeout=timeout, input=input)

    def ssh(vm: PlainVm, cmd: str) -> str:
        return in_ns("ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{vm.address}", cmd, check=False).stdout

    try:
        create(VMS, NETWORK, GATEWAY, prerequisites["image"], tmp_path, key.with_suffix(".pub").read_text().strip(),
               memory_mib=2560)
        t["vm_boot_to_ssh_s"] = round(wait_ssh(VMS, key, prefix), 1)
        log(f"plain VMs answer on SSH after {t['vm_boot_to_ssh_s']} s")
        hosts = []
        for vm, role in zip(VMS, ("master", "worker", "worker"), strict=True):
            scan = in_ns("ssh-keyscan", "-t", "ed25519", vm.address)
            hosts.append({"name": vm.name, "address": vm.address, "role": role, "user": "kubelab",
                          "host_key": scan.stdout.split(None, 1)[1].strip()})
        raw = {"name": "kubelab-replay", "platform": "static",
               "network": {"node_cidr": "10.243.0.0/24", "etcd_prefix": "/kube/network"},
               "ssh": {"private_key_file": str(key)}, "static": {"hosts": hosts}}
        with monkeypatch.context() as mp:
            mp.setenv("KUBELAB_CACHE", str(REAL_CACHE))
            graph = run_program(raw, stack="replay", real_pki=True)
        replay = Replayer(graph, prefix, tmp_path)

        t0 = time.monotonic()
        replay.up()
        t["up_total_s"] = round(time.monotonic() - t0, 1)
        ready = [v for k, v in replay.times.items() if k.endswith("-cluster-ready")]
        t["up_to_ready_s"] = round(ready[0][1] - t0, 1)
        t["uploaded_bytes_per_node"] = replay.bytes_per_host
        t["step_seconds"] = {k: round(e - s, 1) for k, (s, e) in sorted(replay.times.items(), key=lambda kv: kv[1][0])}
        t["nodes"] = len(VMS)
        t.save()
        log(f"replayed bootstrap in {t['up_total_s']} s")

        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(graph.stack_outputs["kubeconfig"])
        nodes_cfg = [{"name": h["name"], "address": h["address"], "runs_workloads": h["role"] == "worker"} for h in hosts]
        verify_cluster(in_ns, kubeconfig, str(prerequisites["bundle"] / "bin/kubectl"), nodes_cfg,
                       graph.stack_outputs["apiserverUrl"], prerequisites, tmp_path, "10.32.0.0/24")

        t0 = time.monotonic()
        again = Replayer(graph, prefix, tmp_path)
        again.up()
        t["rerun_s"] = round(time.monotonic() - t0, 1)
        log(f"second replay (idempotent re-run) in {t['rerun_s']} s")
        out = in_ns(str(prerequisites["bundle"] / "bin/kubectl"), "--kubeconfig", str(kubeconfig), "get", "nodes", "-o", "json")
        assert all({c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"] == "True"
                   for n in json.loads(out.stdout)["items"])

        t0 = time.monotonic()
        replay.destroy()
        t["destroy_s"] = round(time.monotonic() - t0, 1)
        for vm in VMS:
            assert running(vm), f"{vm.name} must keep running"
            active = ssh(vm, "systemctl is-active " + " ".join(UNITS) + " || true").split()
            assert set(active) <= {"inactive", "unknown"}, f"{vm.name}: {active}"
            left = ssh(vm, "sudo find /usr/local/bin /opt/cni /var/lib/kubelab /var/lib/etcd /var/lib/kubelet /etc/kubernetes "
                           "/etc/etcd /etc/flannel /etc/containerd -mindepth 1 2>/dev/null; for u in " + " ".join(UNITS) +
                           "; do test -e /etc/systemd/system/$u.service && echo $u.service; done; true")
            assert left.split() == [], f"{vm.name} still has: {left}"
        t["passed"] = True
        log("replay passed: cluster worked, re-run was clean, teardown removed everything")
    finally:
        destroy(VMS, NETWORK)
        lab.down()
        t.save()
        print(f"\nreplay timings: {json.dumps({k: v for k, v in t.items() if k != 'step_seconds'})}")
