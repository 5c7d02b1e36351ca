"""Offline toolchain entry point (``make tools``).

    python3 tools/toolchain.py all|pulumi|bundle|where|actionlint

``pulumi`` builds the Pulumi CLI and the Python language host and links them into
``$KUBELAB_CACHE/bin``; ``bundle`` builds the node bundle; ``all`` does both. Each action ends
with ``where``: where things are, and which provider plugins Pulumi can and cannot find (with
the fix for each). Provider plugins are never built here: Pulumi downloads them online; with
``KUBELAB_PLUGIN_DIR`` set, missing ones are installed from that plugin mirror. Builds are cached by version (a second run takes seconds) and
cold build seconds are merged into ``$KUBELAB_CACHE/build-times.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import kltools
from kltools import cache_root, log

if str(kltools.REPO) not in sys.path:
    sys.path.insert(0, str(kltools.REPO))


def save_times(timings: dict[str, float]) -> None:
    """Merge ``timings`` into ``$KUBELAB_CACHE/build-times.json``, keeping earlier entries."""
    if not timings:
        return
    path = cache_root() / "build-times.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**old, **timings}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def bundle_dir() -> Path:
    """Where the node bundle for the pinned ``[node]`` versions lives (built or not)."""
    from components.versions import bundle_key

    return cache_root() / "bundles" / bundle_key(kltools.versions()["node"])


def where() -> int:
    """Print the pulumi binary, the bin dir, the bundle and the provider plugins."""
    import plugins
    from pulumi_build import bin_dir

    def state(p: Path, done: Path) -> str:
        return str(p) if done.exists() else f"{p} (not built)"

    pulumi = bin_dir() / "pulumi"
    print(f"pulumi: {state(pulumi, pulumi)}")
    print(f"bin:    {bin_dir()}  (export PATH={bin_dir()}:$PATH)")
    print(f"bundle: {state(bundle_dir(), bundle_dir() / '.done')}")
    print(plugins.report(plugins.find_all()))
    return 0


def build_pulumi(timings: dict[str, float]) -> bool:
    """Build the CLI and language host; install missing plugins from ``KUBELAB_PLUGIN_DIR``."""
    import os

    import plugins
    from pulumi_build import build_pulumi as build
    from pulumi_build import offline_env

    bindir = build(timings)
    mirror = os.environ.get(plugins.MIRROR_ENV)
    if mirror:
        for line in plugins.install_from_mirror(bindir / "pulumi", Path(mirror), offline_env()):
            log(f"plugin mirror: {line}")
    return True


def stack_versions(stack: str | None) -> dict[str, str]:
    """The ``versions`` a stack file sets (``Pulumi.<stack>.yaml``), {} without one.

    Read raw here: ``pulumi preview`` validates them (supported range, skew) with the rest of
    the config; the build only needs to know which bundle to make.
    """
    if not stack:
        return {}
    path = kltools.REPO / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        return {}
    import yaml

    cfg = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    return {str(k): str(v) for k, v in ((cfg.get("kubelab:cluster") or {}).get("versions") or {}).items()}


def build_bundle(timings: dict[str, float], stack: str | None = None) -> bool:
    """Build the node bundle for the pinned versions, with ``stack``'s overrides
    (``tools/bundle_build.py``, imported only when needed)."""
    from bundle_build import build_bundle as build

    overrides = stack_versions(stack)
    if overrides:
        log(f"stack {stack} sets versions {overrides}")
    print(build(timings, overrides=overrides))
    return True


def actionlint_path() -> Path:
    """Where the pinned actionlint lives once built."""
    return cache_root() / f"actionlint-v{kltools.versions()['checks']['actionlint']}" / "actionlint"


def build_actionlint(timings: dict[str, float]) -> Path:
    """actionlint (the fast tier lints .github/workflows with it), from its Go module."""
    version = kltools.versions()["checks"]["actionlint"]

    def build(tmp: Path) -> None:
        kltools.run(["go", "install", f"github.com/rhysd/actionlint/cmd/actionlint@v{version}"],
                    env={**kltools.go_env(), "GOBIN": str(tmp), "CGO_ENABLED": "0"})

    return kltools.cached(f"actionlint-v{version}", build, timings) / "actionlint"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one action; exit status 1 if anything is missing."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["all", "pulumi", "bundle", "where", "actionlint"])
    ap.add_argument("--stack", help="build the bundle for this stack's versions (Pulumi.<stack>.yaml)")
    args = ap.parse_args(argv)
    if args.action == "where":
        return where()
    if args.action == "actionlint":
        timings_lint: dict[str, float] = {}
        print(build_actionlint(timings_lint))
        save_times(timings_lint)
        return 0
    timings: dict[str, float] = {}
    start = time.monotonic()
    ok = True
    try:
        if args.action in ("all", "pulumi"):
            ok = build_pulumi(timings) and ok
        if args.action in ("all", "bundle"):
            ok = build_bundle(timings, args.stack) and ok
    finally:
        save_times(timings)
        log(f"cold builds this run: {json.dumps(timings)}; {time.monotonic() - start:.1f} s")
    where()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
