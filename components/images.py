"""Image archives (``docker save`` tarballs and OCI image-layout tars): which image each holds.

The private registry is seeded from archives on the Pulumi host (the bundle's, and the ones a
user lists in ``registry.preload``). Reading the name here, at preview time, means a bad archive
is refused before anything is created, and the node's push script is plain and readable.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

# A reference as containerd and crane accept it: [host[:port]/]path[:tag].
_REF = re.compile(r"^(?:(?P<host>[a-zA-Z0-9.-]+(?::[0-9]+)?)/)?(?P<path>[a-z0-9]+(?:[._/-]+[a-z0-9]+)*)(?::(?P<tag>[\w][\w.-]{0,127}))?$")


class ArchiveError(ValueError):
    """An archive that is not an image archive, or names no image."""


@dataclass(frozen=True)
class ImageArchive:
    """One archive and the fully qualified image it holds (``registry.k8s.io/pause:3.10.1``)."""

    path: Path
    image: str
    layout: bool  # an OCI image layout (pushed as is, layers untouched) or a docker tarball


def normalize(ref: str) -> str:
    """``nginx:1.27`` -> ``docker.io/library/nginx:1.27``, the way containerd names images."""
    m = _REF.match(ref)
    if not m:
        raise ArchiveError(f"{ref!r} is not an image reference like registry.example/team/app:1.0")
    host, path, tag = m.group("host"), m.group("path"), m.group("tag") or "latest"
    if host and "." not in host and ":" not in host and host != "localhost":
        host, path = None, f"{host}/{path}"  # "team/app": a Docker Hub path, not a host
    if not host:
        host = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    return f"{host}/{path}:{tag}"


def read_archive(path: Path, image: str | None = None) -> ImageArchive:
    """Name the image in ``path``; ``image`` overrides (or supplies) the archive's own tag."""
    try:
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
            layout = "oci-layout" in names and "index.json" in names
            refs: list[str] = []
            if "manifest.json" in names:
                member = tar.extractfile("manifest.json")
                entries = json.load(member) if member else []
                refs = [t for e in entries for t in (e.get("RepoTags") or [])]
            if not refs and layout:
                member = tar.extractfile("index.json")
                index = json.load(member) if member else {}
                refs = [m.get("annotations", {}).get("io.containerd.image.name", "") for m in index.get("manifests", [])]
                refs = [r for r in refs if r]
            if not layout and "manifest.json" not in names:
                raise ArchiveError(f"{path} is neither a docker save tarball nor an OCI image layout "
                                   f"(no manifest.json or index.json)")
    except (OSError, tarfile.TarError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{path} cannot be read as an image archive ({exc})") from exc
    if image is None:
        if len(refs) != 1:
            found = ", ".join(refs) or "none"
            raise ArchiveError(f"{path} names {len(refs)} images ({found}); give the image to push it as "
                               f"({{file: ..., image: registry.example/team/app:1.0}})")
        image = refs[0]
    return ImageArchive(path=path, image=normalize(image), layout=layout)
