"""Where node binaries come from, verified before anything is uploaded.

Two sources share one layout (see ``tools/bundle_build.py``)::

    bin/<kube-*, kubectl, etcd*, containerd*, ctr, runc, flanneld, coredns, registry, crane>
    cni/<bridge, host-local, loopback, portmap, flannel>
    images/<pause.tar, coredns.tar>     (directory source only)
    SHA256SUMS, versions.json

* ``directory``: a pre-staged bundle (``make tools`` builds one from Go modules, or copy one
  into an air-gapped network), checked file by file against its ``SHA256SUMS``.
* ``download``: official release URLs, fetched once into a host-side cache with a progress
  line per file and verified against a sha256 (pinned in ``binaries.sha256`` or, failing
  that, the checksum file published with the release), then unpacked into the same layout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
import tarfile
import threading
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from components.config import BinariesConfig, ClusterConfig, NodeSpec
from components.versions import bundle_key, cache_root, load_versions

# Bundle files per install step.
CONTROL_PLANE_FILES = ("bin/etcd", "bin/etcdctl", "bin/etcdutl", "bin/kube-apiserver", "bin/kube-controller-manager",
                       "bin/kube-scheduler", "bin/kubectl")
NETWORK_FILES = ("bin/flanneld",)
# The private registry (registry.enabled) and the tool that pushes archives into it.
REGISTRY_FILES = ("bin/registry", "bin/crane")
# The container runtime and CNI plugins, on every node that runs pods.
RUNTIME_FILES = ("bin/containerd", "bin/containerd-shim-runc-v2", "bin/ctr", "bin/runc",
                 "cni/bridge", "cni/host-local", "cni/loopback", "cni/portmap", "cni/flannel")
WORKER_FILES = (*RUNTIME_FILES, "bin/kubelet", "bin/kube-proxy")
IMAGE_FILES = ("images/pause.tar", "images/coredns.tar", "images/metrics-server.tar")
# The addon whose image each archive carries (preloaded only when that addon is on).
IMAGE_ADDON = {"images/coredns.tar": "coredns", "images/metrics-server.tar": "metrics_server"}
ALL_FILES = CONTROL_PLANE_FILES + NETWORK_FILES + WORKER_FILES + REGISTRY_FILES
# Image archives and preloads travel gzipped one by one (Bundle.blob): level 6 is zlib's
# default, at about 40 MB/s on the deploy host, once per file content.
GZIP_LEVEL = 6
# Binaries travel in a few solid xz archives per node (node_archives): kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy and kubectl share most of their code, and
# a 64 MiB dictionary finds it across files. Measured on the 1.36.4 bundle: those five are
# 94 MB gzipped one by one, 50 MB as one xz archive. The x86 filter turns relative call
# addresses absolute, which repeat: 5 % fewer bytes. Compressing costs about 2 MB/s on the
# deploy host, once per archive content (cached); unpacking on the node is liblzma's.
ARCHIVE_FILTERS = ({"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9})
ARCHIVE_FORMAT = "kubelab-archive-v1"  # in the cache key: a new layout or filter is a new archive


class BinaryError(Exception):
    """A bundle or download problem; the message names the file and the fix."""


@dataclass(frozen=True)
class LocalFile:
    path: Path
    sha256: str


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: bundle-relative path -> local file with its checksum."""

    root: Path
    files: dict[str, LocalFile]

    def get(self, rel: str) -> LocalFile:
        return self.files[rel]

    def blob(self, rel: str) -> Path:
        """The file gzipped, as uploads send it (see :func:`gzip_blob`)."""
        return gzip_blob(self.files[rel])

    @property
    def images(self) -> tuple[str, ...]:
        return tuple(f for f in IMAGE_FILES if f in self.files)

    def images_for(self, addons: dict[str, bool]) -> list[str]:
        """The image archives a cluster with these addons runs (pause always)."""
        return [i for i in self.images if addons.get(IMAGE_ADDON.get(i, ""), True)]


def gzip_blob(f: LocalFile) -> Path:
    """The file gzipped, under a content-addressed name: ``$KUBELAB_CACHE/blobs/<sha256>.gz``.

    Uploads send this: Go binaries and image layers shrink to about a third, and the node
    checks the sha256 of what it unpacks against the original's. The name (and, gzip being
    deterministic here: no name, no mtime, fixed level) the bytes depend only on the
    content, so a version bump plans updates of the files that really changed, not of
    every upload whose bundle directory was renamed. Made once per content.
    """
    out = cache_root() / "blobs" / f"{f.sha256}.gz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        with f.path.open("rb") as src, tmp.open("wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        tmp.replace(out)
    return out


