"""Take or restore etcd snapshots on a stack's masters (`make etcd-backup`, `make etcd-restore`).

    python3 tools/etcd_ops.py backup  --stack dev              # a snapshot now, on every master
    python3 tools/etcd_ops.py list    --stack dev              # the snapshots each master keeps
    python3 tools/etcd_ops.py restore --stack dev [--snapshot FILE]

It reads the stack's ``nodes`` output (addresses and pinned SSH host keys) and its validated
``kubelab:cluster`` config (SSH user and key), and runs, over SSH on each master, what the
``etcd-backup`` step installed there: ``etcd-backup.service`` and ``etcd-restore.sh``. Restore
is for a cluster with one master (the lab); with several, the README gives the order.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from components.config import ClusterConfig, parse_cluster_config  # noqa: E402 - the one config parser


def pulumi_json(stack: str, *args: str) -> object:
    proc = subprocess.run(["pulumi", *args, "--json", "--stack", stack], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pulumi {' '.join(args)} --stack {stack} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def masters(stack: str) -> tuple[list[dict], ClusterConfig]:
    """The stack's masters (``nodes`` output) and its validated config."""
    nodes = pulumi_json(stack, "stack", "output", "nodes")
    got = pulumi_json(stack, "config", "get", "kubelab:cluster")  # {"value": "<json>", "objectValue": {...}}
    cluster = got.get("objectValue") or json.loads(got["value"])  # type: ignore[union-attr]
    cfg = parse_cluster_config(cluster, stack)
    ms = [n for n in nodes if n["role"] == "master"]  # type: ignore[union-attr]
    if not ms:
        raise SystemExit(f"stack {stack} has no masters in its nodes output: run `pulumi up` first")
    return ms, cfg


def ssh(node: dict, user: str, key: str, script: str, known_hosts: Path) -> int:
    """Run ``script`` as root on ``node``, its host key pinned from the stack's output."""
    # A static host whose key the stack does not pin (preview warned about it): first use.
    pin = (["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"] if node.get("hostKey")
           else ["-o", "StrictHostKeyChecking=accept-new"])
    sudo = "" if user == "root" else "sudo -n "
    cmd = ["ssh", "-i", key, *pin, "-o", "BatchMode=yes", f"{user}@{node['address']}", f"{sudo}bash -c {shlex.quote(script)}"]
    print(f"== {node['name']} ({node['address']})", flush=True)
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("backup", "list", "restore"))
    ap.add_argument("--stack", default="dev")
    ap.add_argument("--snapshot", help="restore: a snapshot file on the master (default: the newest)")
    args = ap.parse_args(argv)
    ms, cfg = masters(args.stack)
    user, key = cfg.ssh.user, cfg.ssh.private_key_file
    with tempfile.NamedTemporaryFile("w", prefix="kubelab-known-hosts-") as kh:
        kh.write("".join(f"{m['address']} {m['hostKey'].strip()}\n" for m in ms if m.get("hostKey")))
        kh.flush()
        if args.action == "backup":
            script = "systemctl start etcd-backup.service && journalctl -u etcd-backup.service -n 4 --no-pager -o cat"
            rcs = [ssh(m, user, key, script, Path(kh.name)) for m in ms]
        elif args.action == "list":
            rcs = [ssh(m, user, key, f"ls -l {shlex.quote(cfg.backup.directory)}", Path(kh.name)) for m in ms]
        else:
            if len(ms) != 1:
                raise SystemExit(f"stack {args.stack} has {len(ms)} masters: restore them by hand, in the order "
                                 "the README's 'etcd backups' section gives (every member from the same snapshot)")
            script = "/usr/local/lib/kubelab/etcd-restore.sh" + (f" {shlex.quote(args.snapshot)}" if args.snapshot else "")
            rcs = [ssh(ms[0], user, key, script, Path(kh.name))]
    return max(rcs)


if __name__ == "__main__":
    sys.exit(main())
