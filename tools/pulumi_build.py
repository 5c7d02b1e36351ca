"""Build the Pulumi CLI, the Python language host and the resource providers from Go modules.

Each artifact is cached under ``$KUBELAB_CACHE/<key>`` (``pulumi-v3.259.0``,
``pulumi-language-python-...``, ``provider-command-v1.2.1`` ...) with :func:`kltools.cached`,
and linked into ``$KUBELAB_CACHE/bin``: one PATH entry then serves the CLI, the language host
and the providers (Pulumi uses ``pulumi-resource-*`` binaries found on PATH as "ambient"
plugins, before its plugin cache).

Versions come from ``versions.toml`` only. Module versions are resolved through the Go module
proxy; a module the proxy does not serve is reported as :class:`Unobtainable` (the build of
the other artifacts goes on, and :func:`build_pulumi` raises :class:`ToolchainIncomplete` at
the end, after linking what was built).

Status here (Nov 2026 proxy): the CLI and the language host build; no provider module is
served (403), so the provider recipes are only exercised up to the module lookup; the steps
after it follow the modules' build scripts but have not been run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kltools import cache_root, cached, go_env, log, run, versions

PKG = "github.com/pulumi/pulumi/pkg/v3"
SDK = "github.com/pulumi/pulumi/sdk/v3"
LANG_PY = "github.com/pulumi/pulumi/sdk/python/cmd/pulumi-language-python/v3"
# Until sdk/v3 v3.68.x the Python language host was a package of the SDK module itself.
LANG_PY_IN_SDK = f"{SDK}/python/cmd/pulumi-language-python"
VERSION_VAR = f"{SDK}/go/common/version.Version"
EXEC_SCRIPT = "pulumi-language-python-exec"
WORK_PREFIX = ".work-pulumi-"  # scratch dirs in the cache root; left over only by a kill -9


class Unobtainable(RuntimeError):
    """A module version the Go module proxy does not serve."""


class ToolchainIncomplete(RuntimeError):
    """Some artifacts could not be built; the others are built and linked."""

    def __init__(self, bin_dir: Path, failures: dict[str, str]) -> None:
        self.bin_dir = bin_dir
        self.failures = failures
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        super().__init__(f"not built:\n{lines}\n(built ones are linked in {bin_dir})")


@dataclass(frozen=True)
class Provider:
    """How to build one ``pulumi-resource-NAME`` from its provider Go module."""

    name: str
    module: str  # the provider Go module (``.../provider`` or ``.../provider/vN``)
    tagless: bool  # True: no tags on the provider module, use the repo tag's commit
    schema: bool  # ``schema-embed.json`` is git-ignored: generate it before building
    fixup: Callable[[Path, str], None] | None = None

    @property
    def repo_module(self) -> str:
        """The repository's root module, whose tags ``vX.Y.Z`` name each release commit."""
        return self.module.split("/provider")[0]

    @property
    def main(self) -> str:
        return f"./cmd/pulumi-resource-{self.name}"

    @property
    def version_var(self) -> str:
        return f"{self.module}/pkg/version.Version"


# --------------------------------------------------------------------------- go helpers


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"CGO_ENABLED": "0", **go_env(), **(extra or {})}


def _go_json(args: list[str], cwd: Path | None = None) -> dict:
    """Run ``go ARGS`` that prints JSON; raise :class:`Unobtainable` with go's message."""
    proc = subprocess.run(
        ["go", *args],
        cwd=cwd,
        env={**os.environ, **_env()},
        capture_output=True,
        text=True,
    )
    data: dict = {}
    if proc.stdout.strip().startswith("{"):
        data = json.loads(proc.stdout)
    err = data.get("Error") or (proc.stderr.strip() if proc.returncode else "")
    if err:
        raise Unobtainable(err.splitlines()[0][:300])
    return data


def module_info(module: str, version: str) -> dict:
    """``go list -m -json MODULE@VERSION`` (version, time, origin) without the zip."""
    return _go_json(["list", "-m", "-json", f"{module}@{version}"])


