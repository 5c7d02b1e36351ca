"""Build the Pulumi CLI and the Python language host from Go modules.

Each artifact is cached under ``$KUBELAB_CACHE/<key>`` (``pulumi-v3.259.0``,
``pulumi-language-python-...``) with :func:`kltools.cached`, and linked into
``$KUBELAB_CACHE/bin``. Versions come from ``versions.toml`` only.

Provider plugins are not built here: Pulumi acquires them (``tools/plugins.py`` reports which
ones it can find and installs them from a plugin mirror when ``KUBELAB_PLUGIN_DIR`` is set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from kltools import cache_root, cached, go_env, run, versions

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
    """Build (or reuse) the CLI and the language host, link them; return the bin dir."""
    pins = versions()
    cli = pins["pulumi"]["cli"]
    legacy = pins["pulumi"].get("python_language_host_sdk")
    bin_dir().mkdir(parents=True, exist_ok=True)
    for stale in cache_root().glob(WORK_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Provider links from earlier versions of this script: plugins are Pulumi's to find now.
    for old in bin_dir().glob("pulumi-resource-*"):
        if old.is_symlink() and str(old.resolve()).startswith(str(cache_root() / "provider-")):
            old.unlink()
    cli_dir = cached(f"pulumi-v{cli}", lambda o: build_cli(cli, o), timings)
    lh_dir = cached(language_host_key(cli, legacy), lambda o: build_language_host(cli, legacy, o), timings)
    _link(cli_dir / "pulumi", hard=True)
    for target in (lh_dir / "pulumi-language-python", lh_dir / EXEC_SCRIPT):
        _link(target)
    return bin_dir()
