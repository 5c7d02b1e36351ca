"""kubelab: Kubernetes from release binaries on libvirt VMs, DigitalOcean droplets or your hosts.

Load and validate the stack config, check the change against what the stack runs now, verify
the binaries, build the cluster, export.
"""

import pulumi

from components.binaries import BinaryError, resolve
from components.cluster import Cluster
from components.config import ConfigError, parse_cluster_config
from components.transitions import check_transition, read_deployed, transition_warnings

try:
    cfg = parse_cluster_config(pulumi.Config("kubelab").get_object("cluster"), pulumi.get_stack())
    before = read_deployed()
    check_transition(cfg, before)
    bundle = resolve(cfg.binaries, cfg.versions)
except (ConfigError, BinaryError) as exc:
    # A clean error at preview time, before any resource is registered.
    raise pulumi.RunError(str(exc)) from None

for warning in transition_warnings(cfg, before):
    pulumi.log.warn(warning)
cluster = Cluster(cfg.name, cfg, bundle, before)

pulumi.export("apiserverUrl", cluster.apiserver_url)
pulumi.export("kubeconfig", cluster.kubeconfig)
pulumi.export("nodes", cluster.nodes)
pulumi.export("registryUrl", cluster.registry_url)
# How each etcd member first started: a master added later joins, the others' units stay.
pulumi.export("etcdMembers", cluster.etcd_members)
# What the cluster runs: the next preview refuses a skipped or backward minor version.
pulumi.export("kubernetesVersion", cfg.versions["kubernetes"])
