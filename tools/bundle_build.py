"""Build the kubelab node bundle (Kubernetes release binaries and images) from Go modules.

Every component is built from the Go module proxy (no vendor downloads), cached under
``$KUBELAB_CACHE/<name>-v<version>`` via :func:`kltools.cached`, checked (pinned version,
static linking) and assembled into ``$KUBELAB_CACHE/bundles/<bundle_key>/``::

    versions.json  SHA256SUMS  bin/... (incl. registry, crane)  cni/...  images/pause.tar  images/coredns.tar  images/metrics-server.tar

Usage: ``python tools/bundle_build.py [COMPONENT ...]`` (no argument: the whole bundle).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import kltools
from kltools import cache_root, cached, go_env, log, run, sha256_file

if str(kltools.REPO) not in sys.path:
    sys.path.insert(0, str(kltools.REPO))
from components.versions import bundle_key

# Module paths (versions come from the [node] table of versions.toml).
K8S = "k8s.io/kubernetes"
ETCD = "go.etcd.io/etcd"
CONTAINERD = "github.com/containerd/containerd/v2"
RUNC = "github.com/opencontainers/runc"
CNI = "github.com/containernetworking/plugins"
FLANNEL = "github.com/flannel-io/flannel"
# github.com/flannel-io/cni-plugin is not served by the module proxy here (403 for every
# version); the flannel CNI plugin it was split from lives in CNI plugins <= v0.9.1 and is
# rebuilt against the current libcni.
FLANNEL_CNI = "github.com/containernetworking/plugins"
COREDNS = "github.com/coredns/coredns"
METRICS_SERVER = "sigs.k8s.io/metrics-server"
DISTRIBUTION = "github.com/distribution/distribution/v3"
CRANE = "github.com/google/go-containerregistry"
# flannel >= 0.28.9 requires tencentcloud vpc versions the proxy refuses (403); the tencentvpc
# backend is unused here, so such a version is replaced by one the proxy serves.
FLANNEL_FALLBACKS = {"github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc": "v1.3.75"}

KUBE_BINS = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
]
CNI_PLUGINS = {
    "bridge": "main/bridge",
    "host-local": "ipam/host-local",
    "loopback": "main/loopback",
    "portmap": "meta/portmap",
}
FIXED_TIME = "1970-01-01T00:00:00Z"  # image timestamps: fixed so archives hash the same


# --------------------------------------------------------------------------- helpers


def _go(args: list[str], cwd: Path, cgo: bool = False, env: dict[str, str] | None = None) -> str:
    """Run ``go ARGS`` with the shared offline Go environment."""
    return run(
        ["go", *args],
        cwd=cwd,
        env={**go_env(), "CGO_ENABLED": "1" if cgo else "0", **(env or {})},
    )


def _module(path: str, version: str) -> dict:
    """``go mod download -json`` of one module version (its Dir, Time, GoMod)."""
    with tempfile.TemporaryDirectory() as tmp:
        info = json.loads(_go(["mod", "download", "-json", f"{path}@{version}"], cwd=Path(tmp)))
    if info.get("Error"):
        raise SystemExit(f"[tools] {path}@{version}: {info['Error']}")
    return {**json.loads(Path(info["Info"]).read_text()), **info}


def _wrapper(work: Path, require: dict[str, str], replace: dict[str, str] | None = None) -> Path:
    """A throw-away main module requiring ``require`` and pinning ``replace`` (module -> version)."""
    work.mkdir(parents=True, exist_ok=True)
    lines = ["module kubelab.local/wrapper", "", "go 1.26", "", "require ("]
    lines += [f"\t{mod} {ver}" for mod, ver in require.items()] + [")", ""]
    if replace:
        lines += ["replace ("] + [f"\t{mod} => {mod} {ver}" for mod, ver in replace.items()] + [")", ""]
    (work / "go.mod").write_text("\n".join(lines))
    return work


def _ldflags(xs: dict[str, str], extra: str = "") -> str:
    """``-s -w`` plus ``-X key=value`` for each entry (values must not contain spaces)."""
    return " ".join(["-s -w", *(f"-X {k}={v}" for k, v in xs.items()), extra]).strip()


def _elf_interp(path: Path) -> bool:
    """True when the ELF file has a PT_INTERP header, i.e. it is dynamically linked."""
    with path.open("rb") as fh:
        data = fh.read(65536)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit(f"[tools] {path} is not a 64-bit ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _check(path: Path, args: list[str], expect: str) -> str:
    """Fail unless ``path ARGS`` prints ``expect`` and ``path`` is statically linked."""
    if _elf_interp(path):
        raise SystemExit(f"[tools] {path.name} is dynamically linked")
    proc = subprocess.run([str(path), *args], check=False, capture_output=True, text=True, timeout=60)
    out = (proc.stdout + proc.stderr).strip()
    if expect not in out:
        raise SystemExit(f"[tools] {path.name} {' '.join(args)}: expected {expect!r}, got:\n{out}")
    first = next((ln for ln in out.splitlines() if expect in ln), out)
    log(f"ok {path.name}: {first.strip()} (static)")
    return out


def _check_cni(path: Path, tag: str) -> None:
    """Check a CNI plugin's build version and that it speaks CNI spec 1.0.0."""
    _check(path, [], f"plugin {tag}")
    env = {**os.environ, "CNI_COMMAND": "VERSION"}
    proc = subprocess.run(
        [str(path)],
        check=False,
        input='{"cniVersion":"1.0.0"}',
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        supported = json.loads(proc.stdout)["supportedVersions"]
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"[tools] {path.name} VERSION: {proc.stdout}{proc.stderr}") from exc
    if "1.0.0" not in supported:
        raise SystemExit(f"[tools] {path.name} does not support CNI 1.0.0: {supported}")


