"""Bootstrap replay: run the program's planned remote steps on real machines without Pulumi.

The official provider plugins cannot be built on this workplace (the Go module proxy refuses
their modules), so ``pulumi up`` cannot run here. The replay still exercises everything
kubelab puts on a node for real: the program runs under mocks (with real keys and
certificates, tests/realpki.py), and the recorded ``remote.Command`` / ``CopyToRemote``
registrations are executed in dependency order over SSH (``ssh``/``scp``), with the same
command strings, stdin payloads, pinned host keys and connection settings the provider would
use. It stands in for the engine and the command provider only; the scripts, templates,
binaries and certificates are the real ones.
"""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import time
from pathlib import Path

from tests.mockrun import Graph, Registration, unsecret

CMD = "command:remote:Command"
COPY = "command:remote:CopyToRemote"


class StepFailed(AssertionError):
    pass


class Replayer:
    def __init__(self, graph: Graph, prefix: list[str], workdir: Path):
        self.graph = graph
        self.prefix = prefix
        self.workdir = workdir
        self.steps = [r for r in graph.registrations if r.type in (CMD, COPY)]
        self.urns = {r.urn for r in self.steps}
        self.times: dict[str, tuple[float, float]] = {}
        self.bytes_per_host: dict[str, int] = {}

    def _deps(self, r: Registration) -> set[str]:
        return {u for u in self.graph.ancestors(r) if u in self.urns}

    def _ssh_opts(self, conn: dict) -> list[str]:
        host = conn["host"]
        key = self.workdir / f"key-{host}"
        if not key.exists():
            key.write_text(conn["privateKey"])
            key.chmod(0o600)
        opts = ["-i", str(key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "LogLevel=ERROR"]
        if conn.get("hostKey"):  # pinned, like pulumi-command's host_key
            known = self.workdir / f"known-{host}"
            known.write_text(f"{host} {conn['hostKey'].strip()}\n")
            opts += ["-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes"]
        else:
            opts += ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"]
        return opts

    def _run(self, r: Registration, script_key: str = "create") -> None:
        inputs = unsecret(r.inputs)
        conn = inputs["connection"]
        target = f"{conn.get('user', 'root')}@{conn['host']}"
        if r.type == COPY:
            src = Path(inputs["source"]["path"])
            cmd = [*self.prefix, "scp", "-q", *self._ssh_opts(conn), str(src), f"{target}:{inputs['remotePath']}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
            self.bytes_per_host[conn["host"]] = self.bytes_per_host.get(conn["host"], 0) + src.stat().st_size
        else:
            script = inputs.get(script_key)
            if not script:
                return
            cmd = [*self.prefix, "ssh", *self._ssh_opts(conn), target, script]
            deadline = time.monotonic() + 1800
            while True:
                proc = subprocess.run(cmd, input=inputs.get("stdin") if script_key == "create" else None,
                                      capture_output=True, text=True, check=False, timeout=1800)
                # 255 is ssh's own failure (host still booting): dial again, like dial_error_limit=-1.
                if proc.returncode != 255 or not r.name.endswith("wait-for-ssh") or time.monotonic() > deadline:
                    break
                time.sleep(3)
        if proc.returncode != 0:
            raise StepFailed(f"{r.name} ({script_key}) failed with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    def up(self, parallel: int = 6) -> None:
        """Every step once all its dependencies are done, several at a time (as the engine does)."""
        deps = {r.urn: self._deps(r) for r in self.steps}
        done: set[str] = set()
        running: dict[cf.Future, Registration] = {}
        todo = list(self.steps)
        with cf.ThreadPoolExecutor(max_workers=parallel) as pool:
            while todo or running:
                for r in [r for r in todo if deps[r.urn] <= done][: max(0, parallel - len(running))]:
                    todo.remove(r)
                    started = time.monotonic()
                    fut = pool.submit(self._run, r)
                    fut.started = started  # type: ignore[attr-defined]
                    running[fut] = r
                if not running:
                    raise StepFailed(f"dependency cycle among {[r.name for r in todo]}")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    r = running.pop(fut)
                    fut.result()
                    self.times[r.name] = (fut.started, time.monotonic())  # type: ignore[attr-defined]
                    done.add(r.urn)

    def destroy(self) -> None:
        """Each command's ``delete`` in reverse dependency order, as ``pulumi destroy`` would."""
        for r in reversed(self.steps):
            if r.type == CMD:
                self._run(r, "delete")
