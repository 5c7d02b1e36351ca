"""Per-host plumbing: wait for SSH, upload and unpack the node's archives, run install steps.

Every install step is one ``remote.Command`` whose ``create`` is a rendered, readable script
(so ``pulumi preview --diff`` shows a changed kubelet flag as a changed line) and whose
``stdin`` carries the step's secret files as a base64 tar (so no secret is ever on a command
line or in a plain-text output). Pulumi re-runs a step exactly when its script or secrets
change; the script embeds the sha256 of every binary it installs, so a new binary re-runs
only the steps that install it. No step uses ``triggers`` (they replace the resource).
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
from pulumi_command import remote

from components.binaries import Bundle, LocalFile, checked_sha256, gzip_blob, xz_archive
from components.machine import Machine
from components.render import render

STAGE = "/var/lib/kubelab/stage"
SSH_WAIT_TIMEOUT = "20m"
STEP_TIMEOUT = "20m"


@dataclass(frozen=True)
class File:
    """A non-secret file written by a step (its content is visible in preview diffs)."""

    path: str
    content: pulumi.Input[str]
    mode: str = "0644"


@dataclass(frozen=True)
class SecretFile:
    """A secret file, shipped on the step's stdin and installed root-only."""

    path: str
    content: pulumi.Input[str]
    mode: str = "0600"


@dataclass(frozen=True)
class Binary:
    """A bundle file (``bin/kubelet``) installed at ``dest`` after checking its sha256."""

    rel: str
    dest: str


@dataclass(frozen=True)
class Check:
    """A readiness command retried after the units start."""

    command: str
    tries: int = 60
    pause: int = 2


@dataclass
class StepSpec:
    """What one install step puts on a node and how it knows it worked."""

    units: Sequence[str] = ()
    files: Sequence[File] = ()
    secret_files: Sequence[SecretFile] = ()
    binaries: Sequence[Binary] = ()
    images: Sequence[str] = ()  # bundle paths of image archives to upload (imported by the script)
    # Other files to stage (name under the staging dir -> file on the Pulumi host); the
    # template unpacks them itself (image archives a user lists in registry.preload).
    uploads: Sequence[tuple[str, LocalFile]] = ()
    dirs: Sequence[tuple[str, str]] = ()  # (path, mode) created before anything else
    checks: Sequence[Check] = ()
    context: dict[str, object] = field(default_factory=dict)  # extra template variables
    remove: Sequence[str] = ()  # extra paths the teardown removes
    cleanup: Sequence[str] = ()  # best-effort teardown commands (kill leftovers, delete links)
    # A delete script of its own (template, context) instead of the teardown: for steps whose
    # removal means more than removing files, on every platform (a node leaving the cluster).
    on_delete: tuple[str, dict[str, object]] | None = None
    # An update script of its own (template, context), run instead of the create script when
    # the step changes: for steps whose first run and later runs differ (a drain before an
    # upgrade, nothing on a new node).
    update: tuple[str, dict[str, object]] | None = None


def as_root(script: str, user: str) -> str:
    """Wrap a script so it runs under bash as root, keeping its text readable in diffs."""
    wrapped = f"/bin/bash -c \"$(cat <<'KUBELAB_SCRIPT'\n{script.rstrip()}\nKUBELAB_SCRIPT\n)\""
    return wrapped if user == "root" else "sudo -n " + wrapped