# --------------------------------------------------------------------------- components


def build_kubernetes(ver: str, out: Path) -> None:
    """kube-apiserver, -controller-manager, -scheduler, kubelet, kube-proxy, kubectl (wrapper)."""
    tag = f"v{ver}"
    major, minor, patch = ver.split(".")[:3]
    info = _module(K8S, tag)
    gomod = Path(info["GoMod"]).read_text()
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", gomod, re.MULTILINE)
    if not staging:
        raise SystemExit("[tools] no staging replaces found in k8s.io/kubernetes go.mod")
    with tempfile.TemporaryDirectory(prefix="kl-k8s-") as tmp:
        work = _wrapper(Path(tmp), {K8S: tag}, {m: f"v0.{minor}.{patch}" for m in staging})
        pkgs = [f"{K8S}/cmd/{b}" for b in KUBE_BINS]
        _go(["get", *(f"{p}@{tag}" for p in pkgs)], cwd=work)
        xs: dict[str, str] = {}
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            xs |= {
                f"{pkg}.gitVersion": tag,
                f"{pkg}.gitMajor": major,
                f"{pkg}.gitMinor": minor,
                f"{pkg}.gitTreeState": "clean",
                f"{pkg}.buildDate": info["Time"],
            }
        bindir = out / "bin"
        bindir.mkdir()
        _go(
            [
                "build",
                "-trimpath",
                "-tags",
                "selinux,notest,grpcnotrace",
                "-ldflags",
                _ldflags(xs),
                "-o",
                f"{bindir}/",
                *pkgs,
            ],
            cwd=work,
        )
    for b in KUBE_BINS:
        _check(
            bindir / b,
            ["version", "--client"] if b == "kubectl" else ["--version"],
            tag,
        )


def build_etcd(ver: str, out: Path) -> None:
    """etcd, etcdctl, etcdutl (wrapper: sibling modules pinned to the same tag)."""
    tag = f"v{ver}"
    mains = {
        "etcd": f"{ETCD}/server/v3",
        "etcdctl": f"{ETCD}/etcdctl/v3",
        "etcdutl": f"{ETCD}/etcdutl/v3",
    }
    siblings = [f"{ETCD}/{m}" for m in ("api/v3", "client/pkg/v3", "client/v3", "pkg/v3", "server/v3")]
    with tempfile.TemporaryDirectory(prefix="kl-etcd-") as tmp:
        work = _wrapper(Path(tmp), dict.fromkeys(mains.values(), tag), dict.fromkeys(siblings, tag))
        _go(["get", *(f"{p}@{tag}" for p in mains.values())], cwd=work)
        ldflags = _ldflags({f"{ETCD}/api/v3/version.GitSHA": f"module-{tag}"})
        (out / "bin").mkdir()
        for name, pkg in mains.items():
            _go(
                [
                    "build",
                    "-trimpath",
                    "-ldflags",
                    ldflags,
                    "-o",
                    str(out / "bin" / name),
                    pkg,
                ],
                cwd=work,
            )
    _check(out / "bin/etcd", ["--version"], f"etcd Version: {ver}")
    _check(out / "bin/etcdctl", ["version"], f"etcdctl version: {ver}")
    _check(out / "bin/etcdutl", ["version"], f"etcdutl version: {ver}")