def module_dir(module: str, version: str) -> Path:
    """Download ``MODULE@VERSION`` into the shared module cache; return its (read-only) dir."""
    return Path(_go_json(["mod", "download", "-json", f"{module}@{version}"])["Dir"])


def pseudo_version(module: str, info: dict) -> str:
    """Pseudo-version of ``module`` at the commit described by a tag's ``info``.

    For modules that carry no tags of their own: ``vN.0.0-yyyymmddhhmmss-abcdefabcdef``.
    """
    commit = info.get("Origin", {}).get("Hash")
    if not commit:
        raise Unobtainable(f"proxy gives no commit for {info.get('Path')}@{info.get('Version')}")
    when = datetime.fromisoformat(info["Time"].replace("Z", "+00:00")).astimezone(UTC)
    major = re.search(r"/v(\d+)$", module)
    return f"v{major.group(1) if major else 0}.0.0-{when:%Y%m%d%H%M%S}-{commit[:12]}"


def published_replaces(gomod: Path) -> list[str]:
    """``replace`` lines of a go.mod that point at published modules (not at ``./`` dirs)."""
    text = gomod.read_text()
    lines: list[str] = []
    for block in re.findall(r"^replace\s*\((.*?)^\)", text, flags=re.S | re.M):
        lines += block.splitlines()
    lines += re.findall(r"^replace\s+([^(\n].*)$", text, flags=re.M)
    out = []
    for line in (x.split("//")[0].strip() for x in lines):
        if "=>" in line and not line.split("=>")[1].strip().startswith("."):
            out.append(line)
    return out


def _wrapper_build(
    out_bin: Path,
    main_pkg: str,
    requires: dict[str, str],
    replaces: list[str],
    ldflags: str,
    tags: str = "",
) -> None:
    """Build ``main_pkg`` from a throw-away module that pins ``requires``."""
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=WORK_PREFIX) as tmp:
        work = Path(tmp)
        req = "".join(f"\t{m} {v}\n" for m, v in requires.items())
        rep = "".join(f"replace {r}\n" for r in replaces)
        (work / "go.mod").write_text(f"module kubelab.local/wrapper\n\ngo 1.26\n\nrequire (\n{req})\n\n{rep}")
        (work / "tools.go").write_text(f'//go:build tools\n\npackage tools\n\nimport _ "{main_pkg}"\n')
        run(["go", "mod", "tidy"], cwd=work, env=_env())
        cmd = ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out_bin)]
        run([*cmd, *(["-tags", tags] if tags else []), main_pkg], cwd=work, env=_env())


def _check(cmd: list[str], expect: str, env: dict[str, str] | None = None) -> str:
    """Run a built binary (120 s at most) and require ``expect`` in its stdout or stderr."""
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    if expect not in out:
        raise SystemExit(f"[tools] {' '.join(cmd)}: expected {expect!r}, got {out[:400]!r}")
    return proc.stdout.strip()


# --------------------------------------------------------------------------- CLI and language host


def build_cli(version: str, out: Path) -> None:
    """``pulumi`` from ``pkg/v3`` at ``version`` (wrapper: pkg replaces sdk with ``../sdk``)."""
    tag = f"v{version}"
    pkg_dir = module_dir(PKG, tag)
    module_dir(SDK, tag)
    _wrapper_build(
        out / "pulumi",
        f"{PKG}/cmd/pulumi",
        {PKG: tag, SDK: tag},
        published_replaces(pkg_dir / "go.mod"),
        f"-s -w -X {VERSION_VAR}={tag}",
        tags="osusergo,grpcnotrace",
    )
    _check([str(out / "pulumi"), "version"], tag, env=offline_env())


def language_host_key(cli: str, legacy_sdk: str | None) -> str:
    """Cache key of the language host (plus the exec script of the CLI's SDK)."""
    if legacy_sdk:
        return f"pulumi-language-python-sdk-v{legacy_sdk}-exec-v{cli}"
    return f"pulumi-language-python-v{cli}"


