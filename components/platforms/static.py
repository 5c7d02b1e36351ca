"""Existing hosts ("static"): the seeds' own situation, three machines you already have.

kubelab creates nothing here; ``pulumi destroy`` runs each step's teardown on the hosts
(services stopped, files removed) and leaves the machines themselves alone.
"""

from __future__ import annotations

from pathlib import Path

import pulumi

from components.config import ClusterConfig
from components.machine import Fleet, Machine


def unpinned_host_warning(name: str, address: str) -> str:
    """The preview warning for a host whose SSH host key is not pinned."""
    return (f"static.hosts[{name}]: no host_key, so its SSH host key is trusted on first use without any check; "
            f"pin it: set host_key to the key that `ssh-keyscan -t ed25519 {address}` prints (\"ssh-ed25519 AAAA...\")")


def create_machines(cfg: ClusterConfig, parent: pulumi.Resource) -> Fleet:
    default_key = cfg.ssh.private_key()
    for n in cfg.nodes:
        if not n.host_key:
            pulumi.log.warn(unpinned_host_warning(n.name, n.public_address or n.address or ""), parent)
    machines = [
        Machine(
            spec=n,
            host=n.public_address or n.address,
            private_address=n.address,
            user=n.ssh_user or cfg.ssh.user,
            private_key=Path(n.ssh_private_key_file).read_text() if n.ssh_private_key_file else default_key,
            host_key=n.host_key,
            identity=f"{n.name}@{n.public_address or n.address}",
        )
        for n in cfg.nodes
    ]
    first_master = next(m for m in machines if m.role == "master")
    return Fleet(machines=machines, api_endpoint=first_master.host)