def secrets_payload(contents: Sequence[str]) -> str:
    """A deterministic base64 tar of the secret files (stable bytes: no diff on a no-op run)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, text in enumerate(contents):
            data = text.encode()
            info = tarfile.TarInfo(str(i))
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def _nl(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


class HostAccess(pulumi.ComponentResource):
    """Waits until a machine answers on SSH and has finished booting.

    pulumi-command gives up after ten refused dials (seconds), far less than a VM needs to
    boot, so this one command dials without limit, bounded by its create timeout; every
    later command on the host depends on it.
    """

    def __init__(self, machine: Machine, bundle: Bundle, archives: dict[str, Sequence[str]],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:node:HostAccess", machine.name, None, opts)
        self.machine = machine
        self.bundle = bundle
        self._uploads: dict[str, remote.CopyToRemote] = {}
        self.ready = remote.Command(
            f"{machine.name}-wait-for-ssh",
            connection=machine.connection(wait=True),
            add_previous_output_in_env=False,
            create=pulumi.Output.from_input(machine.identity).apply(
                lambda ident: render("scripts/wait-for-ssh.sh.j2", node=machine.name, machine_id=ident)),
            # Runs last on destroy (every step depends on this one): the staging area goes.
            delete=as_root(render("scripts/teardown.sh.j2", node=machine.name, step="wait-for-ssh", units=[],
                                  cleanup=[], paths=["/var/lib/kubelab"]), machine.user) if machine.teardown else None,
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=machine.depends_on,
                deleted_with=machine.deleted_with,
                custom_timeouts=pulumi.CustomTimeouts(create=SSH_WAIT_TIMEOUT, update=SSH_WAIT_TIMEOUT),
            ),
        )
        # The node's binaries: each archive uploaded, then unpacked into the staging dir once
        # (binaries.node_archives says which; a step depends on the unpack of the one it needs).
        self.unpacked: dict[str, remote.Command] = {}
        for archive, rels in archives.items():
            members = [(rel, bundle.get(rel)) for rel in rels]
            local = xz_archive(members)
            upload = remote.CopyToRemote(
                f"{machine.name}-upload-{archive}",
                connection=machine.connection(),
                source=pulumi.FileAsset(str(local)),
                remote_path=f"{STAGE}/{archive}.tar.xz",
                # A replaced machine gets every archive again (an upload has no remote side to delete).
                triggers=[machine.identity],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.ready], deleted_with=machine.deleted_with),
            )
            self.unpacked[archive] = self.step(f"unpack-{archive}", "scripts/unpack-archive.sh.j2", StepSpec(
                context={"archive": archive, "sha256": checked_sha256(local),
                         "members": [{"name": rel, "sha256": f.sha256} for rel, f in members]},
            ), parent=self, depends_on=[upload])
        self._archive_of = {rel: a for a, rels in archives.items() for rel in rels}
        self.register_outputs({"host": machine.host, "private_address": machine.private_address})

    def unpacked_for(self, step: str, rel: str) -> remote.Command:
        """The unpack of the archive that carries bundle file ``rel`` to this host."""
        if rel not in self._archive_of:
            raise ValueError(f"{self.machine.name}: step {step} installs {rel}, which no archive of this node carries "
                             f"(binaries.node_archives must list it)")
        return self.unpacked[self._archive_of[rel]]

    def upload(self, rel: str, parent: pulumi.Resource, local: LocalFile | None = None) -> remote.CopyToRemote:
        """Copy one image archive (a bundle file, or ``local``), gzipped, to the host's staging
        dir as ``rel``.gz (re-copied only when it changes); the step that uses it unpacks it
        and checks the sha256 of the original."""
        if rel not in self._uploads:
            self._uploads[rel] = remote.CopyToRemote(
                f"{self.machine.name}-upload-{rel.replace('/', '-')}",
                connection=self.machine.connection(),
                source=pulumi.FileAsset(str(gzip_blob(local or self.bundle.get(rel)))),
                remote_path=f"{STAGE}/{rel}.gz",
                # A replaced machine gets every file again (an upload has no remote side to delete).
                triggers=[self.machine.identity],
                opts=pulumi.ResourceOptions(parent=parent, depends_on=[self.ready], deleted_with=self.machine.deleted_with),
            )
        return self._uploads[rel]

    def step(
        self,
        name: str,
        template: str,
        spec: StepSpec,
        parent: pulumi.Resource,
        depends_on: Sequence[pulumi.Resource] = (),
        timeout: str = STEP_TIMEOUT,
    ) -> remote.Command:
        """One idempotent install/start command on this host (see module docstring)."""
        machine = self.machine
        uploads: list[pulumi.Resource] = []
        for b in spec.binaries:
            if (unpacked := self.unpacked_for(name, b.rel)) not in uploads:
                uploads.append(unpacked)
        uploads += [self.upload(rel, parent) for rel in spec.images]
        uploads += [self.upload(rel, parent, local) for rel, local in spec.uploads]
        binaries = [{"name": b.rel, "sha256": self.bundle.get(b.rel).sha256, "dest": b.dest} for b in spec.binaries]
        images = [{"name": rel, "sha256": self.bundle.get(rel).sha256} for rel in spec.images]
        secret_ctx = [{"name": str(i), "path": f.path, "mode": f.mode} for i, f in enumerate(spec.secret_files)]

        def script(values: list[str], template: str = template, context: dict[str, object] = spec.context) -> str:
            ident, contents = values[0], values[1:]
            files = [{"path": f.path, "mode": f.mode, "content": _nl(c)} for f, c in zip(spec.files, contents, strict=True)]
            return as_root(render(
                template, node=machine.name, machine_id=ident, step=name, units=list(spec.units), files=files,
                secret_files=secret_ctx, binaries=binaries, images=images,
                dirs=[{"path": p, "mode": m} for p, m in spec.dirs],
                checks=list(spec.checks), **context,
            ), machine.user)

        inputs = pulumi.Output.all(machine.identity, *[f.content for f in spec.files])
        create = inputs.apply(script)
        update = inputs.apply(lambda v: script(v, *spec.update)) if spec.update else None
        stdin = None
        if spec.secret_files:
            stdin = pulumi.Output.secret(
                pulumi.Output.all(*[f.content for f in spec.secret_files]).apply(secrets_payload))
        delete = None
        if spec.on_delete:
            template_del, ctx = spec.on_delete
            delete = as_root(render(template_del, node=machine.name, step=name, **ctx), machine.user)
        elif machine.teardown:
            paths = [f.path for f in spec.files] + [f.path for f in spec.secret_files]
            paths += [b.dest for b in spec.binaries] + [p for p, _ in spec.dirs] + list(spec.remove)
            delete = as_root(render("scripts/teardown.sh.j2", node=machine.name, step=name, units=list(spec.units),
                                    cleanup=list(spec.cleanup), paths=paths), machine.user)
        return remote.Command(
            f"{machine.name}-{name}",
            connection=machine.connection(),
            create=create,
            update=update,
            # No step reads its previous output; passing it would warn on every update (sshd
            # accepts no such environment variables).
            add_previous_output_in_env=False,
            stdin=stdin,
            delete=delete,
            opts=pulumi.ResourceOptions(
                parent=parent,
                depends_on=[self.ready, *uploads, *depends_on],
                deleted_with=machine.deleted_with,
                custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout, delete="10m"),
            ),
        )
