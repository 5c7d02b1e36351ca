"""Changes a running cluster must not take in one `pulumi up`, refused at preview.

The stack config says what the cluster should be; whether a change is safe also depends on
what it is now. The stack's own last outputs say that (``nodes`` lists each node's role,
``kubernetesVersion`` the version it runs), read through the engine's built-in
``pulumi:pulumi:readStackOutputs`` before any resource is registered, so a refused change
creates, updates and deletes nothing. A stack that has never run has no outputs: anything goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config import SEMVER_RE, ClusterConfig, ConfigError

READ_STACK_OUTPUTS = "pulumi:pulumi:readStackOutputs"


@dataclass(frozen=True)
class Deployed:
    """What the stack's last update left running, as far as its outputs say."""

    masters: tuple[str, ...]
    kubernetes: str | None  # absent in stacks last updated before the output existed


def deployed_from_outputs(outputs: dict | None) -> Deployed | None:
    """The running cluster from a stack's outputs; None when the stack has none (never run,
    or destroyed)."""
    nodes = (outputs or {}).get("nodes")
    if not nodes:
        return None
    masters = tuple(n["name"] for n in nodes if isinstance(n, dict) and n.get("role") == "master")
    version = (outputs or {}).get("kubernetesVersion")
    return Deployed(masters=masters, kubernetes=version if isinstance(version, str) else None)


def read_deployed() -> Deployed | None:
    """This stack's last outputs, from the engine (preview and up alike)."""
    import pulumi

    name = f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}"
    result = pulumi.runtime.invoke(READ_STACK_OUTPUTS, {"name": name})  # raises when the engine cannot
    return deployed_from_outputs((result.value or {}).get("outputs"))


def check_transition(cfg: ClusterConfig, before: Deployed | None) -> None:
    """Raise ConfigError (naming the setting and the way forward) for a change the running
    cluster cannot take safely in one update."""
    if before is None:
        return
    problems: list[str] = []
    now = tuple(n.name for n in cfg.master_nodes)
    if before.masters and set(now) != set(before.masters):
        problems.append(
            f"masters: this stack runs {len(before.masters)} master(s) ({', '.join(before.masters)}) and the config "
            f"asks for {len(now)} ({', '.join(now)}). Every master is an etcd member, and kubelab does not yet change "
            "the members of a running etcd cluster (a new member would start a cluster of its own; a removed one "
            f"would stay a member, and {len(before.masters)} -> {len(now)} can lose etcd's quorum). Keep "
            f"masters.count at {len(before.masters)} (and the same static hosts), or rebuild the cluster: "
            "`pulumi destroy`, then `pulumi up`.")
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
