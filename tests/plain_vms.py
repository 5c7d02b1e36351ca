"""Plain VMs made with virsh, outside Pulumi: the "machines you already have" of the static
platform's e2e. Same base image and TCG settings as the lab; each VM on a static address."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PlainVm:
    name: str
    address: str

    @property
    def mac(self) -> str:
        d = hashlib.sha256(self.name.encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in d[:3])


def _virsh(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True, check=check, input=input)


def network_xml(name: str, gateway: str) -> str:
    return f"""<network><name>{name}</name><forward mode='nat'/>
  <ip address='{gateway}' netmask='255.255.255.0'/></network>"""


def domain_xml(vm: PlainVm, network: str, disk: str, seed: str, memory_mib: int) -> str:
    return f"""<domain type='qemu'>
  <name>{vm.name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{seed}'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='network'><mac address='{vm.mac}'/><source network='{network}'/><model type='virtio'/></interface>
    <serial type='pty'/><console type='pty'/>
    <video><model type='none'/></video>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>"""


def seed_iso(vm: PlainVm, pubkey: str, gateway: str, dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "user-data").write_text(f"""#cloud-config
hostname: {vm.name}
manage_etc_hosts: true
users:
  - name: kubelab
    shell: /bin/bash
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    lock_passwd: true
    ssh_authorized_keys: ["{pubkey}"]
""")
        (d / "meta-data").write_text(f"instance-id: {vm.name}\nlocal-hostname: {vm.name}\n")
        (d / "network-config").write_text(
            f"version: 2\nethernets:\n  nic0:\n    match: {{macaddress: '{vm.mac}'}}\n"
            f"    addresses: [{vm.address}/24]\n    routes: [{{to: 0.0.0.0/0, via: {gateway}}}]\n"
            f"    nameservers: {{addresses: [{gateway}]}}\n")
        subprocess.run(["genisoimage", "-quiet", "-output", str(dest), "-volid", "cidata", "-joliet", "-rock",
                        str(d / "user-data"), str(d / "meta-data"), str(d / "network-config")], check=True)
    return dest


def create(vms: list[PlainVm], network: str, gateway: str, image: Path, workdir: Path, pubkey: str,
           memory_mib: int = 2048) -> None:
    """Define and start the network and the VMs (copy-on-write disks on the base image)."""
    net_file = workdir / "net.xml"
    net_file.write_text(network_xml(network, gateway))
    _virsh("net-define", str(net_file))
    _virsh("net-start", network)
    for vm in vms:
        disk = workdir / f"{vm.name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.resolve()), str(disk), "12G"],
                       check=True)
        seed = seed_iso(vm, pubkey, gateway, workdir / f"{vm.name}-seed.iso")
        xml = workdir / f"{vm.name}.xml"
        xml.write_text(domain_xml(vm, network, str(disk), str(seed), memory_mib))
        _virsh("define", str(xml))
        _virsh("start", vm.name)


def wait_ssh(vms: list[PlainVm], key: Path, prefix: list[str], timeout: float = 900) -> float:
    """Seconds until every VM answers on SSH."""
    start = time.monotonic()
    pending = list(vms)
    while pending:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"no SSH from {[v.name for v in pending]} after {timeout} s")
        for vm in list(pending):
            proc = subprocess.run([*prefix, "ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                   "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-i", str(key),
                                   f"kubelab@{vm.address}", "true"], capture_output=True, check=False)
            if proc.returncode == 0:
                pending.remove(vm)
        time.sleep(3)
    return time.monotonic() - start


def destroy(vms: list[PlainVm], network: str) -> None:
    for vm in vms:
        _virsh("destroy", vm.name, check=False)
        _virsh("undefine", vm.name, check=False)
    _virsh("net-destroy", network, check=False)
    _virsh("net-undefine", network, check=False)


def running(vm: PlainVm) -> bool:
    return _virsh("domstate", vm.name, check=False).stdout.strip() == "running"
