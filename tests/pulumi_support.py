"""Running the real Pulumi CLI against a copy of the project (engine and e2e tiers).

The project is copied into a temporary directory (sharing the repo's virtualenv), with a file
backend, a test passphrase and an isolated ``PULUMI_HOME``, so a test never touches the
developer's stacks. The CLI is the offline-built one under ``$KUBELAB_CACHE/bin`` (or a
``pulumi`` on PATH). Provider plugins are found the way Pulumi finds them (``tools/plugins.py``:
on PATH, or in the developer's plugin cache, which is linked into the isolated home); automatic
plugin acquisition is off, so a test never downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from components.versions import cache_root

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))
import plugins  # noqa: E402 - tools/plugins.py: where Pulumi finds provider plugins

# The developer's real cache, read before any test fixture points KUBELAB_CACHE elsewhere.
REAL_CACHE = cache_root()
CLI = ("pulumi", "pulumi-language-python")
# The developer's plugin cache, read before a Project points PULUMI_HOME at a temporary home.
REAL_PULUMI_HOME = plugins.pulumi_home()
PROJECT_FILES = ("Pulumi.yaml", "__main__.py", "versions.toml", "components", "templates")


LAB = ("command", "tls", "libvirt")  # the plugins a libvirt stack loads
STATIC = ("command", "tls")
DIGITALOCEAN = ("command", "tls", "digitalocean")


def toolchain_bin(providers: Sequence[str] = LAB) -> Path:
    """The toolchain's bin dir, or skip the test with one loud line naming what is missing.

    ``providers`` names the plugins the test's stack loads; ``()`` for tests that never
    register a provider resource (a config refused at preview time needs only the CLI).
    """
    bindir = REAL_CACHE / "bin"
    missing = [t for t in CLI if not (bindir / t).exists() and not shutil.which(t)]
    if missing:
        pytest.skip(f"PULUMI CLI MISSING ({bindir}): {', '.join(missing)}; run `make tools`")
    if providers:
        absent = [f"{f.name} {f.version}" for f in plugins.find_all(REAL_PULUMI_HOME)
                  if f.path is None and f.name in providers]
        if absent:
            pytest.skip(f"PROVIDER PLUGINS MISSING: {', '.join(absent)} (neither on PATH nor in "
                        f"{REAL_PULUMI_HOME / 'plugins'}); see {plugins.README_SECTION}")
    return bindir


class Project:
    """A throwaway copy of the kubelab project with one stack."""

    def __init__(self, tmp: Path, stack: str, cluster: dict, extra: dict | None = None,
                 secrets: dict[str, str] | None = None, prefix: list[str] | None = None,
                 cache: Path | None = None, providers: Sequence[str] = LAB):
        self.dir = tmp / "project"
        self.dir.mkdir(parents=True)
        for name in PROJECT_FILES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, self.dir / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, self.dir / name)
        (self.dir / ".venv").symlink_to(REPO / ".venv")
        self.stack = stack
        self.prefix = prefix or []
        bindir = toolchain_bin(providers)
        (tmp / "state").mkdir()
        (tmp / "home").mkdir()
        plugins.link_cache(plugins.find_all(REAL_PULUMI_HOME), tmp / "home")
        self.env = {
            **os.environ,
            "PATH": f"{bindir}:{REPO / '.venv/bin'}:{os.environ['PATH']}",
            "PULUMI_HOME": str(tmp / "home"),
            "PULUMI_BACKEND_URL": f"file://{tmp / 'state'}",
            "PULUMI_CONFIG_PASSPHRASE": "kubelab-test-passphrase",
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_EXPERIMENTAL": "false",
            "KUBELAB_CACHE": str(cache or REAL_CACHE),
            # The offline-built language host predates runtime.options.virtualenv.
            "PULUMI_PYTHON_CMD": str(REPO / ".venv/bin/python"),
        }
        self.env.pop("PULUMI_CONFIG_PASSPHRASE_FILE", None)
        self.run("stack", "init", stack)
        self.set_cluster(cluster, extra)
        for key, value in (secrets or {}).items():
            self.run("config", "set", "--secret", key, value)

    def set_cluster(self, cluster: dict, extra: dict | None = None) -> None:
        """Write ``kubelab:cluster`` (and ``extra`` keys) into the stack file, keeping the rest."""
        stack_file = self.dir / f"Pulumi.{self.stack}.yaml"
        doc = (yaml.safe_load(stack_file.read_text()) if stack_file.exists() else {}) or {}
        doc.setdefault("config", {})["kubelab:cluster"] = cluster
        doc["config"].update(extra or {})
        stack_file.write_text(yaml.safe_dump(doc))

    def run(self, *args: str, check: bool = True, timeout: float = 1800, in_netns: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*(self.prefix if in_netns else []), "pulumi", *args, "--non-interactive", "--stack", self.stack] \
            if args[0] not in ("stack",) else ["pulumi", *args, "--non-interactive"]
        proc = subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
        return proc

    def run_logged(self, events: Path, *args: str, timeout: float = 1800, stall: float = 1800,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        """``run`` with the engine's event stream written to ``events`` (JSON lines), stopped
        early when the engine goes quiet for ``stall`` seconds.

        ``--event-log`` is how the Automation API reads a run's per-resource events; the CLI
        registers the flag only with ``PULUMI_DEBUG_COMMANDS=true``, as the Automation API sets.
        The stall guard is there because a provider can hang for good (a libvirt storage
        deadlock once held a CI run for its whole hour): the error names the resources still
        in flight instead of a bare timeout.
        """
        cmd = [*self.prefix, "pulumi", *args, "--event-log", str(events), "--non-interactive", "--stack", self.stack]
        env = {**self.env, "PULUMI_DEBUG_COMMANDS": "true"}
        out_path, err_path = events.with_suffix(".stdout"), events.with_suffix(".stderr")
        with out_path.open("w") as out, err_path.open("w") as err:
            proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=out, stderr=err, text=True)
            start = last_change = time.monotonic()
            size = -1
            why = ""
            while proc.poll() is None:
                time.sleep(5)
                now = time.monotonic()
                cur = events.stat().st_size if events.exists() else 0
                if cur != size:
                    size, last_change = cur, now
                if now - start > timeout:
                    why = f"timed out after {timeout:.0f} s"
                elif now - last_change > stall:
                    why = f"the engine wrote no event for {stall:.0f} s"
                if why:
                    proc.kill()
                    proc.wait()
                    break
        result = subprocess.CompletedProcess(cmd, proc.returncode, out_path.read_text(), err_path.read_text())
        if why:
            raise AssertionError(f"{' '.join(cmd)}: {why}; resources still in flight: "
                                 f"{', '.join(in_flight(events)) or 'none'}\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}")
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
        return result

    def preview_json(self, *args: str, check: bool = True) -> tuple[dict, subprocess.CompletedProcess[str]]:
        proc = self.run("preview", "--json", *args, check=check)
        try:
            return json.loads(proc.stdout), proc
        except json.JSONDecodeError:
            return {}, proc


def in_flight(events: Path) -> list[str]:
    """Resources an engine event log shows started and not yet finished (``op name``)."""
    pending: dict[str, str] = {}
    if not events.exists():
        return []
    for line in events.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run may be cut short
        for kind in ("resourcePreEvent", "resOutputsEvent", "resOpFailedEvent"):
            if kind in e:
                md = e[kind]["metadata"]
                if kind == "resourcePreEvent":
                    pending[md["urn"]] = f"{md['op']} {md['urn'].rsplit('::', 1)[1]}"
                else:
                    pending.pop(md["urn"], None)
    return sorted(pending.values())


def planned(preview: dict) -> list[dict]:
    """The planned steps of ``pulumi preview --json`` other than the stack itself."""
    out = []
    for step in preview.get("steps", []):
        state = step.get("newState") or step.get("oldState") or {}
        if state.get("type") == "pulumi:pulumi:Stack":
            continue
        out.append({"op": step["op"], "type": state.get("type"), "urn": step["urn"], "name": step["urn"].rsplit("::", 1)[1]})
    return out
