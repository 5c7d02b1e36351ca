"""Shared fixtures: an isolated cache, SSH keys, a small but well-formed bundle, base configs."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.binaries import ALL_FILES, IMAGE_FILES  # noqa: E402
from components.versions import bundle_key, load_versions  # noqa: E402

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0d3HlFXdz2m4Y2o9Tq3Yq8h7dVQ7m0nV4oJ8m4Q9x test@kubelab"


def image_archive(path: Path, ref: str, layout: bool = True) -> Path:
    """A small, well-formed image archive naming ``ref``: an OCI layout tar (with the docker
    ``manifest.json`` beside it, as the bundle writes them) or a docker save tarball."""
    entries = {"manifest.json": json.dumps([{"Config": "config.json", "RepoTags": [ref], "Layers": []}]).encode()}
    if layout:
        index = {"schemaVersion": 2, "manifests": [{"annotations": {"io.containerd.image.name": ref}}]}
        entries |= {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": json.dumps(index).encode()}
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_bundle(root: Path, versions: dict[str, str]) -> Path:
    """A bundle in the real layout whose files are small stand-ins, with a valid manifest."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    refs = {"images/pause.tar": f"registry.k8s.io/pause:{versions['pause']}",
            "images/coredns.tar": f"registry.k8s.io/coredns/coredns:v{versions['coredns']}",
            "images/metrics-server.tar": f"registry.k8s.io/metrics-server/metrics-server:v{versions['metrics_server']}"}
    for rel in sorted(ALL_FILES + IMAGE_FILES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel in refs:
            image_archive(path, refs[rel])
        else:
            path.write_bytes(f"stand-in for {rel}\n".encode())
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    (root / "versions.json").write_text(json.dumps(versions, sort_keys=True))
    return root


def prepare_cache(root: Path) -> Path:
    """Fill ``root`` like a KUBELAB_CACHE: an SSH key pair, a base image, a bundle."""
    (root / "ssh").mkdir(parents=True)
    (root / "ssh/id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ntest\n-----END OPENSSH PRIVATE KEY-----\n")
    (root / "ssh/id_ed25519.pub").write_text(PUBKEY + "\n")
    (root / "images").mkdir()
    (root / "images/debian-trixie.qcow2").write_bytes(b"QFI\xfb")
    versions = load_versions()["node"]
    make_bundle(root / "bundles" / bundle_key(versions), versions)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An isolated KUBELAB_CACHE for one test."""
    root = prepare_cache(tmp_path / "cache")
    monkeypatch.setenv("KUBELAB_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    """An isolated KUBELAB_CACHE shared by one module's tests (program runs are slow-ish)."""
    root = prepare_cache(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBELAB_CACHE", str(root))
        yield root


def base_config(cache: Path, platform: str = "libvirt") -> dict:
    """A valid config for ``platform`` (1 master + 2 workers)."""
    raw: dict = {
        "name": "kubelab-test",
        "platform": platform,
        "masters": {"count": 1},
        "workers": {"count": 2},
        "ssh": {"private_key_file": str(cache / "ssh/id_ed25519")},
    }
    if platform == "libvirt":
        raw["libvirt"] = {"domain_type": "qemu", "cpu_mode": "custom", "cpu_model": "qemu64",
                          "image": str(cache / "images/debian-trixie.qcow2")}
    elif platform == "digitalocean":
        raw["digitalocean"] = {"region": "fra1", "allowed_cidrs": ["203.0.113.7/32"]}
    elif platform == "static":
        del raw["masters"], raw["workers"]
        raw["network"] = {"node_cidr": "192.168.50.0/24"}
        raw["static"] = {"hosts": [
            {"name": "svr001", "address": "192.168.50.11", "role": "master"},
            {"name": "svr002", "address": "192.168.50.12", "role": "worker"},
            {"name": "svr003", "address": "192.168.50.13", "role": "worker"},
        ]}
    return copy.deepcopy(raw)


@pytest.fixture
def config_for(cache):
    return lambda platform="libvirt": base_config(cache, platform)
