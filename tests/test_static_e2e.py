"""Existing hosts, end to end: plain VMs made with virsh (outside Pulumi) become a Ready
cluster through a ``static`` stack; ``pulumi destroy`` removes Kubernetes from them (services
stopped, files removed) and leaves the machines running. Marker ``e2e``."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.plain_vms import PlainVm, create, destroy, running, wait_ssh
from tests.pulumi_support import REPO, STATIC, Project, toolchain_bin
from tests.test_e2e import SSH_OPTS, Timings, log, prerequisites  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(REPO / "lab"))

NETWORK = "kubelab-static"
GATEWAY = "10.242.0.1"
VMS = [PlainVm("svr001", "10.242.0.11"), PlainVm("svr002", "10.242.0.12"), PlainVm("svr003", "10.242.0.13")]


def test_static_hosts_end_to_end(tmp_path, prerequisites):  # noqa: F811
    from harness import Lab

    toolchain_bin(STATIC)  # this one drives pulumi: skip before booting anything when it can't run
    t = Timings(passed=False, topology="static")
    lab = Lab(state_file=tmp_path / "lab-state.json")
    lab.up()
    key = prerequisites["key"]
    prefix = lab.exec_prefix()

    def ssh(vm: PlainVm, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, "ssh", *SSH_OPTS, "-i", str(key), f"kubelab@{vm.address}", cmd],
                              capture_output=True, text=True, check=check, timeout=120)

    project = None
    try:
        destroy(VMS, NETWORK)  # whatever an earlier run cut short left defined (a no-op otherwise)
        create(VMS, NETWORK, GATEWAY, prerequisites["image"], tmp_path, key.with_suffix(".pub").read_text().strip())
        t["vm_boot_to_ssh_s"] = round(wait_ssh(VMS, key, prefix), 1)
        log(f"plain VMs answer on SSH after {t['vm_boot_to_ssh_s']} s")
        hosts = []
        for vm, role in zip(VMS, ("master", "worker", "worker"), strict=True):
            scan = subprocess.run([*prefix, "ssh-keyscan", "-t", "ed25519", vm.address], capture_output=True, text=True, check=True)
            host_key = scan.stdout.split(None, 1)[1].strip()  # pinned on every connection
            hosts.append({"name": vm.name, "address": vm.address, "role": role, "user": "kubelab", "host_key": host_key})
        cluster = {"name": "kubelab-static", "platform": "static",
                   "network": {"node_cidr": "10.242.0.0/24", "etcd_prefix": "/kube/network"},
                   "ssh": {"private_key_file": str(key)}, "static": {"hosts": hosts}}
        project = Project(tmp_path, "static", cluster, prefix=prefix, providers=STATIC)
        t0 = time.monotonic()
        project.run("up", "--yes", "--skip-preview", timeout=3600)
        t["up_total_s"] = round(time.monotonic() - t0, 1)
        log(f"static up in {t['up_total_s']} s")

        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(project.run("stack", "output", "kubeconfig", "--show-secrets", "--stack", "static").stdout)
        kubectl = [*prefix, str(prerequisites["bundle"] / "bin/kubectl"), "--kubeconfig", str(kubeconfig)]
        nodes = json.loads(subprocess.run([*kubectl, "get", "nodes", "-o", "json"], capture_output=True, text=True,
                                          check=True).stdout)["items"]
        ready = {n["metadata"]["name"]: {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"] for n in nodes}
        assert ready == {"svr002": "True", "svr003": "True"}

        t0 = time.monotonic()
        project.run("destroy", "--yes", "--skip-preview", timeout=1800)
        t["destroy_s"] = round(time.monotonic() - t0, 1)
        project = None
        for vm in VMS:
            assert running(vm), f"{vm.name} must keep running after destroy"
            for unit in ("etcd", "kube-apiserver", "kubelet", "containerd", "flanneld", "kube-proxy"):
                state = ssh(vm, f"systemctl is-active {unit}", check=False).stdout.strip()
                assert state in ("inactive", "unknown", ""), f"{vm.name}: {unit} is {state}"
            left = ssh(vm, "ls /usr/local/bin /etc/kubernetes /etc/etcd /var/lib/etcd /etc/systemd/system/kubelet.service "
                           "/etc/systemd/system/etcd.service 2>/dev/null | grep -v ':$' || true").stdout.split()
            assert left == [], f"{vm.name}: left behind {left}"
        t["passed"] = True
        log("static destroy removed Kubernetes and left the machines running")
    finally:
        if project is not None:
            project.run("destroy", "--yes", "--skip-preview", check=False, timeout=1800)
        destroy(VMS, NETWORK)
        lab.down()
        print(f"\nstatic e2e: {json.dumps(dict(t))}")
