"""The machine contract: what every platform hands to the bootstrap.

A platform (libvirt, DigitalOcean, existing hosts) turns the configured :class:`NodeSpec`
list into :class:`Machine` objects; everything after that is platform-neutral. A new platform
is one new module under ``components/platforms/`` with a ``create_machines`` function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import pulumi
import pulumi_tls as tls
from pulumi_command import remote

from components.config import ClusterConfig, NodeSpec
from components.render import render


@dataclass
class Machine:
    """One host ready to be bootstrapped (or about to be, once it boots)."""

    spec: NodeSpec
    host: pulumi.Input[str]  # the address the bootstrap connects to over SSH
    private_address: pulumi.Input[str]  # the address the cluster uses (etcd, kubelet, flannel)
    user: str
    private_key: pulumi.Input[str]  # secret
    host_key: pulumi.Input[str] | None = None  # pinned SSH host key (authorized_keys format)
    # Which machine this is (libvirt domain UUID, droplet id; address for existing hosts). It
    # changes when the platform replaces the machine, and every step and upload on the node
    # depends on it: a replaced machine, blank again, gets all of its steps re-run, and no
    # other node's (a replacement keeps name, address and host key, so nothing else shows it).
    identity: pulumi.Input[str] = ""
    # A cloud metadata service on the host's network that serves the machine's user_data
    # (DigitalOcean: 169.254.169.254); pods are kept from reaching it.
    metadata_address: str | None = None
    # Whether a step may install a missing OS package (haproxy) with the host's package manager:
    # machines kubelab creates on a cloud with package mirrors. Elsewhere (the offline lab image
    # has what it needs; existing hosts are the user's) a missing package is a checked precondition.
    installs_packages: bool = False
    depends_on: list[pulumi.Resource] = field(default_factory=list)  # e.g. the VM
    # The resource whose deletion takes the whole machine with it (the VM, the droplet). A
    # step's delete (a node's drain, cluster-ready's destroy mark) is skipped when it goes in
    # the same run, as Pulumi's deletedWith does: nothing on a machine needs undoing then.
    # None for existing hosts, which outlive the stack.
    deleted_with: pulumi.Resource | None = None

    @property
    def teardown(self) -> bool:
        """Whether steps remove what they installed when deleted: only on hosts kubelab did not
        create (a VM or droplet kubelab made is destroyed whole, so nothing needs undoing)."""
        return self.deleted_with is None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role

    def connection(self, *, wait: bool = False) -> remote.ConnectionArgs:
        """SSH connection; ``wait`` dials without limit (bounded by the step's create timeout)."""
        return remote.ConnectionArgs(
            host=self.host,
            user=self.user,
            private_key=pulumi.Output.secret(self.private_key),
            host_key=self.host_key,
            dial_error_limit=-1 if wait else 10,
            per_dial_timeout=15,
        )


@dataclass
class Fleet:
    """What a platform returns: the machines, and the address clients use for the API."""

    machines: list[Machine]
    api_endpoint: pulumi.Input[str]  # host (IP) of https://HOST:6443 in the exported kubeconfig


class Platform(Protocol):
    """A platform module's ``create_machines``: one machine per configured node."""

    def __call__(self, cfg: ClusterConfig, parent: pulumi.Resource) -> Fleet: ...


def host_key_user_data(node: str, parent: pulumi.Resource, template: str, **context: object) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
    """An SSH host key generated in state, rendered into ``template`` (cloud-init user data).

    Returns ``(public key to pin, user data)``; the user data carries the private key and is a
    secret. The key lives in state, so the user data is stable across runs (a change would
    replace the machine).
    """
    key = tls.PrivateKey(f"{node}-ssh-host-key", algorithm="ED25519", opts=pulumi.ResourceOptions(parent=parent))
    user_data = pulumi.Output.all(key.private_key_openssh, key.public_key_openssh).apply(
        lambda k: render(template, host_private_key=k[0].strip(), host_public_key=k[1].strip(), **context))
    return key.public_key_openssh.apply(str.strip), pulumi.Output.secret(user_data)