def _go_install(
    pkgs: list[str],
    tag: str,
    bindir: Path,
    ldflags: str,
    tags: str = "",
    cgo: bool = False,
    extra: list[str] | None = None,
) -> None:
    """``go install PKG@TAG ...`` into ``bindir`` (the module's own go.mod, no replaces)."""
    bindir.mkdir(parents=True, exist_ok=True)
    args = ["install", "-trimpath", *(extra or []), "-ldflags", ldflags]
    if tags:
        args += ["-tags", tags]
    with tempfile.TemporaryDirectory(prefix="kl-install-") as tmp:
        _go(
            [*args, *(f"{p}@{tag}" for p in pkgs)],
            cwd=Path(tmp),
            cgo=cgo,
            env={"GOBIN": str(bindir)},
        )


def build_containerd(ver: str, out: Path) -> None:
    """containerd, ctr, containerd-shim-runc-v2 (install, CGO off)."""
    tag = f"v{ver}"
    xs = {
        f"{CONTAINERD}/version.Version": tag,
        f"{CONTAINERD}/version.Package": CONTAINERD,
        f"{CONTAINERD}/version.Revision": f"module-{tag}",
    }
    bindir = out / "bin"
    _go_install(
        [f"{CONTAINERD}/cmd/containerd", f"{CONTAINERD}/cmd/ctr"],
        tag,
        bindir,
        _ldflags(xs),
        tags="urfave_cli_no_docs",
    )
    _go_install(
        [f"{CONTAINERD}/cmd/containerd-shim-runc-v2"],
        tag,
        bindir,
        _ldflags(xs),
        tags="urfave_cli_no_docs no_grpc",
    )
    _check(bindir / "containerd", ["--version"], f"{CONTAINERD} {tag}")
    _check(bindir / "ctr", ["--version"], f"ctr {CONTAINERD} {tag}")
    _check(bindir / "containerd-shim-runc-v2", ["-v"], f"Version:  {tag}")


def build_runc(ver: str, out: Path) -> None:
    """runc (install, cgo + libseccomp, static PIE like ``make static``)."""
    tag = f"v{ver}"
    ldflags = _ldflags(
        {"main.gitCommit": f"module-{tag}"},
        "-linkmode external -extldflags -static-pie",
    )
    _go_install(
        [RUNC],
        tag,
        out / "bin",
        ldflags,
        tags="seccomp urfave_cli_no_docs netgo osusergo",
        cgo=True,
        extra=["-buildmode=pie"],
    )
    _check(out / "bin/runc", ["--version"], f"runc version {ver}")


def build_cni_plugins(ver: str, out: Path) -> None:
    """CNI bridge, host-local, loopback, portmap (install, CGO off)."""
    tag = f"v{ver}"
    ldflags = _ldflags({f"{CNI}/pkg/utils/buildversion.BuildVersion": tag})
    _go_install([f"{CNI}/plugins/{p}" for p in CNI_PLUGINS.values()], tag, out / "cni", ldflags)
    for name in CNI_PLUGINS:
        _check_cni(out / "cni" / name, tag)