def build_language_host(cli: str, legacy_sdk: str | None, out: Path) -> None:
    """``pulumi-language-python`` and, next to it, ``pulumi-language-python-exec``.

    Normally from its own module (no tags: the pseudo-version of the ``pkg/v<cli>`` commit),
    with ``pkg/v3`` and ``sdk/v3`` pinned to the CLI's version. With ``legacy_sdk`` set
    (``[pulumi] python_language_host_sdk``), from the SDK module of that older release, which
    still contained the host. The exec script always comes from the CLI's SDK: it is what the
    ``pulumi`` Python package of that version expects to be run by.
    """
    tag = f"v{cli}"
    if legacy_sdk:
        sdk_dir = module_dir(SDK, f"v{legacy_sdk}")
        _wrapper_build(
            out / "pulumi-language-python",
            LANG_PY_IN_SDK,
            {SDK: f"v{legacy_sdk}"},
            published_replaces(sdk_dir / "go.mod"),
            f"-s -w -X {VERSION_VAR}=v{legacy_sdk}",
        )
    else:
        pseudo = pseudo_version(LANG_PY, module_info(PKG, tag))
        lang_dir = module_dir(LANG_PY, pseudo)
        reps = published_replaces(lang_dir / "go.mod")
        reps += published_replaces(module_dir(PKG, tag) / "go.mod")
        _wrapper_build(
            out / "pulumi-language-python",
            LANG_PY,
            {LANG_PY: pseudo, PKG: tag, SDK: tag},
            sorted(set(reps)),
            f"-s -w -X {VERSION_VAR}={tag}",
        )
    script = out / EXEC_SCRIPT
    shutil.copyfile(module_dir(SDK, tag) / "python" / "cmd" / EXEC_SCRIPT, script)
    script.chmod(0o755)
    _check([str(out / "pulumi-language-python"), "-h"], "Usage of")


# --------------------------------------------------------------------------- providers


def _tls_shim(src: Path, version: str) -> None:
    """Recreate ``./shim`` (a nested module, so missing from the zip).

    Its module path lies under terraform-provider-tls so that it may import the upstream
    ``internal/provider`` package; it only re-exports that provider.
    """
    upstream = "github.com/hashicorp/terraform-provider-tls"
    m = re.search(rf"^\s*{re.escape(upstream)} (\S+)", (src / "go.mod").read_text(), re.M)
    if not m:
        raise Unobtainable(f"tls {version}: go.mod does not require {upstream}")
    shim = src / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "go.mod").write_text(f"module {upstream}/shim\n\ngo 1.26\n\nrequire {upstream} {m.group(1)}\n")
    (shim / "shim.go").write_text(
        "// Package shim re-exports the upstream TLS provider for the Pulumi bridge.\n"
        "package shim\n\n"
        'import (\n\t"github.com/hashicorp/terraform-plugin-framework/provider"\n'
        f'\tupstream "{upstream}/internal/provider"\n)\n\n'
        "// NewProvider returns the upstream provider.\n"
        "func NewProvider() provider.Provider { return upstream.New() }\n"
    )
    run(["go", "mod", "tidy"], cwd=shim, env=_env())


PROVIDERS = [
    Provider("command", "github.com/pulumi/pulumi-command/provider", tagless=True, schema=False),
    Provider("tls", "github.com/pulumi/pulumi-tls/provider/v5", tagless=False, schema=True, fixup=_tls_shim),
    Provider("libvirt", "github.com/pulumi/pulumi-libvirt/provider", tagless=True, schema=True),
    # The DigitalOcean provider module replaces its upstream with a git submodule (../upstream);
    # no fixup is known here, so a copy still carrying that replace fails with a clear message.
    Provider("digitalocean", "github.com/pulumi/pulumi-digitalocean/provider/v4", tagless=False, schema=True),
]


def provider_module_version(p: Provider, version: str) -> str:
    """The module version to build ``p`` at release ``version`` (tag or pseudo-version)."""
    if not p.tagless:
        module_info(p.module, f"v{version}")
        return f"v{version}"
    return pseudo_version(p.module, module_info(p.repo_module, f"v{version}"))


