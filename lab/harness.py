"""Local lab: a network namespace plus libvirt daemons, without systemd.

Everything that touches a network (libvirt bridges, dnsmasq, NAT rules, VMs, SSH) lives in
the namespace this harness creates, so nothing leaves the machine. The libvirt unix sockets
are path-based, so ``virsh -c qemu:///system`` works from anywhere; addresses of VMs are only
reachable from inside the namespace (``Lab.run`` / ``harness.py exec -- CMD``).

    python3 lab/harness.py up                 # netns + virtlogd + libvirtd + storage pool
    python3 lab/harness.py exec -- ssh ...    # run a command inside the namespace
    python3 lab/harness.py status
    python3 lab/harness.py down               # stop exactly what ``up`` started

``up`` records what it started in ``<repo>/.lab/state.json``; ``down`` (from any process)
stops exactly those PIDs and deletes the namespace only if ``up`` created it.

Host set-up done idempotently by ``up`` (needs root): a marked block in
``/etc/libvirt/qemu.conf`` (``security_driver = "none"``, qemu runs as root, no chown of disk
files), see ``QEMU_CONF_SETTINGS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from components.versions import cache_root  # noqa: E402 - one definition of the cache dir

DEFAULT_NETNS = "kubelab"
DEFAULT_POOL = "kubelab"
URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
# `ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf, so libvirtd
# and the dnsmasq it spawns for VM networks forward DNS only to the namespace's own loopback
# (where nothing answers): no query can leave the lab.
NETNS_RESOLV_CONF = "# kubelab lab namespace (lab/harness.py): no upstream DNS, nothing leaves the lab\nnameserver 127.0.0.1\n"

# qemu.conf settings the lab needs on these machines (no AppArmor/SELinux, no udev, root):
# - security_driver "none": the "dac" driver chowns disk files to libvirt-qemu and does not
#   give a shared base image back;
# - qemu runs as root and libvirt leaves file ownership alone (dynamic_ownership = 0);
# - no cgroup controllers: the host offers none to libvirt (schedinfo/memtune would fail).
QEMU_CONF_SETTINGS: dict[str, str] = {
    "security_driver": '"none"',
    "user": '"root"',
    "group": '"root"',
    "dynamic_ownership": "0",
    "remember_owner": "0",
    "cgroup_controllers": "[ ]",
}
BLOCK_BEGIN = "# BEGIN kubelab lab/harness.py (managed block, do not edit)"
BLOCK_END = "# END kubelab lab/harness.py"


def log(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)




# --------------------------------------------------------------------------- processes


def proc_starttime(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are well-formed.
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] == "Z":  # zombie: gone for our purposes
        return None
    return int(rest[19])


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def proc_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_named(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_comm(int(entry.name)) == comm and proc_starttime(int(entry.name)) is not None:
            pids.append(int(entry.name))
    return sorted(pids)


@dataclass
class Started:
    """A daemon the harness started: enough to recognise it again (PIDs get reused)."""

    name: str
    pid: int
    starttime: int

    def alive(self) -> bool:
        return proc_starttime(self.pid) == self.starttime


@dataclass
class State:
    netns: str
    netns_created: bool = False
    resolv_conf_created: bool = False
    started: list[Started] = field(default_factory=list)
    pool: str = ""
    pool_dir: str = ""

    @classmethod
    def load(cls, path: Path) -> State | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["started"] = [Started(**s) for s in data.get("started", [])]
        return cls(**data)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)


# --------------------------------------------------------------------------- libvirt config


def render_qemu_conf(text: str, settings: dict[str, str]) -> str:
    """qemu.conf with our managed block (re)written and conflicting assignments disabled."""
    out: list[str] = []
    in_block = False
    key_re = re.compile(r"^\s*(" + "|".join(map(re.escape, settings)) + r")\s*=")
    for line in text.splitlines():
        if line.strip() == BLOCK_BEGIN:
            in_block = True
            continue
        if in_block:
            if line.strip() == BLOCK_END:
                in_block = False
            continue
        out.append("#kubelab-disabled: " + line if key_re.match(line) else line)
    while out and not out[-1].strip():
        out.pop()
    out += ["", BLOCK_BEGIN]
    out += [f"{k} = {v}" for k, v in settings.items()]
    out += [BLOCK_END, ""]
    return "\n".join(out)


def configure_libvirt(conf: Path = QEMU_CONF) -> bool:
    """Idempotently put the lab settings into qemu.conf. Returns True if the file changed."""
    if not conf.exists():
        raise SystemExit(f"{conf} missing: install the packages in tools/apt-lab.txt")
    old = conf.read_text()
    new = render_qemu_conf(old, QEMU_CONF_SETTINGS)
    if new == old:
        return False
    backup = conf.with_name(conf.name + ".kubelab-orig")
    if not backup.exists():
        shutil.copy2(conf, backup)
    tmp = conf.with_name(conf.name + ".kubelab-tmp")
    tmp.write_text(new)
    os.chmod(tmp, conf.stat().st_mode & 0o7777)
    tmp.replace(conf)
    log(f"updated {conf} (original kept as {backup.name})")
    return True


# --------------------------------------------------------------------------- the lab


class Lab:
    """A network namespace with libvirt daemons running inside it."""

    def __init__(
        self,
        netns: str = DEFAULT_NETNS,
        state_file: Path | None = None,
        pool: str = DEFAULT_POOL,
        pool_dir: Path | None = None,
    ) -> None:
        self.netns = netns
        self.state_file = state_file or REPO / ".lab" / "state.json"
        self.log_dir = self.state_file.parent
        self.pool = pool
        self.pool_dir = pool_dir or cache_root() / "pool"

    # -- context manager
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- helpers
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def run(self, cmd: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the namespace."""
        return subprocess.run([*self.exec_prefix(), *cmd], check=check, **kwargs)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c qemu:///system ARGS``; with check, fail showing virsh's error."""
        proc = subprocess.run(["virsh", "-q", "-c", URI, *args], check=False, capture_output=True, text=True)
        if check and proc.returncode != 0:
            log(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
            proc.check_returncode()
        return proc

    def leftovers(self, cluster: str) -> list[tuple[str, str]]:
        """(kind, name) of every domain, network, volume and pool file named after ``cluster``
        (the cluster's own name, or its name prefix): what its ``pulumi destroy`` must remove."""
        found = [("domain", d) for d in self.virsh("list", "--all", "--name", check=False).stdout.split()
                 if d.startswith(f"{cluster}-")]
        found += [("network", n) for n in self.virsh("net-list", "--all", "--name", check=False).stdout.split() if n == cluster]
        self.virsh("pool-refresh", self.pool, check=False)
        vols = [line.split()[0] for line in self.virsh("vol-list", self.pool, check=False).stdout.splitlines() if line.split()]
        found += [("volume", v) for v in vols if v.startswith(f"{cluster}-")]
        found += [("file", str(p)) for p in Path(self.pool_dir).glob(f"{cluster}-*")]
        return found

    def purge(self, cluster: str) -> list[str]:
        """Remove :meth:`leftovers` of ``cluster``. For a test that finds what an interrupted
        run left behind, or that a failed ``pulumi destroy`` could not remove. Returns what it removed."""
        removed = []
        for kind, name in self.leftovers(cluster):
            if kind == "domain":
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, "--nvram", check=False)
            elif kind == "network":
                self.virsh("net-destroy", name, check=False)
                self.virsh("net-undefine", name, check=False)
            elif kind == "volume":
                self.virsh("vol-delete", name, "--pool", self.pool, check=False)
            else:
                Path(name).unlink(missing_ok=True)
            removed.append(f"{kind} {name}")
        if removed:
            log(f"purged what {cluster} left behind: {', '.join(removed)}")
        return removed

    def netns_exists(self) -> bool:
        return (NETNS_DIR / self.netns).exists()

    def netns_inode(self) -> int | None:
        try:
            return os.stat(NETNS_DIR / self.netns).st_ino
        except OSError:
            return None

    def in_our_netns(self, pid: int) -> bool:
        ours = self.netns_inode()
        return ours is not None and proc_netns_inode(pid) == ours

    def libvirt_ready(self) -> bool:
        proc = subprocess.run(["virsh", "-c", URI, "uri"], check=False, capture_output=True, text=True)
        return proc.returncode == 0

    # -- up
    def up(self) -> State:
        if os.geteuid() != 0:
            raise SystemExit("the lab needs root (network namespaces, libvirt system daemon)")
        for tool in ("ip", "virsh", "libvirtd", "virtlogd"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} not found: install the packages in tools/apt-lab.txt")

        state = State.load(self.state_file) or State(netns=self.netns)
        if state.netns != self.netns:
            raise SystemExit(f"{self.state_file} belongs to netns {state.netns!r}; run down first")

        conf_changed = configure_libvirt()

        if not self.netns_exists():
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
            state.netns_created = True
            log(f"created network namespace {self.netns}")
        self.run(["ip", "link", "set", "lo", "up"])
        resolv = NETNS_ETC / self.netns / "resolv.conf"
        if not resolv.exists():
            resolv.parent.mkdir(parents=True, exist_ok=True)
            resolv.write_text(NETNS_RESOLV_CONF)
            state.resolv_conf_created = True
        state.save(self.state_file)

        for name, args in (("virtlogd", ["virtlogd"]), ("libvirtd", ["libvirtd"])):
            self._ensure_daemon(state, name, args, conf_changed)
            state.save(self.state_file)

        deadline = time.monotonic() + 60
        while not self.libvirt_ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"libvirtd did not answer; see {self.log_dir}/libvirtd.log")
            time.sleep(0.3)

        self.ensure_pool()
        state.pool, state.pool_dir = self.pool, str(self.pool_dir)
        state.save(self.state_file)
        log(f"lab up: netns {self.netns}, {URI}, pool {self.pool} at {self.pool_dir}")
        return state

    def _ensure_daemon(self, state: State, name: str, args: list[str], conf_changed: bool) -> None:
        mine = [s for s in state.started if s.name == name and s.alive()]
        if mine:
            return
        state.started = [s for s in state.started if s.name != name]
        running = pids_named(name)
        if running:
            pid = running[0]
            if name == "libvirtd" and not self.in_our_netns(pid):
                # Its bridges, dnsmasq and NAT rules would land outside our namespace.
                raise SystemExit(f"libvirtd (pid {pid}) is already running outside netns {self.netns}; stop it (or run it inside the namespace) before using the lab")
            if name == "libvirtd" and conf_changed:
                log(f"WARNING: {QEMU_CONF} changed; restart libvirtd (pid {pid}) to apply it")
            log(f"using the {name} already running (pid {pid}); down() will leave it alone")
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = (self.log_dir / f"{name}.log").open("ab")
        # `ip netns exec` execs the command directly, so the child PID is the daemon's.
        proc = subprocess.Popen(
            [*self.exec_prefix(), *args],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logfile.close()
        deadline = time.monotonic() + 10
        while proc_comm(proc.pid) != name:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} failed to start; see {self.log_dir}/{name}.log")
            time.sleep(0.05)
        start = proc_starttime(proc.pid)
        assert start is not None
        state.started.append(Started(name=name, pid=proc.pid, starttime=start))
        log(f"started {name} (pid {proc.pid}) in netns {self.netns}")

    def ensure_pool(self) -> None:
        """A directory storage pool (pulumi-libvirt volumes need one), defined and active."""
        self.pool_dir.mkdir(parents=True, exist_ok=True)
        info = self.virsh("pool-info", self.pool, check=False)
        if info.returncode != 0:
            self.virsh("pool-define-as", self.pool, "dir", "--target", str(self.pool_dir))
            self.virsh("pool-autostart", self.pool)
            log(f"defined storage pool {self.pool} at {self.pool_dir}")
        else:
            xml = self.virsh("pool-dumpxml", self.pool).stdout
            m = re.search(r"<path>(.*?)</path>", xml)
            if m and Path(m.group(1)) != self.pool_dir:
                log(f"note: pool {self.pool} already exists at {m.group(1)}")
                self.pool_dir = Path(m.group(1))
        if not re.search(r"State:\s+running", self.virsh("pool-info", self.pool).stdout):
            self.virsh("pool-start", self.pool)
        self.virsh("pool-refresh", self.pool)

    # -- down
    def down(self) -> None:
        state = State.load(self.state_file)
        if state is None:
            log(f"no state file {self.state_file}: nothing to stop")
            return
        self.netns = state.netns
        ours = [s for s in state.started if s.alive()]
        libvirtd_mine = any(s.name == "libvirtd" for s in ours)
        if libvirtd_mine and self.libvirt_ready():
            # Guests and dnsmasq outlive libvirtd: stop the running ones while it still
            # manages them (definitions are kept).
            for kind, lister, stopper in (
                ("domain", ["list", "--name"], "destroy"),
                ("network", ["net-list", "--name"], "net-destroy"),
            ):
                for name in self.virsh(*lister, check=False).stdout.split():
                    log(f"stopping {kind} {name}")
                    self.virsh(stopper, name, check=False)
        # libvirtd before virtlogd (reverse start order).
        for s in reversed(ours):
            stop_process(s)
        if state.netns_created and self.netns_exists():
            leftovers = self.netns_pids()
            for pid in leftovers:
                # Only things inside the namespace we created (spawned by our libvirtd).
                log(f"stopping leftover pid {pid} ({proc_comm(pid)}) in netns {self.netns}")
                stop_process(Started(proc_comm(pid), pid, proc_starttime(pid) or -1))
            subprocess.run(["ip", "netns", "delete", self.netns], check=True)
            log(f"deleted network namespace {self.netns}")
        if state.resolv_conf_created:
            resolv = NETNS_ETC / state.netns / "resolv.conf"
            resolv.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                resolv.parent.rmdir()
        self.state_file.unlink(missing_ok=True)
        log("lab down")

    def netns_pids(self) -> list[int]:
        proc = subprocess.run(
            ["ip", "netns", "pids", self.netns],
            capture_output=True,
            text=True,
            check=False,
        )
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    # -- status
    def status(self) -> dict[str, Any]:
        state = State.load(self.state_file)
        result: dict[str, Any] = {
            "state_file": str(self.state_file),
            "netns": self.netns,
            "netns_exists": self.netns_exists(),
            "libvirt_ready": self.libvirt_ready(),
        }
        if state:
            result["netns_created"] = state.netns_created
            result["started"] = [{**asdict(s), "alive": s.alive()} for s in state.started]
            result["pool"] = state.pool
            result["pool_dir"] = state.pool_dir
        if result["libvirt_ready"]:
            result["domains"] = self.virsh("list", "--all", check=False).stdout.splitlines()
            result["networks"] = self.virsh("net-list", "--all", check=False).stdout.splitlines()
        return result