def _obtainable(path: str, version: str) -> bool:
    """Whether the module proxy serves ``path@version`` (its zip, not just its go.mod)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["go", "mod", "download", "-json", f"{path}@{version}"],
            check=False,
            cwd=tmp,
            capture_output=True,
            text=True,
            env={**os.environ, **go_env()},
        )
    return proc.returncode == 0


def build_flannel(ver: str, out: Path) -> None:
    """flanneld (cgo for the udp backend, static like upstream's Makefile; wrapper).

    Dependencies the proxy refuses are pinned to an obtainable version (FLANNEL_FALLBACKS).
    """
    tag = f"v{ver}"
    gomod = Path(_module(FLANNEL, tag)["GoMod"]).read_text()
    replace: dict[str, str] = {}
    for mod, fallback in FLANNEL_FALLBACKS.items():
        req = re.search(rf"^\s*{re.escape(mod)} (v\S+)", gomod, re.MULTILINE)
        if req and not _obtainable(mod, req.group(1)):
            log(f"{mod}@{req.group(1)} is not obtainable: using {fallback}")
            replace[mod] = fallback
    ldflags = _ldflags({f"{FLANNEL}/pkg/version.Version": tag}, "-extldflags -static")
    with tempfile.TemporaryDirectory(prefix="kl-flannel-") as tmp:
        work = _wrapper(Path(tmp), {FLANNEL: tag}, replace)
        _go(["get", f"{FLANNEL}@{tag}"], cwd=work)
        (out / "bin").mkdir()
        _go(
            [
                "build",
                "-trimpath",
                "-tags",
                "netgo osusergo",
                "-ldflags",
                ldflags,
                "-o",
                str(out / "bin/flanneld"),
                FLANNEL,
            ],
            cwd=work,
            cgo=True,
        )
    _check(out / "bin/flanneld", ["--version"], tag)


def build_flannel_cni(ver: str, cni_ver: str, out: Path) -> None:
    """The flannel CNI plugin: ``plugins/meta/flannel`` of CNI plugins ``ver`` (copy pattern).

    Its Go files are rebuilt against the libcni that CNI plugins ``cni_ver`` use (as upstream
    flannel-io/cni-plugin does), so it accepts ``cniVersion`` 1.0.0 like bridge and portmap.
    """
    src = Path(_module(FLANNEL_CNI, f"v{ver}")["Dir"]) / "plugins/meta/flannel"
    gomod = Path(_module(CNI, f"v{cni_ver}")["GoMod"]).read_text()
    libcni = re.search(r"github\.com/containernetworking/cni (v\S+)", gomod)
    if not libcni:
        raise SystemExit(f"[tools] no containernetworking/cni requirement in {CNI} v{cni_ver}")
    with tempfile.TemporaryDirectory(prefix="kl-flannel-cni-") as tmp:
        work = Path(tmp)
        for name in ("flannel.go", "flannel_linux.go"):
            (work / name).write_bytes((src / name).read_bytes())
        gomod_text = "module kubelab.local/flannel-cni\n\ngo 1.26\n\nrequire (\n"
        gomod_text += f"\tgithub.com/containernetworking/cni {libcni.group(1)}\n\t{CNI} v{cni_ver}\n)\n"
        (work / "go.mod").write_text(gomod_text)
        _go(["mod", "tidy"], cwd=work)
        ldflags = _ldflags({f"{CNI}/pkg/utils/buildversion.BuildVersion": f"v{ver}"})
        (out / "cni").mkdir()
        _go(
            [
                "build",
                "-trimpath",
                "-ldflags",
                ldflags,
                "-o",
                str(out / "cni/flannel"),
                ".",
            ],
            cwd=work,
        )
    _check_cni(out / "cni/flannel", f"v{ver}")


def build_coredns(ver: str, out: Path) -> None:
    """coredns (install, CGO off; generated plugin files are in the module)."""
    tag = f"v{ver}"
    ldflags = _ldflags({f"{COREDNS}/coremain.GitCommit": f"module-{tag}"})
    _go_install([COREDNS], tag, out / "bin", ldflags)
    _check(out / "bin/coredns", ["-version"], f"CoreDNS-{ver}")


def build_metrics_server(ver: str, out: Path) -> None:
    """metrics-server (install, CGO off), version set the way its Makefile does."""
    tag = f"v{ver}"
    ldflags = _ldflags({"k8s.io/client-go/pkg/version.gitVersion": tag,
                        "k8s.io/client-go/pkg/version.gitCommit": f"module-{tag}",
                        "k8s.io/client-go/pkg/version.buildDate": FIXED_TIME})
    _go_install([f"{METRICS_SERVER}/cmd/metrics-server"], tag, out / "bin", ldflags)
    _check(out / "bin/metrics-server", ["--version"], tag)


def build_registry(ver: str, out: Path) -> None:
    """The CNCF Distribution registry (install, CGO off), version set the way its Makefile does."""
    tag = f"v{ver}"
    ldflags = _ldflags({f"{DISTRIBUTION}/version.version": tag,
                        f"{DISTRIBUTION}/version.revision": f"module-{tag}"})
    _go_install([f"{DISTRIBUTION}/cmd/registry"], tag, out / "bin", ldflags)
    _check(out / "bin/registry", ["--version"], tag)


def build_crane(ver: str, out: Path) -> None:
    """crane (go-containerregistry): pushes image archives into the registry on the node."""
    tag = f"v{ver}"
    _go_install([f"{CRANE}/cmd/crane"], tag, out / "bin", _ldflags({f"{CRANE}/cmd/crane/cmd.Version": tag}))
    _check(out / "bin/crane", ["version"], tag)


def build_pause(ver: str, k8s_ver: str, out: Path) -> None:
    """pause from ``build/pause/linux/pause.c`` in the k8s.io/kubernetes module (gcc -static)."""
    src = Path(_module(K8S, f"v{k8s_ver}")["Dir"]) / "build/pause/linux/pause.c"
    (out / "bin").mkdir()
    run(
        [
            "gcc",
            "-Os",
            "-Wall",
            "-Werror",
            "-static",
            f"-DVERSION=v{ver}",
            "-o",
            str(out / "bin/pause"),
            str(src),
        ]
    )
    run(["strip", str(out / "bin/pause")])
    _check(out / "bin/pause", ["-v"], f"pause.c v{ver}")


# --------------------------------------------------------------------------- images


def _tar_bytes(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A deterministic tar (fixed mtime, root owner) of ``name -> (data, mode)``, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest, len(data)


def write_oci_archive(dest: Path, ref: str, files: dict[str, tuple[bytes, int]], config: dict) -> None:
    """Write an OCI image-layout tar (plus docker ``manifest.json``) for one single-layer image.

    ``ref`` is the full name (``registry/repo:tag``); ``config`` is the image ``config`` object
    (Entrypoint, User, ...). Importable with ``ctr images import`` and ``docker load``.

    The layer is gzip-compressed here, once, as registries store layers: the registry step
    on the master pushes it as is and nodes pull a third of the bytes. (Uncompressed, the
    emulated master spent most of the registry step hashing and copying 3x the data.)
    """
    blobs: dict[str, bytes] = {}
    tar = _tar_bytes(dict(sorted(files.items())))
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    layer_digest, layer_size = _blob(blobs, gzip.compress(tar, compresslevel=9, mtime=0))
    image_config = {
        "created": FIXED_TIME,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": FIXED_TIME, "created_by": "kubelab tools/bundle_build.py"}],
    }
    cfg_digest, cfg_size = _blob(blobs, json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cfg_digest,
            "size": cfg_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer_size,
            }
        ],
    }
    man_digest, man_size = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_digest,
                "size": man_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                },
            }
        ],
    }
    blob_path = {d: "blobs/sha256/" + d.split(":", 1)[1] for d in blobs}
    docker = [
        {
            "Config": blob_path[cfg_digest],
            "RepoTags": [ref],
            "Layers": [blob_path[layer_digest]],
        }
    ]
    entries = {
        "oci-layout": (json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644),
        "index.json": (json.dumps(index, sort_keys=True).encode(), 0o644),
        "manifest.json": (json.dumps(docker).encode(), 0o644),
        **{blob_path[d]: (data, 0o644) for d, data in blobs.items()},
    }
    dest.write_bytes(_tar_bytes(entries))


def build_images(
    node: dict[str, str],
    pause_dir: Path,
    coredns_dir: Path,
    containerd_dir: Path,
    out: Path,
    metrics_server_dir: Path | None = None,
) -> None:
    """``images/pause.tar``, ``images/coredns.tar`` and ``images/metrics-server.tar`` (OCI
    archives), proven by a real ``ctr`` import."""
    (out / "images").mkdir()
    refs = [
        f"registry.k8s.io/pause:{node['pause']}",
        f"registry.k8s.io/coredns/coredns:v{node['coredns']}",
    ]
    write_oci_archive(
        out / "images/pause.tar",
        refs[0],
        {"pause": ((pause_dir / "bin/pause").read_bytes(), 0o755)},
        {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
    )
    write_oci_archive(
        out / "images/coredns.tar",
        refs[1],
        {"coredns": ((coredns_dir / "bin/coredns").read_bytes(), 0o755)},
        {
            "Entrypoint": ["/coredns"],
            "ExposedPorts": {"53/tcp": {}, "53/udp": {}},
            "WorkingDir": "/",
        },
    )
    if metrics_server_dir is not None:
        refs.append(f"registry.k8s.io/metrics-server/metrics-server:v{node['metrics_server']}")
        write_oci_archive(
            out / "images/metrics-server.tar",
            refs[2],
            {"metrics-server": ((metrics_server_dir / "bin/metrics-server").read_bytes(), 0o755)},
            {"Entrypoint": ["/metrics-server"], "User": "65534:65534", "WorkingDir": "/"},
        )
    listing = prove_import(containerd_dir / "bin", sorted((out / "images").glob("*.tar")))
    missing = [r for r in refs if r not in listing]
    if missing:
        raise SystemExit(f"[tools] not imported: {missing}\n{listing}")
    log("ctr -n k8s.io images ls:\n" + listing)
    (out / "ctr-import-proof.txt").write_text(listing)


@contextmanager
def scratch_containerd(containerd_bin: Path) -> Iterator[list[str]]:
    """The built containerd on a temporary socket (CRI off), for as long as the block runs.

    Yields the ``ctr`` command line for namespace ``k8s.io``; the daemon is stopped and its
    dirs removed afterwards.
    """
    tmp = Path(tempfile.mkdtemp(prefix="kl-ctrd-", dir="/tmp"))
    sock = tmp / "containerd.sock"
    config = tmp / "config.toml"
    config.write_text(
        "version = 3\n"
        f'root = "{tmp}/root"\nstate = "{tmp}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime",'
        ' "io.containerd.cri.v1.images", "io.containerd.nri.v1.nri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
    )
    ctr = [str(containerd_bin / "ctr"), "--address", str(sock), "-n", "k8s.io"]
    logf = (tmp / "containerd.log").open("w")
    daemon = subprocess.Popen(
        [
            str(containerd_bin / "containerd"),
            "--config",
            str(config),
            "--root",
            str(tmp / "root"),
            "--state",
            str(tmp / "state"),
            "--address",
            str(sock),
        ],
        stdout=logf,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{containerd_bin}:{os.environ['PATH']}"},
    )
    try:
        for _ in range(100):
            if sock.exists() and subprocess.run([*ctr[:3], "version"], check=False, capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                raise SystemExit("[tools] test containerd exited:\n" + (tmp / "containerd.log").read_text()[-4000:])
            time.sleep(0.2)
        else:
            raise SystemExit("[tools] test containerd did not come up")
        yield ctr
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        logf.close()
        subprocess.run(["umount", "-R", str(tmp / "root")], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def prove_import(containerd_bin: Path, images: list[Path]) -> str:
    """Import ``images`` into the built containerd with ``ctr``; returns ``ctr images ls``."""
    with scratch_containerd(containerd_bin) as ctr:
        for image in images:
            log(run([*ctr, "images", "import", str(image)]).strip())
        return run([*ctr, "images", "ls"])


# --------------------------------------------------------------------------- bundle


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(0o755 if os.access(src, os.X_OK) else 0o644)


def _assemble(node: dict[str, str], parts: dict[str, Path], out: Path) -> None:
    """Lay the bundle out under ``out``: bin/, cni/, images/, versions.json, SHA256SUMS."""
    for name in ("kubernetes", "etcd", "containerd", "runc", "flannel", "coredns", "registry", "crane"):
        for f in sorted((parts[name] / "bin").iterdir()):
            _copy(f, out / "bin" / f.name)
    for name in ("cni_plugins", "flannel_cni_plugin"):
        for f in sorted((parts[name] / "cni").iterdir()):
            _copy(f, out / "cni" / f.name)
    for f in sorted((parts["images"] / "images").iterdir()):
        _copy(f, out / "images" / f.name)
    (out / "versions.json").write_text(json.dumps(node, indent=2, sort_keys=True) + "\n")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / "SHA256SUMS").write_text("".join(f"{sha256_file(out / f)}  {f}\n" for f in files))


def _save_times(timings: dict[str, float]) -> None:
    """Merge ``timings`` into ``$KUBELAB_CACHE/build-times.json``."""
    path = cache_root() / "build-times.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**old, **timings}, indent=2, sort_keys=True) + "\n")


def components(node: dict[str, str]) -> dict[str, tuple[str, Callable[[Path], None]]]:
    """Build order: component -> (cache key, builder)."""
    images_key = (f"images-pause-{node['pause']}-coredns-v{node['coredns']}-metrics-server-v{node['metrics_server']}"
                  f"-k8s-v{node['kubernetes']}-gzip")

    def images(out: Path) -> None:
        build_images(
            node,
            *(cache_root() / keys[n] for n in ("pause", "coredns", "containerd")),
            out,
            metrics_server_dir=cache_root() / keys["metrics_server"],
        )

    table: dict[str, tuple[str, Callable[[Path], None]]] = {
        "kubernetes": (
            f"kubernetes-v{node['kubernetes']}",
            lambda o: build_kubernetes(node["kubernetes"], o),
        ),
        "etcd": (f"etcd-v{node['etcd']}", lambda o: build_etcd(node["etcd"], o)),
        "containerd": (
            f"containerd-v{node['containerd']}",
            lambda o: build_containerd(node["containerd"], o),
        ),
        "runc": (f"runc-v{node['runc']}", lambda o: build_runc(node["runc"], o)),
        "cni_plugins": (
            f"cni-plugins-v{node['cni_plugins']}",
            lambda o: build_cni_plugins(node["cni_plugins"], o),
        ),
        "flannel": (
            f"flannel-v{node['flannel']}",
            lambda o: build_flannel(node["flannel"], o),
        ),
        "flannel_cni_plugin": (
            f"flannel-cni-plugin-v{node['flannel_cni_plugin']}-cni-plugins-v{node['cni_plugins']}",
            lambda o: build_flannel_cni(node["flannel_cni_plugin"], node["cni_plugins"], o),
        ),
        "coredns": (
            f"coredns-v{node['coredns']}",
            lambda o: build_coredns(node["coredns"], o),
        ),
        "metrics_server": (
            f"metrics-server-v{node['metrics_server']}",
            lambda o: build_metrics_server(node["metrics_server"], o),
        ),
        "registry": (f"distribution-v{node['distribution']}", lambda o: build_registry(node["distribution"], o)),
        "crane": (f"crane-v{node['crane']}", lambda o: build_crane(node["crane"], o)),
        "pause": (
            f"pause-{node['pause']}-k8s-v{node['kubernetes']}",
            lambda o: build_pause(node["pause"], node["kubernetes"], o),
        ),
        "images": (images_key, images),
    }
    keys = {name: key for name, (key, _) in table.items()}
    return table


def build_bundle(timings: dict, only: list[str] | None = None, overrides: dict[str, str] | None = None) -> Path:
    """Build (or reuse) every component and the node bundle; return the bundle directory.

    Cold build seconds land in ``timings`` and in ``$KUBELAB_CACHE/build-times.json``. With
    ``only``, build just those components and return the cache root. ``overrides`` are a
    stack's ``versions`` settings (the bundle lands where that stack looks for it).
    """
    node = dict(kltools.versions()["node"])
    unknown = sorted(set(overrides or {}) - set(node))
    if unknown:
        raise SystemExit(f"[tools] versions.{unknown[0]}: not a [node] version in versions.toml ({', '.join(sorted(node))})")
    node.update({k: str(v) for k, v in (overrides or {}).items()})
    table = components(node)
    parts: dict[str, Path] = {}
    try:
        for name, (key, builder) in table.items():
            if only and name not in only:
                continue
            parts[name] = cached(key, builder, timings)
        if only:
            return cache_root()
        return cached(
            f"bundles/{bundle_key(node)}",
            lambda out: _assemble(node, parts, out),
            timings,
        )
    finally:
        if timings:
            _save_times(timings)


def main() -> None:
    """CLI: build the bundle (or the named components) and print the result path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="components to build (default: the whole bundle)")
    args = ap.parse_args()
    timings: dict[str, float] = {}
    start = time.monotonic()
    path = build_bundle(timings, args.only or None)
    log(f"timings: {json.dumps(timings)}; total {time.monotonic() - start:.0f} s")
    print(path)


if __name__ == "__main__":
    main()
