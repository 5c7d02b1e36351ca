"""Shared helpers for the offline toolchain build (`make tools`).

Everything kubelab needs is built from Go modules and cached outside the work tree at
``$KUBELAB_CACHE`` (default ``${XDG_CACHE_HOME:-$HOME/.cache}/kubelab``), keyed by version.
Each artifact is built into a temporary directory and moved into place only when complete,
with a ``.done`` stamp, so an interrupted build resumes and a cached one is skipped at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from components.binaries import sha256_file  # noqa: E402,F401 - re-exported for the build scripts
from components.versions import cache_root  # noqa: E402 - re-exported for the build scripts

VERSIONS_FILE = REPO / "versions.toml"


def versions() -> dict:
    """The pinned versions (``versions.toml``)."""
    with VERSIONS_FILE.open("rb") as fh:
        return tomllib.load(fh)




def log(msg: str) -> None:
    print(f"[tools] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, echo it, fail loudly with its output on error."""
    full_env = {**os.environ, **(env or {})}
    log("$ " + " ".join(cmd) + (f"   (in {cwd})" if cwd else ""))
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[tools] command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout




def cached(key: str, build: Callable[[Path], None], timings: dict[str, float] | None = None) -> Path:
    """Return ``cache_root()/key``, building it with ``build(tmpdir)`` when absent.

    ``build`` fills the temporary directory; it is renamed into place only on success,
    so a partial build never looks complete.
    """
    dest = cache_root() / key
    if (dest / ".done").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.monotonic()
    log(f"building {key} ...")
    build(tmp)
    elapsed = time.monotonic() - start
    (tmp / ".done").write_text(json.dumps({"key": key, "build_seconds": round(elapsed, 1)}) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"built {key} in {elapsed:.0f} s")
    if timings is not None:
        timings[key] = round(elapsed, 1)
    return dest


def go_env() -> dict[str, str]:
    """Environment for Go builds: module cache shared, offline-friendly, reproducible."""
    return {"GOFLAGS": "-mod=mod -buildvcs=false", "GOTOOLCHAIN": "local"}