def archive_path(members: Sequence[tuple[str, LocalFile]]) -> Path:
    """Where :func:`xz_archive` keeps these members: named by the sha256 of their list."""
    key = hashlib.sha256("".join([f"{ARCHIVE_FORMAT}\n", *(f"{rel} {f.sha256}\n" for rel, f in members)]).encode())
    return cache_root() / "blobs" / f"{key.hexdigest()}.tar.xz"


def xz_archive(members: Sequence[tuple[str, LocalFile]]) -> Path:
    """Bundle files as one solid tar.xz, content-addressed (:func:`archive_path`), made once.

    The tar is deterministic (members in the given order, mode 0755, owner root, mtime 0), so
    the same files make the same bytes and a no-op `pulumi up` uploads nothing. The node
    checks every member's sha256 against the bundle's after unpacking (unpack-archive.sh.j2).
    """
    out = archive_path(members)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with lzma.LZMAFile(tmp, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=ARCHIVE_FILTERS) as xz, \
            tarfile.open(fileobj=xz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel, f in members:
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime, info.uid, info.gid = f.path.stat().st_size, 0o755, 0, 0, 0
            with f.path.open("rb") as fh:
                tar.addfile(info, fh)
    tmp.replace(out)
    return out


def xz_archives(archives: Sequence[Sequence[tuple[str, LocalFile]]]) -> list[Path]:
    """:func:`xz_archive` for each; the missing ones are compressed side by side (liblzma lets
    go of the GIL), so the first preview on a new bundle waits minutes once, then never."""
    todo = {archive_path(a): a for a in archives if not archive_path(a).is_file()}
    if todo:
        workers = min(len(todo), os.cpu_count() or 1)
        size = sum(f.path.stat().st_size for a in todo.values() for _, f in a)
        print(f"kubelab: compressing {len(todo)} node archive(s), {size >> 20} MiB, once per bundle "
              f"(about {size / 2e6 / workers:.0f} s)", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(xz_archive, todo.values()))
    return [xz_archive(a) for a in archives]


def node_archives(cfg: ClusterConfig, node: NodeSpec) -> dict[str, tuple[str, ...]]:
    """The bundle files a node's steps install, as the archives it gets, each named for what it
    starts. A master gets etcd alone first, so etcd starts while the larger archive is still on
    its way; everything else is one archive, the Kubernetes binaries side by side (they share
    most of their code, see ARCHIVE_FILTERS). ``HostAccess.step`` refuses a binary that no
    archive of its node carries, so this list and the steps cannot drift apart unnoticed."""
    kube = ["bin/kube-apiserver", "bin/kube-controller-manager", "bin/kube-scheduler"] if node.role == "master" else []
    kube += ["bin/kube-proxy", *(["bin/kubelet"] if node.runs_workloads else []),
             *(["bin/kubectl"] if node.role == "master" else []), "bin/flanneld"]
    if node.role == "master" and cfg.backup.enabled:
        kube.append("bin/etcdutl")
    if node.runs_workloads:
        kube += RUNTIME_FILES
    if node.name == cfg.master_nodes[0].name and cfg.registry.enabled:
        kube += REGISTRY_FILES
    if node.role != "master":
        return {"node": tuple(kube)}
    return {"etcd": ("bin/etcd", "bin/etcdctl"), "kubernetes": tuple(kube)}


def prepare_archives(cfg: ClusterConfig, bundle: Bundle) -> dict[str, dict[str, tuple[str, ...]]]:
    """Every node's archives (:func:`node_archives`), compressed now if new, side by side."""
    archives = {n.name: node_archives(cfg, n) for n in cfg.nodes}
    xz_archives([[(rel, bundle.get(rel)) for rel in rels] for a in archives.values() for rels in a.values()])
    return archives


def checked_sha256(path: Path) -> str:
    """``sha256_file``, remembered per file under the cache (``checked/``), keyed by path, size,
    mtime and inode: every preview verifies the whole bundle (about 780 MiB, a second of CPU
    that a busy host doubles) and the node archives, and a file that changed in any of those
    ways is hashed again. What it does not catch is a rewrite that restores all four."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()
    memo = cache_root() / "checked" / key
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(digest + "\n")
        tmp.replace(memo)
    except OSError:
        pass  # a read-only cache only costs the hashing
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def open_directory(root: Path, versions: dict[str, str], require_images: bool = True) -> Bundle:
    """Verify a bundle directory against its manifest and the configured versions."""
    sums_file = root / "SHA256SUMS"
    if not sums_file.is_file():
        raise BinaryError(
            f"binaries.path: {root} is not a kubelab bundle (no SHA256SUMS); run `make bundle STACK=<this stack>` "
            f"to build one for its versions, or set binaries.path to a bundle directory"
        )
    vfile = root / "versions.json"
    if vfile.is_file():
        built = json.loads(vfile.read_text())
        diff = {k: (built.get(k), v) for k, v in versions.items() if built.get(k) != v}
        if diff:
            listed = ", ".join(f"{k} {b} (want {w})" for k, (b, w) in sorted(diff.items()))
            raise BinaryError(f"binaries.path: bundle {root} was built for other versions: {listed}; rebuild it with `make bundle STACK=<this stack>`")
    sums = read_sums(sums_file)
    wanted = ALL_FILES + (IMAGE_FILES if require_images else ())
    files: dict[str, LocalFile] = {}
    for rel in wanted:
        path = root / rel
        if rel not in sums:
            raise BinaryError(f"binaries.path: {rel} is not listed in {sums_file}; the bundle is incomplete, rebuild it")
        if not path.is_file():
            raise BinaryError(f"binaries.path: {path} is missing; the bundle is incomplete, rebuild it with `make bundle STACK=<this stack>`")
        actual = checked_sha256(path)
        if actual != sums[rel]:
            raise BinaryError(f"binaries.path: {path} is corrupt (sha256 {actual}, manifest says {sums[rel]}); rebuild or re-copy the bundle")
        files[rel] = LocalFile(path, actual)
    for rel in IMAGE_FILES:
        if rel not in files and rel in sums and (root / rel).is_file():
            files[rel] = LocalFile(root / rel, sums[rel])
    return Bundle(root=root, files=files)


# --- download source --------------------------------------------------------------------------

GITHUB = "https://github.com"
# Release pins used only by the download source (versions.toml [download]).
DOWNLOAD_PINS: dict[str, str] = dict(load_versions().get("download", {}))


@dataclass(frozen=True)
class Artifact:
    """One release file: where it is, where its published checksum is, what it provides."""

    url: str
    checksum_url: str
    provides: dict[str, str]  # bundle path -> member name inside the archive ("" = the file itself)


def artifacts(versions: dict[str, str]) -> list[Artifact]:
    """Official linux/amd64 release URLs for these versions."""
    k8s, etcd, ctd = versions["kubernetes"], versions["etcd"], versions["containerd"]
    runc, cni, fl = versions["runc"], versions["cni_plugins"], versions["flannel"]
    dns = versions["coredns"]
    out = []
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"):
        url = f"https://dl.k8s.io/release/v{k8s}/bin/linux/amd64/{name}"
        out.append(Artifact(url, url + ".sha256", {f"bin/{name}": ""}))
    etcd_url = f"{GITHUB}/etcd-io/etcd/releases/download/v{etcd}/etcd-v{etcd}-linux-amd64.tar.gz"
    out.append(Artifact(etcd_url, f"{GITHUB}/etcd-io/etcd/releases/download/v{etcd}/SHA256SUMS",
                        {f"bin/{b}": f"etcd-v{etcd}-linux-amd64/{b}" for b in ("etcd", "etcdctl", "etcdutl")}))
    ctd_url = f"{GITHUB}/containerd/containerd/releases/download/v{ctd}/containerd-{ctd}-linux-amd64.tar.gz"
    out.append(Artifact(ctd_url, ctd_url + ".sha256sum",
                        {f"bin/{b}": f"bin/{b}" for b in ("containerd", "ctr", "containerd-shim-runc-v2")}))
    out.append(Artifact(f"{GITHUB}/opencontainers/runc/releases/download/v{runc}/runc.amd64",
                        f"{GITHUB}/opencontainers/runc/releases/download/v{runc}/runc.sha256sum", {"bin/runc": ""}))
    cni_url = f"{GITHUB}/containernetworking/plugins/releases/download/v{cni}/cni-plugins-linux-amd64-v{cni}.tgz"
    out.append(Artifact(cni_url, cni_url + ".sha256",
                        {f"cni/{p}": f"./{p}" for p in ("bridge", "host-local", "loopback", "portmap")}))
    fl_url = f"{GITHUB}/flannel-io/flannel/releases/download/v{fl}/flannel-v{fl}-linux-amd64.tar.gz"
    out.append(Artifact(fl_url, fl_url + ".sha256", {"bin/flanneld": "flanneld"}))
    # The flannel CNI plugin from its own project's releases (flannel-io/cni-plugin v1.x speaks
    # CNI 1.0.0, which the rendered conflist declares); the release pin is versions.toml [download].
    flcni = DOWNLOAD_PINS["flannel_cni_plugin"]
    flcni_url = f"{GITHUB}/flannel-io/cni-plugin/releases/download/v{flcni}/cni-plugin-flannel-linux-amd64-v{flcni}.tgz"
    out.append(Artifact(flcni_url, flcni_url + ".sha256", {"cni/flannel": "flannel-amd64"}))
    dist = versions["distribution"]
    reg_url = f"{GITHUB}/distribution/distribution/releases/download/v{dist}/registry_{dist}_linux_amd64.tar.gz"
    out.append(Artifact(reg_url, reg_url + ".sha256", {"bin/registry": "registry"}))
    crane_base = f"{GITHUB}/google/go-containerregistry/releases/download/v{versions['crane']}"
    out.append(Artifact(f"{crane_base}/go-containerregistry_Linux_x86_64.tar.gz", f"{crane_base}/checksums.txt",
                        {"bin/crane": "crane"}))
    dns_url = f"{GITHUB}/coredns/coredns/releases/download/v{dns}/coredns_{dns}_linux_amd64.tgz"
    out.append(Artifact(dns_url, dns_url + ".sha256", {"bin/coredns": "coredns"}))
    return out


def _fetch(url: str) -> bytes:
    print(f"kubelab: downloading {url}", file=sys.stderr, flush=True)
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.read()


def _expected_sum(art: Artifact, pinned: dict[str, str]) -> str:
    name = art.url.rsplit("/", 1)[1]
    if name in pinned:
        return pinned[name]
    text = _fetch(art.checksum_url).decode()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 1 and len(parts[0]) == 64:
            return parts[0]
        if len(parts) >= 2 and parts[1].lstrip("*").rsplit("/", 1)[-1] == name:
            return parts[0]
    raise BinaryError(f"binaries: no sha256 for {name} in {art.checksum_url}; pin it in binaries.sha256")


def download_key(versions: dict[str, str]) -> str:
    """Directory of a downloaded bundle: the node versions plus the download-only pins."""
    return bundle_key({**versions, **{f"download.{k}": v for k, v in DOWNLOAD_PINS.items()}})


def download_bundle(cfg: BinariesConfig, versions: dict[str, str], arts: list[Artifact] | None = None) -> Bundle:
    """Fetch (once) and verify every release file, then unpack into the bundle layout."""
    root = Path(cfg.path) / download_key(versions)
    if (root / "SHA256SUMS").is_file():
        return open_directory(root, versions, require_images=False)
    tmp = root.with_name(root.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for art in arts if arts is not None else artifacts(versions):
        data = _fetch(art.url)
        want = _expected_sum(art, cfg.sha256)
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise BinaryError(f"binaries: checksum mismatch for {art.url}: got {got}, expected {want}; nothing was uploaded")
        for rel, member in art.provides.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if member == "":
                dest.write_bytes(data)
            else:
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    fh = tar.extractfile(member)
                    if fh is None:
                        raise BinaryError(f"binaries: {member} not found in {art.url}")
                    dest.write_bytes(fh.read())
            dest.chmod(0o755)
    missing = [rel for rel in sorted(ALL_FILES) if not (tmp / rel).is_file()]
    if missing:
        raise BinaryError(f"binaries: the release downloads did not provide {', '.join(missing)}; pin the versions that publish them")
    (tmp / "versions.json").write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    lines = [f"{sha256_file(tmp / rel)}  {rel}" for rel in sorted(ALL_FILES)]
    (tmp / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    tmp.rename(root)
    return open_directory(root, versions, require_images=False)


def resolve(cfg: BinariesConfig, versions: dict[str, str]) -> Bundle:
    """The verified bundle for this stack, from whichever source is configured."""
    if cfg.source == "directory":
        return open_directory(Path(cfg.path), versions)
    return download_bundle(cfg, versions)
