"""Which Pulumi provider plugins Pulumi can find, and installing them from a plugin mirror.

kubelab never builds provider plugins: they are Pulumi's to acquire. Online, ``pulumi up``
downloads each one the first time it is needed. Air-gapped (seed 001's network behind a
firewall), a site keeps a *plugin mirror*: a directory holding the release archives
(``pulumi-resource-NAME-vVERSION-linux-amd64.tar.gz``, as published by each provider) or bare
binaries (``pulumi-resource-NAME-vVERSION``). ``make tools`` installs from it with
``pulumi plugin install resource NAME VERSION --file FILE`` when ``KUBELAB_PLUGIN_DIR`` names
it, then reports what Pulumi can find.

Pulumi looks for a plugin in two places, and so does this module:
- ``$PATH``: a ``pulumi-resource-NAME`` binary there is an "ambient" plugin (used whatever its
  version);
- the plugin cache: ``$PULUMI_HOME/plugins/resource-NAME-vVERSION/pulumi-resource-NAME``
  (``PULUMI_HOME`` defaults to ``~/.pulumi``), the exact version the SDK asks for.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from components.versions import load_versions  # noqa: E402

MIRROR_ENV = "KUBELAB_PLUGIN_DIR"
README_SECTION = "README.md, section 'Provider plugins'"


def pulumi_home() -> Path:
    """Pulumi's home (plugin cache parent), as the CLI computes it."""
    return Path(os.environ.get("PULUMI_HOME") or Path.home() / ".pulumi")


def wanted() -> dict[str, str]:
    """Plugin name -> version, from ``versions.toml [providers]`` (the SDK pins match it)."""
    return dict(load_versions()["providers"])


@dataclass(frozen=True)
class Found:
    """Where Pulumi would find one plugin, or ``path=None`` when it would not."""

    name: str
    version: str
    path: Path | None
    how: str  # "cache", "PATH" or "missing"

    @property
    def cache_dir_name(self) -> str:
        return f"resource-{self.name}-v{self.version}"


def find(name: str, version: str, home: Path | None = None) -> Found:
    """Locate ``pulumi-resource-NAME`` the way Pulumi does (PATH first, then the cache)."""
    binary = f"pulumi-resource-{name}"
    on_path = shutil.which(binary)
    if on_path:
        return Found(name, version, Path(on_path), "PATH")
    cache = (home or pulumi_home()) / "plugins"
    cand = cache / f"resource-{name}-v{version}" / binary
    partial = cache / f"resource-{name}-v{version}.partial"
    if cand.is_file() and os.access(cand, os.X_OK) and not partial.exists():
        return Found(name, version, cand, "cache")
    return Found(name, version, None, "missing")


def find_all(home: Path | None = None) -> list[Found]:
    return [find(n, v, home) for n, v in wanted().items()]


def mirror_file(mirror: Path, name: str, version: str) -> Path | None:
    """The release archive or bare binary for ``name`` ``version`` in a plugin mirror."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for cand in (f"pulumi-resource-{name}-v{version}-linux-{arch}.tar.gz", f"pulumi-resource-{name}-v{version}"):
        if (mirror / cand).is_file():
            return mirror / cand
    return None


def install_from_mirror(pulumi: Path, mirror: Path, env: dict[str, str] | None = None) -> list[str]:
    """``pulumi plugin install --file`` every missing plugin present in ``mirror``; log lines."""
    lines = []
    for f in find_all():
        if f.path is not None:
            continue
        src = mirror_file(mirror, f.name, f.version)
        if src is None:
            lines.append(f"{f.name} {f.version}: not in the mirror {mirror}")
            continue
        subprocess.run([str(pulumi), "plugin", "install", "resource", f.name, f.version, "--file", str(src)],
                       check=True, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        lines.append(f"{f.name} {f.version}: installed from {src}")
    return lines


def report(found: list[Found]) -> str:
    """A human report: one line per plugin, then the fix for the missing ones."""
    lines = ["provider plugins (versions.toml [providers]):"]
    for f in found:
        where = f"{f.path} ({f.how})" if f.path else "NOT FOUND"
        lines.append(f"  {f.name:<13} {f.version:<8} {where}")
    missing = [f for f in found if f.path is None]
    if missing:
        lines.append("missing plugins, and the fix:")
        for f in missing:
            lines.append(f"  {f.name} {f.version}: online, `pulumi up` downloads it (or `pulumi plugin install resource "
                         f"{f.name} {f.version}`); air-gapped, put pulumi-resource-{f.name}-v{f.version}-linux-amd64.tar.gz "
                         f"in a plugin mirror and run `{MIRROR_ENV}=/path/to/mirror make tools`")
        lines.append(f"  ({README_SECTION})")
    return "\n".join(lines)


def link_cache(found: list[Found], home: Path) -> None:
    """Make the found plugins visible to a Pulumi run with its own ``PULUMI_HOME`` (tests).

    A plugin found in the cache gets a directory of the same name in ``home/plugins`` whose
    files link to the real ones (Pulumi skips a symlinked plugin directory when it lists the
    cache). Plugins found on PATH stay ambient (the run keeps PATH).
    """
    for f in found:
        if f.how != "cache" or f.path is None:
            continue
        dest = home / "plugins" / f.cache_dir_name
        dest.mkdir(parents=True, exist_ok=True)
        for src in f.path.parent.iterdir():
            if not (dest / src.name).exists():
                (dest / src.name).symlink_to(src)
