"""Changes a running cluster must not take in one `pulumi up`, refused at preview.

The stack config says what the cluster should be; whether a change is safe also depends on
what it is now. The stack's own last outputs say that (``nodes`` lists each node's role,
``kubernetesVersion`` the version it runs, ``etcdMembers`` how each etcd member was started), read through the engine's built-in
``pulumi:pulumi:readStackOutputs`` before any resource is registered, so a refused change
creates, updates and deletes nothing. A stack that has never run has no outputs: anything goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from components.config import SEMVER_RE, ClusterConfig, ConfigError

READ_STACK_OUTPUTS = "pulumi:pulumi:readStackOutputs"
# The file backend's read of a checkpoint can fail while the engine writes that same checkpoint:
# the bucket (gocloud fileblob) renames the checkpoint into place atomically but rewrites its
# `.json.attrs` sidecar in place, so a read in between decodes an empty file ("failed to load
# checkpoint: EOF"). `pulumi up` writes the checkpoint as it registers the Stack resource, while
# this program reads it. Measured: the first `up` of a new e2e stack failed on it after 1 s.
CHECKPOINT_RACE = "failed to load checkpoint"
READ_ATTEMPTS = 5


@dataclass(frozen=True)
class EtcdMember:
    """How a member was first started: etcd reads these flags only on its first start (an empty
    data dir), so a running member's unit keeps them as they were, and a change of the other
    masters leaves its step alone."""

    initial_cluster: str  # name=https://address:2380,... as etcd was given it
    state: str  # "new": a founding member; "existing": joined a running cluster later


@dataclass(frozen=True)
class Deployed:
    """What the stack's last update left running, as far as its outputs say."""

    masters: tuple[str, ...]
    kubernetes: str | None  # absent in stacks last updated before the output existed
    # None in stacks last updated before the output existed (their members all founded it).
    etcd_members: dict[str, EtcdMember] | None = None


def deployed_from_outputs(outputs: dict | None) -> Deployed | None:
    """The running cluster from a stack's outputs; None when the stack has none (never run,
    or destroyed)."""
    nodes = (outputs or {}).get("nodes")
    if not nodes:
        return None
    masters = tuple(n["name"] for n in nodes if isinstance(n, dict) and n.get("role") == "master")
    version = (outputs or {}).get("kubernetesVersion")
    members = (outputs or {}).get("etcdMembers")
    etcd = ({n: EtcdMember(initial_cluster=m["initialCluster"], state=m["initialClusterState"])
             for n, m in members.items()} if isinstance(members, dict) else None)
    return Deployed(masters=masters, kubernetes=version if isinstance(version, str) else None, etcd_members=etcd)


def read_deployed(pause_s: float = 1.0) -> Deployed | None:
    """This stack's last outputs, from the engine (preview and up alike).

    A read that meets the engine's own checkpoint write (``CHECKPOINT_RACE``) is tried again,
    up to ``READ_ATTEMPTS`` times ``pause_s`` apart; any other failure, or the same one every
    time, is raised as the engine gave it."""
    import pulumi

    name = f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}"
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            result = pulumi.runtime.invoke(READ_STACK_OUTPUTS, {"name": name})
            break
        except Exception as err:  # the SDK raises a bare Exception carrying the engine's message
            if CHECKPOINT_RACE not in str(err) or attempt == READ_ATTEMPTS:
                raise
            time.sleep(pause_s)
    return deployed_from_outputs((result.value or {}).get("outputs"))


def check_transition(cfg: ClusterConfig, before: Deployed | None) -> None:
    """Raise ConfigError (naming the setting and the way forward) for a change the running
    cluster cannot take safely in one update."""
    problems: list[str] = []
    n = len(cfg.master_nodes)
    if n % 2 == 0 and (before is None or not before.masters):
        # A running cluster may pass through an even count, one member at a time (3 -> 2 -> 1).
        raise ConfigError([
            f"masters.count: {n} masters means an even number of etcd members, which tolerates no more failures "
            f"than {n - 1}; use an odd number (1, 3 or 5)"])
    if before is None:
        return
    problems += master_change_problems(tuple(n.name for n in cfg.master_nodes), before)
    if before.kubernetes:
        old, new = SEMVER_RE.match(before.kubernetes), SEMVER_RE.match(cfg.versions["kubernetes"])
        if old and new:
            (omaj, omin), (nmaj, nmin) = (int(old[1]), int(old[2])), (int(new[1]), int(new[2]))
            if (nmaj, nmin) < (omaj, omin):
                problems.append(
                    f"versions.kubernetes: the cluster runs {before.kubernetes} and the config asks for "
                    f"{cfg.versions['kubernetes']}: Kubernetes does not support going back a minor version. "
                    f"Set versions.kubernetes to a {omaj}.{omin}.x (or newer) release.")
            elif nmaj != omaj or nmin > omin + 1:
                problems.append(
                    f"versions.kubernetes: the cluster runs {before.kubernetes} and the config asks for "
                    f"{cfg.versions['kubernetes']}: that skips a minor version, which Kubernetes' version skew "
                    f"policy does not allow. Upgrade one minor at a time: set {omaj}.{omin + 1}.x first, "
                    "`pulumi up`, then the next.")
    if problems:
        raise ConfigError(problems)


def master_change_problems(now: tuple[str, ...], before: Deployed) -> list[str]:
    """Masters are etcd members. Any number may join in one update, one after another (each
    added as a learner, caught up, then promoted), but only one may leave (``member remove``
    before its machine goes), so quorum holds at every step; the count may pass through an
    even number on the way. The first master stays: it runs the registry, the addons and
    these member changes."""
    if not before.masters or set(now) == set(before.masters):
        return []
    added = [n for n in now if n not in before.masters]
    removed = [n for n in before.masters if n not in now]
    have, want = len(before.masters), len(now)
    if before.etcd_members is None:
        return [f"masters: this stack runs {have} master(s) ({', '.join(before.masters)}) and its last update predates "
                f"the record of how each etcd member started (output etcdMembers). Run `pulumi up` once with "
                f"masters.count at {have}, then change the masters."]
    if before.masters[0] in removed or now[0] != before.masters[0]:
        return [f"masters: {before.masters[0]} is the first master: it runs the private registry and the addons and "
                f"changes the etcd members, so it stays. Keep it first (masters.count can grow or shrink by the "
                f"masters after it), or rebuild the cluster: `pulumi destroy`, then `pulumi up`."]
    if removed and added:
        return [f"masters: the config removes {', '.join(removed)} and adds {', '.join(added)} in one update. etcd "
                f"members leave one per update and only once no other joins, so quorum holds at every step: remove "
                f"the old master(s) first, `pulumi up`, then add the new one(s)."]
    if len(removed) > 1:
        return [f"masters: this stack runs {have} masters ({', '.join(before.masters)}) and the config asks for {want}: "
                f"{len(removed)} etcd members would leave in one update ({have} -> {want} in one update can lose "
                f"etcd's quorum). Members leave one per update: set masters.count to {have - 1} first, `pulumi up`, "
                f"then {have - 2}, and so on."]
    return []


def transition_warnings(cfg: ClusterConfig, before: Deployed | None) -> list[str]:
    """What an allowed change should still tell the user at preview."""
    n = len(cfg.master_nodes)
    if before is not None and before.masters and n % 2 == 0:
        return [f"masters.count: {n} etcd members tolerate no more failures than {n - 1}; this is meant as a step "
                f"on the way to {n - 1} or {n + 1} masters in the next update."]
    return []
