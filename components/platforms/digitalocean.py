"""DigitalOcean: a VPC from ``node_cidr``, droplets per role, a tag-based firewall, a Project.

The bootstrap talks to droplets over their public address and configures the cluster on
their private VPC addresses. SSH host keys are generated here and handed over in user data
(stable across runs, so droplets are not replaced), then pinned on every connection.
"""

from __future__ import annotations

import pulumi
import pulumi_digitalocean as do

from components.config import ClusterConfig, NodeSpec
from components.machine import Fleet, Machine, host_key_user_data


def firewall_rules(cfg: ClusterConfig, cluster_tag: str, master_tag: str) -> tuple[list[do.FirewallInboundRuleArgs], list[do.FirewallOutboundRuleArgs]]:
    """Seed 001's port table brought up to date (no 10251/10252/10255: those now listen on
    localhost or are gone)."""
    assert cfg.digitalocean is not None
    allowed = list(cfg.digitalocean.allowed_cidrs)
    nodeports = cfg.apiserver.service_node_port_range
    inbound = [
        do.FirewallInboundRuleArgs(protocol="tcp", port_range="22", source_addresses=allowed),
        do.FirewallInboundRuleArgs(protocol="tcp", port_range="6443", source_addresses=allowed),
        # Between cluster droplets only:
        do.FirewallInboundRuleArgs(protocol="tcp", port_range="6443", source_tags=[cluster_tag]),
        do.FirewallInboundRuleArgs(protocol="tcp", port_range="2379-2380", source_tags=[cluster_tag]),
        do.FirewallInboundRuleArgs(protocol="tcp", port_range="10250", source_tags=[cluster_tag]),
        do.FirewallInboundRuleArgs(protocol="udp", port_range="8472", source_tags=[cluster_tag]),
        do.FirewallInboundRuleArgs(protocol="tcp", port_range=nodeports, source_tags=[cluster_tag]),
        do.FirewallInboundRuleArgs(protocol="udp", port_range=nodeports, source_tags=[cluster_tag]),
        do.FirewallInboundRuleArgs(protocol="icmp", source_tags=[cluster_tag]),
    ]
    if cfg.registry.enabled:  # the private registry on the first master, pulled from by every node
        inbound.append(do.FirewallInboundRuleArgs(protocol="tcp", port_range=str(cfg.registry.port), source_tags=[cluster_tag]))
    everywhere = ["0.0.0.0/0", "::/0"]
    outbound = [
        do.FirewallOutboundRuleArgs(protocol="tcp", port_range="1-65535", destination_addresses=everywhere),
        do.FirewallOutboundRuleArgs(protocol="udp", port_range="1-65535", destination_addresses=everywhere),
        do.FirewallOutboundRuleArgs(protocol="icmp", destination_addresses=everywhere),
    ]
    return inbound, outbound


class DigitalOceanCluster(pulumi.ComponentResource):
    """VPC, SSH key, tags, droplets, firewall, optional reserved IP, Project."""

    def __init__(self, name: str, cfg: ClusterConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:digitalocean:Cluster", name, None, opts)
        d = cfg.digitalocean
        assert d is not None  # guaranteed by config validation
        child = pulumi.ResourceOptions(parent=self)
        if "0.0.0.0/0" in d.allowed_cidrs:
            pulumi.log.warn("digitalocean.allowed_cidrs contains 0.0.0.0/0: SSH and the API are open to the internet", self)

        self.vpc = do.Vpc("vpc", name=f"{cfg.name}-vpc", region=d.region, ip_range=cfg.network.node_cidr, opts=child)
        key = do.SshKey("ssh-key", name=f"{cfg.name}-deploy", public_key=cfg.ssh.public_key, opts=child)
        cluster_tag = do.Tag("tag-cluster", name=cfg.name, opts=child)
        role_tags = {r: do.Tag(f"tag-{r}", name=f"{cfg.name}-{r}", opts=child) for r in ("master", "worker")}

        self.machines: list[Machine] = []
        self.droplets: list[do.Droplet] = []
        for node in cfg.nodes:
            droplet, machine = self._droplet(cfg, node, key, cluster_tag, role_tags[node.role])
            self.droplets.append(droplet)
            self.machines.append(machine)

        inbound, outbound = firewall_rules(cfg, cfg.name, f"{cfg.name}-master")
        self.firewall = do.Firewall("firewall", name=f"{cfg.name}-fw", tags=[cluster_tag.id],
                                    inbound_rules=inbound, outbound_rules=outbound, opts=child)

        first_master = next(i for i, m in enumerate(self.machines) if m.role == "master")
        self.api_endpoint: pulumi.Input[str] = self.machines[first_master].host
        urns = [dr.droplet_urn for dr in self.droplets]
        if d.reserved_ip:
            rip = do.ReservedIp("api-ip", region=d.region, opts=child)
            do.ReservedIpAssignment("api-ip-assignment", ip_address=rip.ip_address,
                                    droplet_id=self.droplets[first_master].id.apply(int), opts=child)
            self.api_endpoint = rip.ip_address
            urns.append(rip.reserved_ip_urn)
        project = do.Project("project", name=cfg.name, purpose="Kubernetes lab cluster (kubelab)",
                             environment="Development", opts=child)
        do.ProjectResources("project-resources", project=project.id, resources=urns, opts=child)
        self.register_outputs({"vpc": self.vpc.id, "firewall": self.firewall.id})

    def _droplet(self, cfg: ClusterConfig, node: NodeSpec, key: do.SshKey, cluster_tag: do.Tag,
                 role_tag: do.Tag) -> tuple[do.Droplet, Machine]:
        d = cfg.digitalocean
        assert d is not None
        role = cfg.masters if node.role == "master" else cfg.workers
        host_key, user_data = host_key_user_data(
            node.name, self, "cloud-init/droplet-user-data.yaml.j2", cluster=cfg.name, name=node.name, role=node.role)
        droplet = do.Droplet(
            node.name,
            name=f"{cfg.name}-{node.name}",
            image=d.image,
            size=role.size,
            region=d.region,
            vpc_uuid=self.vpc.id,
            ssh_keys=[key.fingerprint],
            user_data=user_data,
            tags=[cluster_tag.id, role_tag.id],
            monitoring=d.monitoring,
            opts=pulumi.ResourceOptions(parent=self),
        )
        machine = Machine(
            spec=node,
            host=droplet.ipv4_address,
            private_address=droplet.ipv4_address_private,
            user=cfg.ssh.user,
            private_key=cfg.ssh.private_key(),
            host_key=host_key,
            identity=droplet.id,
            metadata_address=METADATA_ADDRESS,
            installs_packages=True,
            depends_on=[droplet],
            deleted_with=droplet,
        )
        return droplet, machine


# Serves each droplet's user_data (which carries its SSH host private key) to the droplet.
METADATA_ADDRESS = "169.254.169.254"


def create_machines(cfg: ClusterConfig, parent: pulumi.Resource) -> Fleet:
    fleet = DigitalOceanCluster("digitalocean", cfg, opts=pulumi.ResourceOptions(parent=parent))
    return Fleet(machines=fleet.machines, api_endpoint=fleet.api_endpoint)