def stop_process(s: Started, timeout: float = 20.0) -> None:
    """SIGTERM one recorded process (only if it is still the same process), then SIGKILL."""
    if not s.alive():
        return
    log(f"stopping {s.name} (pid {s.pid})")
    os.kill(s.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while s.alive():
        if time.monotonic() > deadline:
            log(f"{s.name} (pid {s.pid}) ignored SIGTERM; sending SIGKILL")
            os.kill(s.pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.1)
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child
            os.waitpid(s.pid, os.WNOHANG)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", default=DEFAULT_NETNS, help="namespace name")
    parser.add_argument("--pool", default=DEFAULT_POOL, help="libvirt storage pool name")
    parser.add_argument("--pool-dir", type=Path, help="pool directory (default: cache/pool)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="create the netns, start libvirt inside it, ensure the pool")
    sub.add_parser("down", help="stop what up started, delete the netns if up created it")
    sub.add_parser("status", help="show the recorded state")
    p_exec = sub.add_parser("exec", help="run a command inside the namespace")
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)

    lab = Lab(netns=args.netns, pool=args.pool, pool_dir=args.pool_dir)
    if args.command == "up":
        lab.up()
    elif args.command == "down":
        lab.down()
    elif args.command == "status":
        print(json.dumps(lab.status(), indent=2))
    elif args.command == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("exec needs a command: exec -- CMD ARGS...")
        return lab.run(cmd, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
