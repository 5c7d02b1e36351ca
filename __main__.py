"""kubelab: Kubernetes from release binaries on libvirt VMs, DigitalOcean droplets or your hosts.

Load and validate the stack config, verify the binaries, build the cluster, export.
"""

import pulumi

from components.binaries import BinaryError, resolve
from components.cluster import Cluster
from components.config import ConfigError, parse_cluster_config

try:
    cfg = parse_cluster_config(pulumi.Config("kubelab").get_object("cluster"), pulumi.get_stack())
    bundle = resolve(cfg.binaries, cfg.versions)
except (ConfigError, BinaryError) as exc:
    # A clean error at preview time, before any resource is registered.
    raise pulumi.RunError(str(exc)) from None

cluster = Cluster(cfg.name, cfg, bundle)

pulumi.export("apiserverUrl", cluster.apiserver_url)
pulumi.export("kubeconfig", cluster.kubeconfig)
pulumi.export("nodes", cluster.nodes)
pulumi.export("registryUrl", cluster.registry_url)
