"""``tools/etcd_ops.py`` (``make etcd-backup`` / ``make etcd-restore``) against a fake ``pulumi``
and a fake ``ssh`` on PATH, with the CLI's real JSON shapes. The e2e runs it for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.pulumi_support import REPO

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKubelabTestKeyOnly"


def _run(tmp_path: Path, cluster: dict, nodes: list[dict], *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    fake = tmp_path / "bin"
    fake.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"value": json.dumps(cluster), "objectValue": cluster, "secret": False}))
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    (fake / "pulumi").write_text(f'#!/bin/sh\ncase "$*" in\n  "stack output nodes"*) cat {tmp_path}/nodes.json;;\n'
                                 f'  "config get kubelab:cluster"*) cat {tmp_path}/config.json;;\n  *) exit 9;;\nesac\n')
    log = tmp_path / "ssh.log"
    (fake / "ssh").write_text(f'#!/bin/sh\nfor a; do printf "%s\\n" "$a"; done >>{log}\n'
                              f'for a; do case "$a" in UserKnownHostsFile=*) cat "${{a#UserKnownHostsFile=}}" >>{log};; esac; done\n'
                              f'echo "---" >>{log}\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    proc = subprocess.run([sys.executable, str(REPO / "tools/etcd_ops.py"), *args, "--stack", "lab"], capture_output=True,
                          text=True, check=False, timeout=60, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    return proc, (log.read_text().split("---\n") if log.exists() else [])


def _node(name: str, role: str, address: str) -> dict:
    return {"name": name, "role": role, "address": address, "privateAddress": address, "hostKey": HOST_KEY}


def test_backup_runs_the_timers_service_on_every_master_with_pinned_host_keys(tmp_path, config_for):
    nodes = [_node("master-1", "master", "10.240.0.11"), _node("master-2", "master", "10.240.0.12"),
             _node("worker-1", "worker", "10.240.0.21")]
    proc, calls = _run(tmp_path, config_for("libvirt"), nodes, "backup")
    assert proc.returncode == 0, proc.stderr
    calls = [c for c in calls if c]
    assert len(calls) == 2  # masters only
    for call, address in zip(calls, ("10.240.0.11", "10.240.0.12"), strict=True):
        assert f"kubelab@{address}" in call and "StrictHostKeyChecking=yes" in call
        assert f"{address} {HOST_KEY}" in call  # the known_hosts file it pinned
        assert "sudo -n bash -c 'systemctl start etcd-backup.service" in call


def test_restore_runs_on_the_one_master_and_refuses_several(tmp_path, config_for):
    one = [_node("master-1", "master", "10.240.0.11"), _node("worker-1", "worker", "10.240.0.21")]
    proc, calls = _run(tmp_path, config_for("libvirt"), one, "restore", "--snapshot", "/var/backups/kubelab/etcd/x.db")
    assert proc.returncode == 0, proc.stderr
    assert "sudo -n bash -c '/usr/local/lib/kubelab/etcd-restore.sh /var/backups/kubelab/etcd/x.db'" in calls[0]
    three = [_node(f"master-{i}", "master", f"10.240.0.1{i}") for i in (1, 2, 3)]
    proc, _ = _run(tmp_path / "3", config_for("libvirt"), three, "restore")
    assert proc.returncode != 0 and "has 3 masters" in proc.stderr and "README" in proc.stderr
