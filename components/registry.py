"""The private registry on the first master: seed 001's registry behind the firewall, with TLS.

Every node's containerd resolves the ``registry.mirror_for`` registries through it, so a
cluster with no internet pulls CoreDNS, metrics-server, the pause image and the user's own
images from here; nodes no longer get image archives of their own.
"""

from __future__ import annotations

from pathlib import Path

import pulumi

from components.binaries import Bundle, LocalFile, checked_sha256
from components.config import ClusterConfig
from components.host import Binary, File, HostAccess, SecretFile, StepSpec
from components.images import read_archive
from components.pki import ClusterPki
from components.render import render

CONFIG_DIR = "/etc/kubelab/registry"
CA_FILE = "/etc/containerd/certs.d/kubelab-registry-ca.crt"  # on every node running containerd
UPSTREAMS = {"docker.io": "https://registry-1.docker.io"}


def pushes(cfg: ClusterConfig, bundle: Bundle) -> list[dict[str, object]]:
    """What the registry is seeded with: the bundle's image archives for the enabled addons
    (and the pause image), then the user's ``registry.preload`` archives, each with the name it
    is pushed as and its staging name on the node."""
    out: list[dict[str, object]] = []
    for rel in bundle.images_for(cfg.addons):
        f = bundle.get(rel)
        archive = read_archive(f.path)
        out.append({"name": rel, "local": f, "sha256": f.sha256, "image": archive.image, "layout": archive.layout})
    for p in cfg.registry.preload:
        local = LocalFile(Path(p.file), checked_sha256(Path(p.file)))
        name = f"preload/{local.sha256[:16]}.tar"
        out.append({"name": name, "local": local, "sha256": local.sha256, "image": p.image, "layout": p.layout})
    return out


def mirrored(cfg: ClusterConfig) -> list[str]:
    """Registries containerd resolves through the private registry: ``mirror_for`` and the
    registries of every preloaded image."""
    hosts = list(cfg.registry.mirror_for)
    for p in cfg.registry.preload:
        host = p.image.split("/", 1)[0]
        if host not in hosts:
            hosts.append(host)
    return hosts


def hosts_files(cfg: ClusterConfig, registry_url: pulumi.Input[str] | None) -> list[File]:
    """containerd ``hosts.toml`` per registry: the private registry first (when on), then the
    user's ``registry_mirrors``, then the registry itself."""
    through = set(mirrored(cfg)) if registry_url is not None else set()
    files = []
    for name in sorted(set(cfg.registry_mirrors) | through):
        own = name in through
        content = pulumi.Output.from_input(registry_url if own else "").apply(lambda url, name=name, own=own: render(
            "config/hosts.toml.j2", registry=name, upstream=UPSTREAMS.get(name, f"https://{name}"),
            # The registry stores each upstream's images under its name (registry.k8s.io/pause).
            own=({"url": f"{url}/v2/{name}", "ca": CA_FILE if url.startswith("https:") else None} if own else None),
            mirrors=list(cfg.registry_mirrors.get(name, ()))))
        files.append(File(f"/etc/containerd/certs.d/{name}/hosts.toml", content))
    return files


class Registry(pulumi.ComponentResource):
    """CNCF Distribution on the first master, seeded at `pulumi up`.

    It serves read-only on the master's private address (TLS from the cluster CA unless
    ``registry.insecure``). Pushing is `pulumi up`'s job: the step starts a second registry
    process on the same storage, bound to loopback, pushes every archive with crane and stops
    it, so nothing on the network (a pod, another node) can overwrite an image.
    """

    def __init__(self, name: str, cfg: ClusterConfig, host: HostAccess, pki: ClusterPki,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:registry:Registry", name, None, opts)
        reg = cfg.registry
        tls = not reg.insecure
        if not tls:
            pulumi.log.warn("registry.insecure: the private registry serves plain HTTP (seed 001's choice); "
                            "anyone on the node network can read its images and a man in the middle can swap them. "
                            "Remove registry.insecure to serve TLS with a certificate from the cluster CA.", self)
        self.url: pulumi.Output[str] = pulumi.Output.concat(
            "https://" if tls else "http://", host.machine.private_address, f":{reg.port}")
        listen = pulumi.Output.concat(host.machine.private_address, f":{reg.port}")
        writer = f"127.0.0.1:{reg.port + 1}"
        seeds = pushes(cfg, host.bundle)
        ctx = {"version": cfg.versions["distribution"], "directory": reg.directory}
        files = [
            File("/etc/systemd/system/kubelab-registry.service", listen.apply(
                lambda a: render("systemd/kubelab-registry.service.j2", listen=a, directory=reg.directory))),
            File(f"{CONFIG_DIR}/config.yml", listen.apply(
                lambda a: render("config/registry.yml.j2", **ctx, listen=a, tls=tls, writer=False))),
            # Where nodes reach it (the step checks it answers there).
            File(f"{CONFIG_DIR}/url", self.url),
            File(f"{CONFIG_DIR}/writer.yml", render("config/registry.yml.j2", **ctx, listen=writer, tls=False, writer=True)),
        ]
        secret_files = []
        if tls:
            assert pki.registry is not None
            files += [File(f"{CONFIG_DIR}/tls.crt", pki.registry.cert), File(f"{CONFIG_DIR}/ca.crt", pki.ca.cert)]
            secret_files.append(SecretFile(f"{CONFIG_DIR}/tls.key", pki.registry.key))
        self.step = host.step("registry", "scripts/install-registry.sh.j2", StepSpec(
            units=["kubelab-registry"],
            binaries=[Binary("bin/registry", "/usr/local/bin/registry"), Binary("bin/crane", "/usr/local/bin/crane")],
            uploads=[(str(s["name"]), s["local"]) for s in seeds],  # type: ignore[misc]
            files=files,
            secret_files=secret_files,
            context={"writer": writer, "tls": tls, "directory": reg.directory,
                     "pushes": [{k: s[k] for k in ("name", "sha256", "image", "layout")} for s in seeds]},
            remove=[CONFIG_DIR, reg.directory],
        ), parent=self)
        self.images = sorted(str(s["image"]) for s in seeds)
        self.register_outputs({"url": self.url, "images": self.images})
