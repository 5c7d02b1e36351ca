"""libvirt lab: a NAT network, a base volume, one copy-on-write disk, cloud-init disk and
domain per node, each node on a static address (the provider's wait-for-lease is unreliable).

SSH host keys are generated here (pulumi-tls, held in state), handed to the guest through
cloud-init and pinned on every SSH connection.
"""

from __future__ import annotations

import hashlib
import ipaddress

import pulumi
import pulumi_libvirt as libvirt

from components.config import ClusterConfig, NodeSpec
from components.machine import Fleet, Machine, host_key_user_data
from components.render import render

GIB = 1024**3


def mac_address(cluster: str, node: str) -> str:
    """A stable, locally administered MAC in QEMU's 52:54:00 range."""
    digest = hashlib.sha256(f"{cluster}/{node}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class LibvirtLab(pulumi.ComponentResource):
    """The lab's network, volumes and domains."""

    def __init__(self, name: str, cfg: ClusterConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:libvirt:Lab", name, None, opts)
        lv = cfg.libvirt
        assert lv is not None  # guaranteed by config validation
        provider = libvirt.Provider("libvirt", uri=lv.uri, opts=pulumi.ResourceOptions(parent=self))
        # Every libvirt object here has a fixed name, so a replacement must delete the old one
        # first (create-before-delete would collide on the name).
        child = pulumi.ResourceOptions(parent=self, provider=provider, delete_before_replace=True)
        net = ipaddress.ip_network(cfg.network.node_cidr)
        gateway = str(net[1])

        pool_name: pulumi.Input[str] = lv.pool
        if lv.pool_path:
            pool = libvirt.Pool("pool", name=lv.pool, type="dir", path=lv.pool_path, opts=child)
            pool_name = pool.name
        self.network = libvirt.Network(
            "network",
            name=lv.network_name or cfg.name,
            mode="nat",
            addresses=[cfg.network.node_cidr],
            # Nodes configure their static address through cloud-init; the DHCP host entries
            # the provider adds for each interface's address reserve the same one.
            dhcp=libvirt.NetworkDhcpArgs(enabled=True),
            dns=libvirt.NetworkDnsArgs(enabled=True, local_only=True),
            autostart=True,
            opts=child,
        )
        base = libvirt.Volume("base", name=f"{cfg.name}-base.qcow2", pool=pool_name, source=lv.image,
                              format="qcow2", opts=child)

        # The pool's volumes are created one after another, never in parallel: libvirt refuses a
        # pool refresh while another volume's upload or read-back stream is open ("pool has
        # asynchronous jobs running"), and with parallel cloud-init disks the provider has been
        # seen to hang for good (terraform-provider-libvirt#594; it hung a CI run for an hour).
        # Each is small and copy-on-write, so the chain costs a few seconds.
        self.machines: list[Machine] = []
        last_volume: pulumi.Resource = base
        for node in cfg.nodes:
            machine, last_volume = self._node(cfg, node, pool_name, base, last_volume, gateway, net.prefixlen, child)
            self.machines.append(machine)
        self.register_outputs({"network": self.network.name})

    def _node(self, cfg: ClusterConfig, node: NodeSpec, pool: pulumi.Input[str], base: libvirt.Volume,
              after: pulumi.Resource, gateway: str, prefixlen: int,
              child: pulumi.ResourceOptions) -> tuple[Machine, pulumi.Resource]:
        """One node's volumes (created after ``after``, the pool's previous volume) and domain;
        returns the machine and the node's last volume."""
        lv = cfg.libvirt
        assert lv is not None and node.address is not None
        role = cfg.masters if node.role == "master" else cfg.workers
        full = f"{cfg.name}-{node.name}"
        mac = mac_address(cfg.name, node.name)
        host_key, user_data = host_key_user_data(
            node.name, self, "cloud-init/user-data.yaml.j2", cluster=cfg.name, name=node.name, role=node.role,
            user=cfg.ssh.user, authorized_key=cfg.ssh.public_key)
        cloudinit = libvirt.CloudInitDisk(
            f"{node.name}-cloudinit",
            name=f"{full}-cloudinit.iso",
            pool=pool,
            user_data=user_data,
            meta_data=render("cloud-init/meta-data.yaml.j2", instance_id=full, name=node.name),
            network_config=render("cloud-init/network-config.yaml.j2", mac=mac, address=node.address,
                                  prefixlen=prefixlen, gateway=gateway),
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[after])),
        )
        disk = libvirt.Volume(f"{node.name}-root", name=f"{full}.qcow2", pool=pool, base_volume_id=base.id,
                              size=role.disk_gib * GIB, format="qcow2",
                              opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[cloudinit])))
        xml = None
        if lv.cpu_mode == "custom" and lv.cpu_model:
            xml = libvirt.DomainXmlArgs(xslt=render("libvirt/cpu-model.xsl.j2", model=lv.cpu_model))
        domain = libvirt.Domain(
            node.name,
            name=full,
            type=lv.domain_type,
            memory=role.memory_mib,
            vcpu=role.cpus,
            cpu=libvirt.DomainCpuArgs(mode=lv.cpu_mode),
            xml=xml,
            cloudinit=cloudinit.id,
            disks=[libvirt.DomainDiskArgs(volume_id=disk.id)],
            network_interfaces=[libvirt.DomainNetworkInterfaceArgs(
                network_id=self.network.id, hostname=node.name, mac=mac, addresses=[node.address],
                wait_for_lease=False)],
            consoles=[libvirt.DomainConsoleArgs(type="pty", target_port="0", target_type="serial")],
            autostart=False,
            # The provider reads an interface's addresses back from DHCP leases, which do not
            # exist yet when the domain is created (nor ever, for a guest that keeps only its
            # static address): without this every later preview plans a phantom update. The
            # address still takes effect: it is in the cloud-init disk, whose change replaces
            # the domain, and in the create of a new domain.
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(
                ignore_changes=["networkInterfaces[0].addresses"])),
        )
        machine = Machine(
            spec=node,
            host=node.address,
            private_address=node.address,
            user=cfg.ssh.user,
            private_key=cfg.ssh.private_key(),
            host_key=host_key,
            identity=domain.id,
            depends_on=[domain],
            deleted_with=domain,
        )
        return machine, disk


def create_machines(cfg: ClusterConfig, parent: pulumi.Resource) -> Fleet:
    lab = LibvirtLab("lab", cfg, opts=pulumi.ResourceOptions(parent=parent))
    first_master = next(m for m in lab.machines if m.role == "master")
    return Fleet(machines=lab.machines, api_endpoint=first_master.host)
