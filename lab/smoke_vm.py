"""Smoke test of the lab: one VM from the base image, booted by plain virsh, reached by SSH.

    python3 lab/smoke_vm.py [--dhcp] [--keep]

Brings the lab up (lab/harness.py), builds or reuses the base image (lab/build_image.sh),
defines a NAT network inside the lab namespace, a copy-on-write overlay volume in the lab
pool, a NoCloud seed ISO and a TCG domain (type qemu, cpu qemu64), then measures seconds
from ``virsh start`` to a working SSH login (run inside the namespace), checks a few things
in the guest and tears everything down again (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Lab, log

HERE = Path(__file__).resolve().parent
NAME = "kubelab-smoke"
NET = "kubelab-smoke"
BRIDGE = "klsmoke0"
GATEWAY = "10.240.0.1"
ADDRESS = "10.240.0.10"
MAC = "52:54:00:4b:4c:0a"
USER = "kubelab"
BUILD_PATTERN = "go build|go install|/compile|/link"  # other CPU-heavy work on the host skews timings
VOLUME_SIZE_G = 10  # larger than the image: the root fs must grow to it

NETWORK_XML = f"""<network>
  <name>{NET}</name>
  <forward mode='nat'/>
  <bridge name='{BRIDGE}' stp='off' delay='0'/>
  <ip address='{GATEWAY}' netmask='255.255.255.0'>
    <dhcp>
      <range start='10.240.0.100' end='10.240.0.200'/>
    </dhcp>
  </ip>
</network>
"""


def domain_xml(disk: str, seed: str, console_log: str) -> str:
    return f"""<domain type='qemu'>
  <name>{NAME}</name>
  <memory unit='MiB'>2048</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{seed}'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='{MAC}'/>
      <source network='{NET}'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><log file='{console_log}' append='off'/></serial>
    <console type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <video><model type='none'/></video>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"""


def volume_xml(name: str, backing: str) -> str:
    return f"""<volume>
  <name>{name}</name>
  <capacity unit='G'>{VOLUME_SIZE_G}</capacity>
  <target><format type='qcow2'/></target>
  <backingStore><path>{backing}</path><format type='qcow2'/></backingStore>
</volume>
"""


def seed_files(pubkey: str, dhcp: bool) -> dict[str, str]:
    user_data = f"""#cloud-config
hostname: {NAME}
manage_etc_hosts: true
users:
  - name: {USER}
    groups: [sudo]
    shell: /bin/bash
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    lock_passwd: true
    ssh_authorized_keys: [{json.dumps(pubkey)}]