def build_provider(p: Provider, version: str, cli_bin: Path, out: Path) -> None:
    """Build ``pulumi-resource-NAME`` in a writable copy of its module, version set by ldflags."""
    mod_version = provider_module_version(p, version)
    src_ro = module_dir(p.module, mod_version)
    log(f"{p.name} {version}: {p.module}@{mod_version}")
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=WORK_PREFIX) as tmp:
        src = Path(tmp) / "provider"
        shutil.copytree(src_ro, src)
        for path in [src, *src.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        if p.fixup:
            p.fixup(src, version)
        local = re.findall(r"=>\s*(\.\.?/\S+)", (src / "go.mod").read_text())
        missing = [r for r in local if not (src / r).exists()]
        if missing:
            raise Unobtainable(f"{p.name}: go.mod replaces point outside the module: {missing}")
        if p.schema:
            run(["go", "generate", p.main], cwd=src, env=_env({"VERSION": version}))
        ldflags = f"-s -w -X {p.version_var}={version}"
        run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out / f"pulumi-resource-{p.name}"), p.main], cwd=src, env=_env())
    schema = _check(
        [str(cli_bin), "package", "get-schema", str(out / f"pulumi-resource-{p.name}")],
        '"version"',
        env=offline_env(),
    )
    got = json.loads(schema).get("version", "")
    if got.lstrip("v") != version:
        raise SystemExit(f"[tools] pulumi-resource-{p.name} reports {got!r}, expected {version}")


# --------------------------------------------------------------------------- assembly


def offline_env() -> dict[str, str]:
    """Environment for running ``pulumi`` without network or a Pulumi Cloud account."""
    return {
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_AUTOMATION_API_SKIP_VERSION_CHECK": "true",
    }


def bin_dir() -> Path:
    """``$KUBELAB_CACHE/bin``: symlinks to every built Pulumi binary."""
    return cache_root() / "bin"


def _link(target: Path, hard: bool = False) -> None:
    """Point ``bin/<name>`` at ``target`` (atomic replace); ``hard``: a hard link instead.

    ``bin/pulumi`` is a hard link: the CLI looks for its bundled language host next to its
    own resolved path, so with a symlink it would find ``pulumi-language-python`` only on
    $PATH and warn "using pulumi-language-python from $PATH" on every run.
    """
    link = bin_dir() / target.name
    tmp = link.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    if hard:
        tmp.hardlink_to(target)
    else:
        tmp.symlink_to(target)
    tmp.replace(link)


def build_pulumi(timings: dict) -> Path:
    """Build (or reuse) the CLI, the language host and the providers; return the bin dir.

    Raises :class:`ToolchainIncomplete` after linking when some provider could not be built.
    """
    pins = versions()
    cli = pins["pulumi"]["cli"]
    legacy = pins["pulumi"].get("python_language_host_sdk")
    bin_dir().mkdir(parents=True, exist_ok=True)
    for stale in cache_root().glob(WORK_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    built: list[Path] = []
    cli_dir = cached(f"pulumi-v{cli}", lambda o: build_cli(cli, o), timings)
    built.append(cli_dir / "pulumi")
    lh_dir = cached(language_host_key(cli, legacy), lambda o: build_language_host(cli, legacy, o), timings)
    built += [lh_dir / "pulumi-language-python", lh_dir / EXEC_SCRIPT]
    failures: dict[str, str] = {}
    for p in PROVIDERS:
        ver = pins["providers"][p.name]
        key = f"provider-{p.name}-v{ver}"
        try:
            d = cached(key, lambda o, p=p, ver=ver: build_provider(p, ver, cli_dir / "pulumi", o), timings)
        except Unobtainable as exc:
            log(f"{key}: NOT BUILT: {exc}")
            failures[key] = str(exc)
            shutil.rmtree(cache_root() / f"{key}.partial", ignore_errors=True)
            (bin_dir() / f"pulumi-resource-{p.name}").unlink(missing_ok=True)
            continue
        built.append(d / f"pulumi-resource-{p.name}")
    for target in built:
        _link(target, hard=target == cli_dir / "pulumi")
    if failures:
        raise ToolchainIncomplete(bin_dir(), failures)
    return bin_dir()
