"""Binary sources: a bundle verified against its manifest; downloads chosen and checked."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from components.binaries import Artifact, BinaryError, artifacts, download_bundle, download_key, open_directory
from components.config import BinariesConfig
from components.versions import load_versions
from tests.conftest import make_bundle

VERSIONS = load_versions()["node"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Checksum memos and downloads of these tests stay out of the developer's cache."""
    monkeypatch.setenv("KUBELAB_CACHE", str(tmp_path / "cache"))


def test_directory_bundle_verifies(tmp_path):
    b = open_directory(make_bundle(tmp_path / "b", VERSIONS), VERSIONS)
    assert b.get("bin/kubelet").path == tmp_path / "b/bin/kubelet"
    assert b.images == ("images/pause.tar", "images/coredns.tar", "images/metrics-server.tar")


def test_directory_bundle_missing_file_is_named(tmp_path):
    root = make_bundle(tmp_path / "b", VERSIONS)
    (root / "bin/kube-proxy").unlink()
    with pytest.raises(BinaryError, match=r"bin/kube-proxy is missing.*make bundle STACK="):
        open_directory(root, VERSIONS)


def test_directory_bundle_corrupt_file_is_named(tmp_path):
    root = make_bundle(tmp_path / "b", VERSIONS)
    (root / "cni/flannel").write_bytes(b"tampered")
    with pytest.raises(BinaryError, match=r"cni/flannel is corrupt \(sha256 "):
        open_directory(root, VERSIONS)


def test_directory_bundle_for_other_versions_is_refused(tmp_path):
    root = make_bundle(tmp_path / "b", {**VERSIONS, "kubernetes": "1.35.0"})
    with pytest.raises(BinaryError, match=r"kubernetes 1.35.0 \(want 1.36.4\)"):
        open_directory(root, VERSIONS)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BinaryError, match=r"not a kubelab bundle \(no SHA256SUMS\); run `make bundle STACK="):
        open_directory(tmp_path, VERSIONS)


def test_official_urls_for_pinned_versions():
    urls = {a.url for a in artifacts(VERSIONS)}
    assert "https://dl.k8s.io/release/v1.36.4/bin/linux/amd64/kubelet" in urls
    assert "https://github.com/etcd-io/etcd/releases/download/v3.6.14/etcd-v3.6.14-linux-amd64.tar.gz" in urls
    assert "https://github.com/containerd/containerd/releases/download/v2.3.4/containerd-2.3.4-linux-amd64.tar.gz" in urls
    assert "https://github.com/opencontainers/runc/releases/download/v1.5.1/runc.amd64" in urls
    provided = {rel for a in artifacts(VERSIONS) for rel in a.provides}
    from components.binaries import ALL_FILES

    assert set(ALL_FILES) <= provided  # plus etcdutl and coredns, which are not uploaded
    kubelet = next(a for a in artifacts(VERSIONS) if a.url.endswith("/kubelet"))
    assert kubelet.checksum_url == kubelet.url + ".sha256"


def test_download_flannel_cni_plugin_speaks_the_conflists_cni_version():
    """``download`` takes the flannel CNI plugin from flannel-io/cni-plugin v1.x (CNI spec
    1.0.0), never from containernetworking/plugins <= v0.9.1 (CNI <= 0.4.0)."""
    import json

    from components.binaries import DOWNLOAD_PINS
    from components.render import render

    flannel = [a for a in artifacts(VERSIONS) if "cni/flannel" in a.provides]
    assert len(flannel) == 1
    art = flannel[0]
    pin = DOWNLOAD_PINS["flannel_cni_plugin"]
    assert art.url == ("https://github.com/flannel-io/cni-plugin/releases/download/"
                       f"v{pin}/cni-plugin-flannel-linux-amd64-v{pin}.tgz")
    assert art.provides == {"cni/flannel": "flannel-amd64"} and art.checksum_url == art.url + ".sha256"
    major = int(pin.split(".")[0])
    conflist = json.loads(render("config/10-flannel.conflist.j2"))
    # flannel-io/cni-plugin speaks CNI spec 1.0.0 from its v1.0.0 on; the conflist declares it.
    assert major >= 1 and conflist["cniVersion"] == "1.0.0"


def _release(tmp_path: Path) -> list[Artifact]:
    """A fake release on file:// URLs: one plain file, one archive, with checksum files."""
    rel = tmp_path / "release"
    rel.mkdir()
    (rel / "kubelet").write_bytes(b"kubelet binary")
    (rel / "kubelet.sha256").write_text(hashlib.sha256(b"kubelet binary").hexdigest())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"etcd binary"
        info = tarfile.TarInfo("etcd-v9/etcd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (rel / "etcd.tar.gz").write_bytes(buf.getvalue())
    (rel / "SHA256SUMS").write_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  etcd.tar.gz\n")
    return [
        Artifact(f"file://{rel}/kubelet", f"file://{rel}/kubelet.sha256", {"bin/kubelet": ""}),
        Artifact(f"file://{rel}/etcd.tar.gz", f"file://{rel}/SHA256SUMS", {"bin/etcd": "etcd-v9/etcd"}),
    ]


def test_download_checksum_mismatch_is_a_clear_error_and_nothing_lands(tmp_path, capsys):
    arts = _release(tmp_path)
    cfg = BinariesConfig(source="download", path=str(tmp_path / "cache"), sha256={"kubelet": "0" * 64})
    with pytest.raises(BinaryError, match=r"checksum mismatch for file://.*/kubelet: got [0-9a-f]{64}, expected 0{64}; nothing was uploaded"):
        download_bundle(cfg, VERSIONS, arts)
    assert not (tmp_path / "cache" / download_key(VERSIONS)).exists()
    assert "kubelab: downloading file://" in capsys.readouterr().err


def test_download_verifies_against_published_checksums_and_unpacks(tmp_path):
    arts = _release(tmp_path)
    cfg = BinariesConfig(source="download", path=str(tmp_path / "cache"))
    # The fake release provides two files only, so the bundle is refused as incomplete...
    with pytest.raises(BinaryError, match=r"did not provide bin/containerd, bin/containerd-shim-runc-v2"):
        download_bundle(cfg, VERSIONS, arts)
    assert not (tmp_path / "cache" / download_key(VERSIONS)).exists()
    # ...after both were verified (published checksums) and unpacked into the layout.
    partial = tmp_path / "cache" / (download_key(VERSIONS) + ".partial")
    assert (partial / "bin/kubelet").read_bytes() == b"kubelet binary"
    assert (partial / "bin/etcd").read_bytes() == b"etcd binary"


def test_a_verified_bundle_is_not_hashed_again_but_a_changed_file_is(tmp_path, monkeypatch):
    """Every preview verifies the bundle; a file whose path, size, mtime and inode are as when
    it was hashed is taken from the memo (a no-op preview should not hash 780 MiB), and a file
    changed in place, even to the same size, is hashed again and refused."""
    import components.binaries as binaries

    root = make_bundle(tmp_path / "b", VERSIONS)
    open_directory(root, VERSIONS)
    hashed: list[Path] = []
    real = binaries.sha256_file
    monkeypatch.setattr(binaries, "sha256_file", lambda p: hashed.append(p) or real(p))
    open_directory(root, VERSIONS)
    assert hashed == []  # all from the memo
    flannel = root / "cni/flannel"
    flannel.write_bytes(bytes(b ^ 1 for b in flannel.read_bytes()))  # same size, new content and mtime
    with pytest.raises(BinaryError, match=r"cni/flannel is corrupt \(sha256 "):
        open_directory(root, VERSIONS)
    assert hashed == [flannel]