ssh_pwauth: false
"""
    meta_data = f"instance-id: {NAME}-{int(time.time())}\nlocal-hostname: {NAME}\n"
    if dhcp:
        eth = "    dhcp4: true\n"
    else:
        # cloud-init 25.1 rejects netplan's `to: default` (the whole init-local stage fails and
        # networkd-wait-online then costs 2 min): give the route as a CIDR.
        eth = f"    addresses: [{ADDRESS}/24]\n    routes: [{{to: 0.0.0.0/0, via: {GATEWAY}}}]\n    nameservers: {{addresses: [{GATEWAY}]}}\n"
    network_config = f"version: 2\nethernets:\n  nic0:\n    match: {{macaddress: '{MAC}'}}\n" + eth
    return {
        "user-data": user_data,
        "meta-data": meta_data,
        "network-config": network_config,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dhcp", action="store_true", help="DHCP instead of a static address")
    parser.add_argument("--keep", action="store_true", help="leave VM, network and lab up")
    parser.add_argument("--timeout", type=int, default=600, help="seconds to wait for SSH")
    args = parser.parse_args()
    # A plain `kill` should still tear down (the finally block below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    image = subprocess.run([str(HERE / "build_image.sh")], check=True, capture_output=True, text=True).stdout.strip()
    lab = Lab()
    lab.up()
    tmp = Path(tempfile.mkdtemp(prefix="kubelab-smoke-"))
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pool_dir = lab.pool_dir
    seed = pool_dir / f"{NAME}-seed.iso"
    vol = f"{NAME}-root.qcow2"
    console_log = tmp / "console.log"
    result: dict[str, object] = {"image": image, "dhcp": args.dhcp}
    try:
        (tmp / "net.xml").write_text(NETWORK_XML)
        lab.virsh("net-define", str(tmp / "net.xml"))
        lab.virsh("net-start", NET)

        # virsh --backing-vol only takes volumes of a pool; the XML takes any path.
        (tmp / "vol.xml").write_text(volume_xml(vol, image))
        lab.virsh("vol-create", lab.pool, str(tmp / "vol.xml"))
        disk = lab.virsh("vol-path", "--pool", lab.pool, vol).stdout.strip()
        for fname, text in seed_files((tmp / "id_ed25519.pub").read_text().strip(), args.dhcp).items():
            (tmp / fname).write_text(text)
        subprocess.run(
            [
                "genisoimage",
                "-quiet",
                "-output",
                str(seed),
                "-volid",
                "cidata",
                "-joliet",
                "-rock",
                str(tmp / "user-data"),
                str(tmp / "meta-data"),
                str(tmp / "network-config"),
            ],
            check=True,
        )
        (tmp / "dom.xml").write_text(domain_xml(disk, str(seed), str(console_log)))
        lab.virsh("define", str(tmp / "dom.xml"))

        t0 = time.monotonic()
        lab.virsh("start", NAME)
        log(f"started {NAME}; waiting for SSH (console log: {console_log})")
        address = ADDRESS if not args.dhcp else ""
        ssh_base = [
            "ssh",
            "-i",
            str(key),
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]
        builds_seen = 0  # polls during the boot that saw a Go build competing for the CPUs
        while True:
            elapsed = time.monotonic() - t0
            if elapsed > args.timeout:
                raise SystemExit(f"no SSH after {args.timeout} s; see {console_log}")
            if not address:
                leases = lab.virsh("net-dhcp-leases", NET, check=False).stdout
                m = re.search(r"(10\.240\.0\.\d+)/24", leases)
                if m:
                    address = m.group(1)
                    result["dhcp_lease_s"] = round(time.monotonic() - t0, 1)
                    log(f"DHCP lease {address} after {result['dhcp_lease_s']} s")
            if address:
                probe = lab.run(
                    [*ssh_base, f"{USER}@{address}", "true"],
                    check=False,
                    capture_output=True,
                )
                if probe.returncode == 0:
                    break
            if subprocess.run(["pgrep", "-f", BUILD_PATTERN], capture_output=True, check=False).returncode == 0:
                builds_seen += 1
            time.sleep(1)
        result["start_to_ssh_s"] = round(time.monotonic() - t0, 1)
        result["boot_polls_with_go_builds"] = builds_seen
        result["host_loadavg_after_boot"] = Path("/proc/loadavg").read_text().split()[:3]
        log(f"SSH works after {result['start_to_ssh_s']} s ({builds_seen} polls saw Go builds running)")

        # The login user's PATH lacks /usr/sbin (sysctl, conntrack, iptables): check as root.
        checks = (
            "hostname; uname -r; "
            "cloud-init status --wait >/dev/null; cloud-init status; "
            "df -h / | tail -1; "
            "lsmod | grep -E '^(overlay|br_netfilter) ' | cut -d' ' -f1 | sort | xargs; "
            "sysctl -n net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables | xargs; "
            "cat /proc/cmdline; "
            "systemctl is-system-running; "
            "ip -br addr show | grep -v '^lo'; "
            "for c in conntrack socat iptables curl; do command -v $c >/dev/null "
            "|| echo missing-$c; done; echo tools-checked; "
            "systemd-analyze | head -1; systemd-analyze blame | head -5"
        )
        for _ in range(5):  # right after the first login sshd/sudo may still be settling
            out = lab.run(
                [*ssh_base, f"{USER}@{address}", "sudo -n bash -c " + shlex.quote(checks)],
                check=False,
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                break
            time.sleep(3)
        result["guest"] = out.stdout.splitlines()
        if out.returncode != 0:
            result["guest_stderr"] = out.stderr.splitlines()
        result["cloud_init_done_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            t1 = time.monotonic()
            lab.virsh("destroy", NAME, check=False)
            lab.virsh("undefine", NAME, check=False)
            lab.virsh("vol-delete", "--pool", lab.pool, vol, check=False)
            seed.unlink(missing_ok=True)
            lab.virsh("net-destroy", NET, check=False)
            lab.virsh("net-undefine", NET, check=False)
            log(f"tear-down took {time.monotonic() - t1:.1f} s")
            lab.down()
            if console_log.exists():
                keep = lab.state_file.parent / "smoke-console.log"
                shutil.copy(console_log, keep)
                log(f"guest console log kept at {keep}")
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
