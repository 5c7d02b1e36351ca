"""The pinned versions file and the bundle key derived from it.

Pure Python (no Pulumi import) so the offline toolchain build (``tools/``) and the program
share one definition of where a node bundle for a given set of versions lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path

VERSIONS_FILE = Path(__file__).resolve().parent.parent / "versions.toml"
# Bumped when the bundle's layout or file formats change for the same versions, so a bundle
# built by an older kubelab is rebuilt rather than used. 2: image layers are gzip-compressed.
BUNDLE_FORMAT = 2


def load_versions(path: Path = VERSIONS_FILE) -> dict:
    """Parse ``versions.toml`` into ``{"pulumi": {...}, "providers": {...}, "node": {...}}``."""
    with path.open("rb") as fh:
        return tomllib.load(fh)


def bundle_key(node_versions: dict[str, str]) -> str:
    """Directory name of the node bundle built for exactly these versions.

    ``node-<12 hex>``: a hash of the sorted ``[node]`` table and :data:`BUNDLE_FORMAT`, so any
    version or format change gives a new bundle and a stale one is never mistaken for the
    current one.
    """
    canon = json.dumps({"format": BUNDLE_FORMAT, **dict(sorted(node_versions.items()))}, separators=(",", ":"))
    return "node-" + hashlib.sha256(canon.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """``$KUBELAB_CACHE``, default ``${XDG_CACHE_HOME:-$HOME/.cache}/kubelab``: everything built
    or downloaded (toolchain, bundles, images, lab pool) lives here, outside the work tree."""
    env = os.environ.get("KUBELAB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubelab"
