"""kubelab's configuration: one typed, validated object built once at start.

The stack's structured config ``kubelab:cluster`` is parsed by :func:`parse_cluster_config`
into frozen dataclasses. Nothing else in the program reads raw config. Validation runs before
any resource is registered; every refusal names the setting and says how to fix it, and all
problems are reported together so one preview shows everything that is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.versions import bundle_key, cache_root, load_versions

PLATFORMS = ("libvirt", "digitalocean", "static")
FLANNEL_BACKENDS = ("vxlan", "host-gw", "wireguard")
ADDONS = ("coredns", "metrics_server", "dashboard")
BINARY_SOURCES = ("download", "directory")
ROLES = ("master", "worker")

# Oldest and newest minor versions the templates are written and tested for.
SUPPORTED = {
    "kubernetes": ((1, 33), (1, 37)),
    "etcd": ((3, 5), (3, 6)),
    "containerd": ((2, 1), (2, 3)),  # config version 3 with cni.bin_dirs
    "runc": ((1, 2), (1, 5)),
    "cni_plugins": ((1, 5), (1, 9)),
    "flannel": ((0, 26), (0, 28)),
    "coredns": ((1, 11), (1, 14)),
}
MIN_MASTER_MEMORY_MIB = 2048
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SEMVER_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class ConfigError(Exception):
    """Invalid stack configuration; the message lists every problem with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"kubelab: invalid stack config (kubelab:cluster), nothing was created:\n{lines}")


@dataclass(frozen=True)
class NodeSpec:
    """One node as configured, before any machine exists."""

    name: str
    role: str  # "master" | "worker"
    runs_workloads: bool
    address: str | None = None  # cluster (private) address when known up front
    public_address: str | None = None  # static platform: address the bootstrap uses
    ssh_user: str | None = None  # static platform: per-host override
    ssh_private_key_file: str | None = None
    host_key: str | None = None  # pinned SSH host key (authorized_keys format)


@dataclass(frozen=True)
class RoleConfig:
    """Size of the machines of one role (platforms use what applies to them)."""

    cpus: int
    memory_mib: int
    disk_gib: int
    size: str | None  # DigitalOcean droplet size slug


@dataclass(frozen=True)
class NetworkConfig:
    node_cidr: str
    pod_cidr: str
    service_cidr: str
    cluster_dns: str
    cluster_domain: str
    flannel_backend: str
    etcd_prefix: str
    access_cidrs: tuple[str, ...]  # networks the deploy host uses to reach the nodes
    upstream_dns: tuple[str, ...]  # resolvers CoreDNS forwards to (empty: each node's own)

    @property
    def kubernetes_service_ip(self) -> str:
        """First address of the service CIDR: the ``kubernetes`` Service's ClusterIP."""
        return str(ipaddress.ip_network(self.service_cidr)[1])


@dataclass(frozen=True)
class SshConfig:
    user: str
    public_key: str
    private_key_file: str

    def private_key(self) -> str:
        return Path(self.private_key_file).read_text()


@dataclass(frozen=True)
class BinariesConfig:
    source: str  # "download" | "directory"
    path: str  # directory: the bundle; download: the host-side cache directory
    sha256: dict[str, str] = field(default_factory=dict)  # download: pinned checksums by file


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str
    domain_type: str  # kvm (default) or qemu (TCG)
    cpu_mode: str
    cpu_model: str | None
    image: str  # path or URL of the base qcow2
    pool: str
    pool_path: str | None
    network_name: str


@dataclass(frozen=True)
class DigitalOceanConfig:
    region: str
    image: str
    allowed_cidrs: tuple[str, ...]
    reserved_ip: bool
    monitoring: bool


POD_SECURITY_LEVELS = ("privileged", "baseline", "restricted")
# Ports the nodes themselves listen on: a NodePort range must leave them alone.
HOST_PORTS = {22: "SSH", 2379: "etcd", 2380: "etcd peers", 6443: "kube-apiserver", 8472: "flannel vxlan",
              10248: "kubelet healthz", 10250: "kubelet", 10256: "kube-proxy healthz",
              10257: "kube-controller-manager", 10259: "kube-scheduler"}
# flannel leases each node a /24 (SubnetLen 24): 254 addresses, minus the bridge and spare.
MAX_PODS_LIMIT = 250


@dataclass(frozen=True)
class KubeletConfig:
    """Settings every kubelet gets (workers, and masters that run workloads)."""

    max_pods: int = 110  # the kubelet's own default


@dataclass(frozen=True)
class EtcdConfig:
    """etcd's Raft timing. The defaults are etcd's own; slow or emulated machines (TCG labs,
    busy hosts) need longer ones, or members keep losing their leader and clients time out."""

    heartbeat_interval_ms: int = 100
    election_timeout_ms: int = 1000

    @property
    def client_check_timeout_s(self) -> int:
        """How long an API server's etcd health and readiness checks wait (its own default is
        2 s). A request that meets a leader election waits up to the election timeout, so the
        checks wait at least that long: with the lab's 5 s elections and 2 s checks, every
        master's /readyz failed at once under TCG (measured, 3 masters), the node-local load
        balancers marked them all down and cut the sessions through them."""
        return max(2, -(-self.election_timeout_ms // 1000))


@dataclass(frozen=True)
class BackupConfig:
    """etcd snapshots on every master (a systemd timer), seed 001's "back etcd up" made routine."""

    enabled: bool = True
    interval: str = "6h"  # a systemd time span: 30min, 6h, 1d
    keep: int = 7
    directory: str = "/var/backups/kubelab/etcd"


@dataclass(frozen=True)
class PreloadImage:
    """An image archive on the Pulumi host, pushed into the private registry at `pulumi up`."""

    file: str
    image: str  # fully qualified: docker.io/library/nginx:1.27
    layout: bool  # OCI image layout (else a docker save tarball)


@dataclass(frozen=True)
class RegistryConfig:
    """The private registry on the first master (seed 001's registry behind the firewall).

    Served read-only on the master's private address (TLS with a certificate from the cluster
    CA, unless ``insecure``); written only by `pulumi up`, through a loopback-only writer.
    containerd on every node resolves ``mirror_for`` registries through it.
    """

    enabled: bool
    insecure: bool = False
    port: int = 5000
    mirror_for: tuple[str, ...] = ("registry.k8s.io", "docker.io")
    preload: tuple[PreloadImage, ...] = ()
    directory: str = "/var/lib/registry"


@dataclass(frozen=True)
class DashboardConfig:
    """The Dashboard addon (``addons.dashboard``): what its login token may do."""

    access: str = "view"  # the ClusterRole of its login ServiceAccount: view (read-only) or cluster-admin

    @property
    def images(self) -> tuple[str, ...]:
        """Its images, fully qualified (they are not in the bundle)."""
        v = load_versions()["addons"]
        return (f"docker.io/kubernetesui/dashboard:v{v['dashboard']}",
                f"docker.io/kubernetesui/metrics-scraper:v{v['dashboard_metrics_scraper']}")


DASHBOARD_ACCESS = ("view", "cluster-admin")


@dataclass(frozen=True)
class ApiServerConfig:
    """kube-apiserver settings a user may change."""

    service_node_port_range: str = "30000-32767"  # NodePorts; also opened in the DigitalOcean firewall

    @property
    def node_port_range(self) -> tuple[int, int]:
        low, high = self.service_node_port_range.split("-")
        return int(low), int(high)


@dataclass(frozen=True)
class PodSecurityConfig:
    """Cluster-wide Pod Security admission defaults (a namespace label overrides them)."""

    enforce: str = "baseline"
    warn: str = "restricted"
    audit: str = "restricted"
    exempt_namespaces: tuple[str, ...] = ("kube-system",)


@dataclass(frozen=True)
class ClusterConfig:
    """The whole validated configuration of one stack."""

    name: str
    platform: str
    versions: dict[str, str]  # the [node] table of versions.toml, with stack overrides
    addon_versions: dict[str, str]  # the [addons] table (images pulled from a registry)
    masters: RoleConfig
    workers: RoleConfig
    masters_run_workloads: bool
    nodes: tuple[NodeSpec, ...]
    network: NetworkConfig
    ssh: SshConfig
    binaries: BinariesConfig
    registry_mirrors: dict[str, tuple[str, ...]]
    addons: dict[str, bool]
    pod_security: PodSecurityConfig
    kubelet: KubeletConfig
    etcd: EtcdConfig
    backup: BackupConfig
    registry: RegistryConfig
    dashboard: DashboardConfig
    apiserver: ApiServerConfig
    libvirt: LibvirtConfig | None
    digitalocean: DigitalOceanConfig | None

    @property
    def master_nodes(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.role == "master")

    @property
    def load_balanced_nodes(self) -> tuple[NodeSpec, ...]:
        """Nodes that run no API server, so reach it through a node-local load balancer."""
        return tuple(n for n in self.nodes if n.role != "master")

    @property
    def workload_nodes(self) -> tuple[NodeSpec, ...]:
        """Nodes that run a kubelet (workers, and masters when they also run workloads)."""
        return tuple(n for n in self.nodes if n.runs_workloads)


class _Reader:
    """Reads a nested dict, recording problems instead of raising at the first one."""

    def __init__(self, problems: list[str]):
        self.problems = problems

    def section(self, raw: dict, key: str, path: str) -> dict:
        value = raw.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{path}.{key}: must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown(self, raw: dict, allowed: set[str], path: str) -> None:
        for key in sorted(set(raw) - allowed):
            self.problems.append(
                f"{path}.{key}: unknown setting; allowed here: {', '.join(sorted(allowed))}"
            )

    def get(self, raw: dict, key: str, path: str, typ: type, default: Any) -> Any:
        value = raw.get(key, default)
        if value is None:
            return default
        if typ is int and isinstance(value, bool):
            self.problems.append(f"{path}.{key}: must be an integer, got {value!r}")
            return default
        if typ is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, typ):
            self.problems.append(
                f"{path}.{key}: must be {typ.__name__}, got {type(value).__name__} {value!r}"
            )
            return default
        return value


def _parse_network(value: str, setting: str, problems: list[str]) -> ipaddress.IPv4Network | None:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        problems.append(f"{setting}: {value!r} is not a valid CIDR ({exc}); write it like 10.200.0.0/16")
        return None
    if not isinstance(net, ipaddress.IPv4Network):
        problems.append(f"{setting}: {value!r} is IPv6; kubelab builds IPv4 clusters, use an IPv4 CIDR")
        return None
    return net


def _parse_version(name: str, value: Any, problems: list[str]) -> str | None:
    setting = f"versions.{name}"
    if not isinstance(value, str):
        problems.append(f"{setting}: must be a string like \"1.2.3\", got {value!r}")
        return None
    text = value[1:] if value.startswith("v") else value
    if name in SUPPORTED:
        m = SEMVER_RE.match(text)
        if not m:
            problems.append(f"{setting}: {value!r} is not a release version; write MAJOR.MINOR.PATCH, e.g. \"1.36.4\"")
            return None
        minor = (int(m.group(1)), int(m.group(2)))
        lo, hi = SUPPORTED[name]
        if not lo <= minor <= hi:
            problems.append(
                f"{setting}: {value!r} is not supported; kubelab supports {name} "
                f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} (default from versions.toml)"
            )
            return None
    elif not re.match(r"^[0-9][0-9A-Za-z.+-]*$", text):
        problems.append(f"{setting}: {value!r} is not a version string; write it like \"3.10.1\"")
        return None
    return text


def _path(value: str) -> str:
    """Expand ``~`` and ``${VARS}`` (``${KUBELAB_CACHE}`` defaults to the cache directory)."""
    env = {**os.environ, "KUBELAB_CACHE": str(cache_root())}
    return os.path.expanduser(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value))


def _read_public_key(ssh: dict, problems: list[str]) -> tuple[str, str]:
    """Return (public key text, private key file); record problems for missing files."""
    priv = _path(str(ssh.get("private_key_file", "~/.ssh/id_ed25519")))
    pub_file = _path(str(ssh.get("public_key_file", priv + ".pub")))
    pub = ""
    if not os.path.isfile(priv):
        problems.append(
            f"ssh.private_key_file: {priv} does not exist; create a key with "
            f"`ssh-keygen -t ed25519 -N '' -f {priv}` or point ssh.private_key_file at yours"
        )
    if ssh.get("public_key"):
        pub = str(ssh["public_key"]).strip()
    elif not os.path.isfile(pub_file):
        problems.append(
            f"ssh.public_key_file: {pub_file} does not exist; set ssh.public_key_file "
            f"(or ssh.public_key) to the public half of ssh.private_key_file"
        )
    else:
        pub = Path(pub_file).read_text().strip()
    if pub and not re.match(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+) [A-Za-z0-9+/=]+", pub):
        problems.append("ssh.public_key: not an OpenSSH public key (expected 'ssh-ed25519 AAAA...')")
    return pub, priv


def parse_cluster_config(raw: dict[str, Any] | None, stack: str = "dev") -> ClusterConfig:
    """Validate the ``kubelab:cluster`` object and return the typed config.

    Raises :class:`ConfigError` listing every problem found.
    """
    problems: list[str] = []
    r = _Reader(problems)
    raw = dict(raw or {})
    r.unknown(
        raw,
        {"name", "platform", "versions", "masters", "workers", "masters_run_workloads", "network",
         "ssh", "binaries", "registry_mirrors", "addons", "pod_security", "kubelet", "etcd", "backup", "registry", "dashboard", "apiserver", "libvirt",
         "digitalocean", "static"},
        "cluster",
    )

    name = r.get(raw, "name", "cluster", str, f"kubelab-{stack}")
    if not NAME_RE.match(name):
        problems.append(f"name: {name!r} must be a DNS label (lowercase letters, digits, '-'), e.g. kubelab-dev")

    platform = r.get(raw, "platform", "cluster", str, "libvirt")
    if platform not in PLATFORMS:
        problems.append(f"platform: unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")

    # --- versions: defaults from versions.toml, overrides validated -----------------------
    versions = dict(load_versions()["node"])
    raw_versions = r.section(raw, "versions", "cluster")
    r.unknown(raw_versions, set(versions), "versions")
    for key in versions:
        value = raw_versions.get(key, versions[key])
        parsed = _parse_version(key, value, problems)
        if parsed:
            versions[key] = parsed

    # --- network ----------------------------------------------------------------------------
    net_raw = r.section(raw, "network", "cluster")
    r.unknown(net_raw, {"node_cidr", "pod_cidr", "service_cidr", "cluster_dns", "cluster_domain",
                        "flannel_backend", "etcd_prefix", "access_cidrs", "upstream_dns"}, "network")
    node_cidr = r.get(net_raw, "node_cidr", "network", str, "10.240.0.0/24")
    pod_cidr = r.get(net_raw, "pod_cidr", "network", str, "10.200.0.0/16")
    service_cidr = r.get(net_raw, "service_cidr", "network", str, "10.32.0.0/24")
    nets = {
        "network.node_cidr": _parse_network(node_cidr, "network.node_cidr", problems),
        "network.pod_cidr": _parse_network(pod_cidr, "network.pod_cidr", problems),
        "network.service_cidr": _parse_network(service_cidr, "network.service_cidr", problems),
    }
    keys = list(nets)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            na, nb = nets[a], nets[b]
            if na is not None and nb is not None and na.overlaps(nb):
                problems.append(
                    f"{b}: {nb} overlaps {a} {na}; node, pod and service networks must be disjoint "
                    f"(defaults: node 10.240.0.0/24, pod 10.200.0.0/16, service 10.32.0.0/24)"
                )
    svc = nets["network.service_cidr"]
    if svc is not None and svc.num_addresses < 256:
        problems.append(
            f"network.service_cidr: {svc} has {svc.num_addresses} addresses; use a /24 or larger "
            f"so cluster services (kubernetes, DNS, addons) fit"
        )
    pod = nets["network.pod_cidr"]
    if pod is not None and pod.prefixlen > 20:
        problems.append(
            f"network.pod_cidr: {pod} is too small; flannel gives each node a /24, use a /20 or larger (e.g. /16)"
        )
    default_dns = str(svc[10]) if svc is not None and svc.num_addresses > 10 else "10.32.0.10"
    cluster_dns = r.get(net_raw, "cluster_dns", "network", str, default_dns)
    try:
        dns_ip = ipaddress.ip_address(cluster_dns)
        if svc is not None and (dns_ip not in svc or dns_ip in (svc.network_address, svc[1], svc.broadcast_address)):
            problems.append(
                f"network.cluster_dns: {cluster_dns} must be a usable address inside network.service_cidr "
                f"{svc} other than the first ({svc[1]}, the kubernetes Service), e.g. {default_dns}"
            )
    except ValueError:
        problems.append(f"network.cluster_dns: {cluster_dns!r} is not an IP address; e.g. {default_dns}")
    cluster_domain = r.get(net_raw, "cluster_domain", "network", str, "cluster.local")
    backend = r.get(net_raw, "flannel_backend", "network", str, "vxlan")
    if backend not in FLANNEL_BACKENDS:
        problems.append(f"network.flannel_backend: unknown backend {backend!r}; choose one of {', '.join(FLANNEL_BACKENDS)}")
    etcd_prefix = r.get(net_raw, "etcd_prefix", "network", str, "/coreos.com/network")
    if not re.match(r"^(/[A-Za-z0-9._-]+)+$", etcd_prefix):
        problems.append(f"network.etcd_prefix: {etcd_prefix!r} must be an absolute etcd key path like /kube/network (no trailing slash)")
    access_raw = net_raw.get("access_cidrs", [])
    access: list[str] = []
    if not isinstance(access_raw, list):
        problems.append("network.access_cidrs: must be a list of CIDRs")
        access_raw = []
    for i, cidr in enumerate(access_raw):
        parsed = _parse_network(str(cidr), f"network.access_cidrs[{i}]", problems)
        if parsed is None:
            continue
        access.append(str(parsed))
        for key in ("network.pod_cidr", "network.service_cidr"):
            other = nets[key]
            if other is not None and parsed.overlaps(other):
                problems.append(
                    f"{key}: {other} overlaps network.access_cidrs[{i}] {parsed}, the network you reach the "
                    f"hosts through; the overlay would capture that route and lock you out of SSH "
                    f"(seed 001). Pick a {key.split('.')[1].replace('_cidr', '')} range that does not overlap {parsed}"
                )

    upstream_raw = net_raw.get("upstream_dns", [])
    upstream: list[str] = []
    if not isinstance(upstream_raw, list):
        problems.append("network.upstream_dns: must be a list of resolver IP addresses, e.g. [10.240.0.1]")
        upstream_raw = []
    for i, ip in enumerate(upstream_raw):
        try:
            parsed_ip = ipaddress.ip_address(str(ip))
        except ValueError:
            problems.append(f"network.upstream_dns[{i}]: {ip!r} is not an IP address")
            continue
        if parsed_ip.is_loopback:
            problems.append(f"network.upstream_dns[{i}]: {ip} is a loopback address; CoreDNS would forward to itself (use the node network's resolver)")
        upstream.append(str(parsed_ip))

    # --- roles and nodes --------------------------------------------------------------------
    masters_run_workloads = r.get(raw, "masters_run_workloads", "cluster", bool, False)
    role_cfgs: dict[str, RoleConfig] = {}
    named: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    for role, plural, dcount, dmem in (("master", "masters", 1, 2048), ("worker", "workers", 2, 2048)):
        sec = r.section(raw, plural, "cluster")
        r.unknown(sec, {"count", "nodes", "cpus", "memory_mib", "disk_gib", "size"}, plural)
        nodes_raw = sec.get("nodes")
        if nodes_raw is not None and not isinstance(nodes_raw, list):
            problems.append(f"{plural}.nodes: must be a list of {{name, address}} entries")
            nodes_raw = None
        count = r.get(sec, "count", plural, int, len(nodes_raw) if nodes_raw else dcount)
        if nodes_raw is not None and count != len(nodes_raw):
            problems.append(f"{plural}.count: {count} disagrees with the {len(nodes_raw)} entries of {plural}.nodes; drop count or make them match")
        if count < 0:
            problems.append(f"{plural}.count: must not be negative")
        counts[role] = count
        named[role] = nodes_raw or []
        cpus = r.get(sec, "cpus", plural, int, 2)
        mem = r.get(sec, "memory_mib", plural, int, dmem)
        disk = r.get(sec, "disk_gib", plural, int, 20)
        size = sec.get("size")
        if cpus < 1:
            problems.append(f"{plural}.cpus: must be at least 1")
        if role == "master" and mem < MIN_MASTER_MEMORY_MIB:
            problems.append(
                f"masters.memory_mib: {mem} MiB is too little for etcd + kube-apiserver; give masters at least {MIN_MASTER_MEMORY_MIB} MiB (2 GiB)"
            )
        if role == "worker" and mem < 1024:
            problems.append(f"workers.memory_mib: {mem} MiB is too little for a kubelet and pods; use at least 1024")
        if disk < 10:
            problems.append(f"{plural}.disk_gib: {disk} GiB is too small for the binaries and images; use at least 10")
        role_cfgs[role] = RoleConfig(cpus=cpus, memory_mib=mem, disk_gib=disk, size=str(size) if size else None)

    static_raw = r.section(raw, "static", "cluster")
    nodes: list[NodeSpec] = []
    if platform == "static":
        nodes = _static_nodes(static_raw, raw, masters_run_workloads, problems)
    else:
        if static_raw:
            problems.append(f"static: only used with platform static; remove it or set platform: static (platform is {platform})")
        for role in ROLES:
            for i in range(counts[role]):
                entry = named[role][i] if i < len(named[role]) else {}
                if not isinstance(entry, dict):
                    problems.append(f"{role}s.nodes[{i}]: must be a mapping with name and optional address")
                    entry = {}
                nodes.append(NodeSpec(
                    name=str(entry.get("name", f"{role}-{i + 1}")),
                    role=role,
                    runs_workloads=role == "worker" or masters_run_workloads,
                    address=str(entry["address"]) if entry.get("address") else None,
                ))

    n_masters = sum(1 for n in nodes if n.role == "master")
    if n_masters == 0:
        problems.append("masters.count: a cluster needs at least one master; set masters.count: 1 (or 3 for HA etcd)")
    if nodes and not any(n.runs_workloads for n in nodes):
        problems.append("workers.count: no node runs workloads; add workers or set masters_run_workloads: true")

    seen_names: dict[str, int] = {}
    seen_addrs: dict[str, str] = {}
    node_net = nets["network.node_cidr"]
    for n in nodes:
        if not NAME_RE.match(n.name):
            problems.append(f"node name {n.name!r}: must be a DNS label (lowercase letters, digits, '-')")
        seen_names[n.name] = seen_names.get(n.name, 0) + 1
        if n.address:
            try:
                ip = ipaddress.ip_address(n.address)
            except ValueError:
                problems.append(f"node {n.name}: address {n.address!r} is not an IP address")
                continue
            if n.address in seen_addrs:
                problems.append(f"node {n.name}: address {n.address} is already used by node {seen_addrs[n.address]}; give each node its own address")
            seen_addrs[n.address] = n.name
            if node_net is not None and (ip not in node_net or ip in (node_net.network_address, node_net.broadcast_address, node_net[1])):
                problems.append(
                    f"node {n.name}: address {n.address} is outside network.node_cidr {node_net} (or is its network, "
                    f"gateway or broadcast address); pick a host address inside it or change network.node_cidr"
                )
        for addr in (n.address, n.public_address):
            if not addr:
                continue
            for key in ("network.pod_cidr", "network.service_cidr"):
                other = nets[key]
                try:
                    inside = other is not None and ipaddress.ip_address(addr) in other
                except ValueError:
                    inside = False
                if inside:
                    problems.append(
                        f"{key}: {other} contains node {n.name}'s address {addr}; the overlay would capture the "
                        f"route to the host and lock you out of SSH (seed 001). Choose a range that excludes it"
                    )
    for dup, count in seen_names.items():
        if count > 1:
            problems.append(f"node name {dup!r} is used {count} times; node names must be unique")

    if platform == "libvirt" and node_net is not None and not problems:
        nodes = _assign_lab_addresses(nodes, node_net)

    # --- ssh ----------------------------------------------------------------------------------
    ssh_raw = r.section(raw, "ssh", "cluster")
    r.unknown(ssh_raw, {"user", "public_key_file", "public_key", "private_key_file"}, "ssh")
    ssh_user = r.get(ssh_raw, "user", "ssh", str, "root" if platform == "digitalocean" else "kubelab")
    pub, priv = _read_public_key(ssh_raw, problems)
    ssh = SshConfig(user=ssh_user, public_key=pub, private_key_file=priv)

    # --- binaries -----------------------------------------------------------------------------
    bin_raw = r.section(raw, "binaries", "cluster")
    r.unknown(bin_raw, {"source", "path", "sha256"}, "binaries")
    source = r.get(bin_raw, "source", "binaries", str, "directory")
    if source not in BINARY_SOURCES:
        problems.append(f"binaries.source: unknown source {source!r}; choose download (official release URLs) or directory (a pre-staged bundle)")
    default_path = cache_root() / ("bundles/" + bundle_key(versions) if source == "directory" else "downloads")
    path = _path(str(bin_raw.get("path") or default_path))
    sha = bin_raw.get("sha256") or {}
    if not isinstance(sha, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sha.values()):
        problems.append("binaries.sha256: must map file names to 64-hex-digit sha256 sums")
        sha = {}
    binaries = BinariesConfig(source=source, path=path, sha256=dict(sha))

    # --- registry mirrors, addons -------------------------------------------------------------
    mirrors_raw = raw.get("registry_mirrors") or {}
    mirrors: dict[str, tuple[str, ...]] = {}
    if not isinstance(mirrors_raw, dict):
        problems.append("registry_mirrors: must map a registry host (e.g. docker.io) to a list of mirror URLs")
        mirrors_raw = {}
    for host, urls in mirrors_raw.items():
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not urls:
            problems.append(f"registry_mirrors.{host}: must be a non-empty list of mirror URLs")
            continue
        for u in urls:
            if not re.match(r"^https?://[^/\s]+", str(u)):
                problems.append(f"registry_mirrors.{host}: {u!r} must be a URL like http://10.240.0.11:5000 (http for an insecure registry)")
        mirrors[str(host)] = tuple(str(u).rstrip("/") for u in urls)

    addons_raw = r.section(raw, "addons", "cluster")
    addons = {"coredns": True, "metrics_server": True, "dashboard": False}
    for key, value in addons_raw.items():
        if key not in ADDONS:
            problems.append(f"addons.{key}: unknown addon; available: {', '.join(ADDONS)}")
        elif not isinstance(value, bool):
            problems.append(f"addons.{key}: must be true or false")
        else:
            addons[key] = value

    # --- Pod Security admission defaults -------------------------------------------------------
    ps_raw = r.section(raw, "pod_security", "cluster")
    r.unknown(ps_raw, {"enforce", "warn", "audit", "exempt_namespaces"}, "pod_security")
    ps_default = PodSecurityConfig()
    levels = {}
    for key in ("enforce", "warn", "audit"):
        level = r.get(ps_raw, key, "pod_security", str, getattr(ps_default, key))
        if level not in POD_SECURITY_LEVELS:
            problems.append(f"pod_security.{key}: {level!r} is not a Pod Security level; choose one of "
                            f"{', '.join(POD_SECURITY_LEVELS)}")
        levels[key] = level
    exempt = r.get(ps_raw, "exempt_namespaces", "pod_security", list, list(ps_default.exempt_namespaces))
    for ns in exempt:
        if not isinstance(ns, str) or not NAME_RE.match(ns):
            problems.append(f"pod_security.exempt_namespaces: {ns!r} must be a namespace name (a DNS label)")
    pod_security = PodSecurityConfig(exempt_namespaces=tuple(str(n) for n in exempt), **levels)

    # --- kubelet and kube-apiserver settings ---------------------------------------------------
    kubelet_raw = r.section(raw, "kubelet", "cluster")
    r.unknown(kubelet_raw, {"max_pods"}, "kubelet")
    max_pods = r.get(kubelet_raw, "max_pods", "kubelet", int, KubeletConfig.max_pods)
    if not 10 <= max_pods <= MAX_PODS_LIMIT:
        problems.append(f"kubelet.max_pods: {max_pods} is out of range; flannel gives each node a /24 (254 addresses), "
                        f"so choose 10 to {MAX_PODS_LIMIT} (default {KubeletConfig.max_pods})")
    etcd_raw = r.section(raw, "etcd", "cluster")
    r.unknown(etcd_raw, {"heartbeat_interval_ms", "election_timeout_ms"}, "etcd")
    heartbeat = r.get(etcd_raw, "heartbeat_interval_ms", "etcd", int, EtcdConfig.heartbeat_interval_ms)
    election = r.get(etcd_raw, "election_timeout_ms", "etcd", int, EtcdConfig.election_timeout_ms)
    if not 10 <= heartbeat <= 5000:
        problems.append(f"etcd.heartbeat_interval_ms: {heartbeat} is out of range; choose 10 to 5000 "
                        f"(etcd's default {EtcdConfig.heartbeat_interval_ms}; about the round trip between masters)")
    elif not 5 * heartbeat <= election <= 50000:
        problems.append(f"etcd.election_timeout_ms: {election} must be at least 5 x etcd.heartbeat_interval_ms "
                        f"({5 * heartbeat}) and at most 50000 (etcd refuses to start otherwise); "
                        f"etcd's default is {EtcdConfig.election_timeout_ms}, 10 x the heartbeat is usual")
    backup_raw = r.section(raw, "backup", "cluster")
    r.unknown(backup_raw, {"enabled", "interval", "keep"}, "backup")
    backup_on = r.get(backup_raw, "enabled", "backup", bool, BackupConfig.enabled)
    interval = r.get(backup_raw, "interval", "backup", str, BackupConfig.interval)
    keep = r.get(backup_raw, "keep", "backup", int, BackupConfig.keep)
    if not re.fullmatch(r"[1-9][0-9]*(min|h|d)", interval):
        problems.append(f"backup.interval: {interval!r} is not a time span systemd and kubelab accept; "
                        f"write a number and min, h or d, e.g. 30min, 6h, 1d (default {BackupConfig.interval})")
    if not 1 <= keep <= 100:
        problems.append(f"backup.keep: {keep} is out of range; keep 1 to 100 snapshots (default {BackupConfig.keep})")
    registry = _registry(r, raw, platform, problems)
    dash_raw = r.section(raw, "dashboard", "cluster")
    r.unknown(dash_raw, {"access"}, "dashboard")
    dash_access = r.get(dash_raw, "access", "dashboard", str, DashboardConfig.access)
    if dash_access not in DASHBOARD_ACCESS:
        problems.append(f"dashboard.access: {dash_access!r} is not offered; choose view (read-only, the default) "
                        f"or cluster-admin (the token may change anything in the cluster)")
    api_raw = r.section(raw, "apiserver", "cluster")
    r.unknown(api_raw, {"service_node_port_range"}, "apiserver")
    port_range = r.get(api_raw, "service_node_port_range", "apiserver", str, ApiServerConfig.service_node_port_range)
    m = re.fullmatch(r"(\d{1,5})-(\d{1,5})", port_range)
    if not m or not 1 <= int(m[1]) < int(m[2]) <= 65535:
        problems.append(f"apiserver.service_node_port_range: {port_range!r} must be LOW-HIGH with 1 <= LOW < HIGH <= 65535, "
                        f"e.g. {ApiServerConfig.service_node_port_range}")
    else:
        clash = sorted(f"{p} ({what})" for p, what in HOST_PORTS.items() if int(m[1]) <= p <= int(m[2]))
        if clash:
            problems.append(f"apiserver.service_node_port_range: {port_range} includes ports the nodes listen on: "
                            f"{', '.join(clash)}; choose a range clear of them, e.g. {ApiServerConfig.service_node_port_range}")
        elif registry.enabled and int(m[1]) <= registry.port <= int(m[2]):
            problems.append(f"registry.port: {registry.port} is inside apiserver.service_node_port_range {port_range}; "
                            f"choose a port outside it (default {RegistryConfig.port})")

    # --- platform sections --------------------------------------------------------------------
    libvirt_cfg = _libvirt(r, raw, platform, problems)
    do_cfg = _digitalocean(r, raw, platform, role_cfgs, problems)

    if problems:
        raise ConfigError(problems)
    return ClusterConfig(
        name=name, platform=platform, versions=versions, addon_versions=dict(load_versions()["addons"]), masters=role_cfgs["master"],
        workers=role_cfgs["worker"], masters_run_workloads=masters_run_workloads, nodes=tuple(nodes),
        network=NetworkConfig(
            node_cidr=node_cidr, pod_cidr=pod_cidr, service_cidr=service_cidr, cluster_dns=cluster_dns,
            cluster_domain=cluster_domain, flannel_backend=backend, etcd_prefix=etcd_prefix,
            access_cidrs=tuple(access), upstream_dns=tuple(upstream),
        ),
        ssh=ssh, binaries=binaries, registry_mirrors=mirrors, addons=addons, pod_security=pod_security,
        kubelet=KubeletConfig(max_pods=max_pods),
        etcd=EtcdConfig(heartbeat_interval_ms=heartbeat, election_timeout_ms=election),
        backup=BackupConfig(enabled=backup_on, interval=interval, keep=keep), registry=registry,
        dashboard=DashboardConfig(access=dash_access), apiserver=ApiServerConfig(service_node_port_range=port_range),
        libvirt=libvirt_cfg, digitalocean=do_cfg,
    )


def _registry(r: _Reader, raw: dict, platform: str, problems: list[str]) -> RegistryConfig:
    """The ``registry`` section; on by default in the libvirt lab (seed 001's closed network)."""
    from components.images import ArchiveError, read_archive

    reg_raw = r.section(raw, "registry", "cluster")
    r.unknown(reg_raw, {"enabled", "insecure", "port", "mirror_for", "preload"}, "registry")
    enabled = r.get(reg_raw, "enabled", "registry", bool, platform == "libvirt")
    insecure = r.get(reg_raw, "insecure", "registry", bool, RegistryConfig.insecure)
    port = r.get(reg_raw, "port", "registry", int, RegistryConfig.port)
    if not 1024 <= port <= 65535 or port in HOST_PORTS:
        taken = f" ({HOST_PORTS[port]} listens there)" if port in HOST_PORTS else ""
        problems.append(f"registry.port: {port} cannot be used{taken}; choose a free port from 1024 to 65535 "
                        f"(default {RegistryConfig.port})")
    mirror_for = r.get(reg_raw, "mirror_for", "registry", list, list(RegistryConfig.mirror_for))
    for host in mirror_for:
        if not isinstance(host, str) or not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}", host):
            problems.append(f"registry.mirror_for: {host!r} must be a registry host like docker.io or quay.io "
                            f"(no scheme, no port)")
    preload: list[PreloadImage] = []
    for i, item in enumerate(r.get(reg_raw, "preload", "registry", list, [])):
        setting = f"registry.preload[{i}]"
        file, image = (item, None) if isinstance(item, str) else (
            (item.get("file"), item.get("image")) if isinstance(item, dict) else (None, None))
        if not isinstance(file, str) or (image is not None and not isinstance(image, str)):
            problems.append(f"{setting}: write a path to an image archive (docker save or OCI layout tar), "
                            f"or {{file: PATH, image: registry.example/team/app:1.0}}")
            continue
        path = Path(_path(file))
        if not path.is_file():
            problems.append(f"{setting}: {path} does not exist; write it with `docker save -o {path.name} IMAGE` "
                            f"(or crane pull IMAGE {path.name}) on a machine that has the image")
            continue
        try:
            archive = read_archive(path, image)
        except ArchiveError as exc:
            problems.append(f"{setting}: {exc}")
            continue
        preload.append(PreloadImage(file=str(path), image=archive.image, layout=archive.layout))
    if (reg_raw.get("preload") or reg_raw.get("mirror_for")) and not enabled:
        problems.append("registry.preload / registry.mirror_for: the registry is off (registry.enabled: false); "
                        "turn it on or remove these settings")
    return RegistryConfig(enabled=enabled, insecure=insecure, port=port,
                          mirror_for=tuple(str(h) for h in mirror_for), preload=tuple(preload))


def _assign_lab_addresses(nodes: list[NodeSpec], net: ipaddress.IPv4Network) -> list[NodeSpec]:
    """Give every lab node without an address a static one: masters from .11, workers from .21."""
    taken = {n.address for n in nodes if n.address}
    nxt = {"master": 11, "worker": 21}
    out = []
    for n in nodes:
        if n.address is None:
            while str(net[nxt[n.role]]) in taken:
                nxt[n.role] += 1
            addr = str(net[nxt[n.role]])
            taken.add(addr)
            n = NodeSpec(**{**n.__dict__, "address": addr})
        out.append(n)
    return out


def _static_nodes(static_raw: dict, raw: dict, masters_run_workloads: bool, problems: list[str]) -> list[NodeSpec]:
    for plural in ("masters", "workers"):
        if isinstance(raw.get(plural), dict) and ("count" in raw[plural] or "nodes" in raw[plural]):
            problems.append(f"{plural}: platform static takes nodes and roles from static.hosts; remove {plural}.count/nodes")
    hosts = static_raw.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        problems.append("static.hosts: platform static needs a list of hosts: [{name, address, private_address, role, user, private_key_file, host_key}]")
        return []
    nodes = []
    for i, h in enumerate(hosts):
        where = f"static.hosts[{i}]"
        if not isinstance(h, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        unknown = set(h) - {"name", "address", "private_address", "role", "user", "private_key_file", "host_key"}
        for k in sorted(unknown):
            problems.append(f"{where}.{k}: unknown setting")
        if not h.get("name") or not h.get("address"):
            problems.append(f"{where}: name and address are required")
            continue
        role = h.get("role", "worker")
        if role not in ROLES:
            problems.append(f"{where}.role: {role!r} must be master or worker")
            continue
        key_file = h.get("private_key_file")
        if key_file and not os.path.isfile(_path(key_file)):
            problems.append(f"{where}.private_key_file: {key_file} does not exist")
        nodes.append(NodeSpec(
            name=str(h["name"]), role=role, runs_workloads=role == "worker" or masters_run_workloads,
            address=str(h.get("private_address") or h["address"]), public_address=str(h["address"]),
            ssh_user=h.get("user"), ssh_private_key_file=_path(key_file) if key_file else None,
            host_key=h.get("host_key"),
        ))
    return nodes


def _libvirt(r: _Reader, raw: dict, platform: str, problems: list[str]) -> LibvirtConfig | None:
    sec = r.section(raw, "libvirt", "cluster")
    if platform != "libvirt":
        if sec:
            problems.append(f"libvirt: only used with platform libvirt (platform is {platform}); remove the section")
        return None
    r.unknown(sec, {"uri", "domain_type", "cpu_mode", "cpu_model", "image", "pool", "pool_path", "network_name"}, "libvirt")
    domain_type = r.get(sec, "domain_type", "libvirt", str, "kvm")
    if domain_type not in ("kvm", "qemu"):
        problems.append(f"libvirt.domain_type: {domain_type!r} must be kvm (hardware virtualisation) or qemu (TCG emulation, slow but works without KVM)")
    cpu_mode = r.get(sec, "cpu_mode", "libvirt", str, "host-passthrough" if domain_type == "kvm" else "custom")
    if cpu_mode not in ("host-passthrough", "host-model", "custom"):
        problems.append(f"libvirt.cpu_mode: {cpu_mode!r} must be host-passthrough, host-model or custom")
    cpu_model = sec.get("cpu_model") or ("qemu64" if cpu_mode == "custom" else None)
    if domain_type == "qemu" and cpu_mode == "host-passthrough":
        problems.append("libvirt.cpu_mode: host-passthrough needs domain_type kvm; with qemu (TCG) use cpu_mode: custom and cpu_model: qemu64")
    image = r.get(sec, "image", "libvirt", str, "")
    if not image:
        problems.append(
            "libvirt.image: set the base image (a qcow2 path or URL), e.g. the one `make image` prints, "
            "or an official Debian genericcloud image"
        )
    elif "://" not in image and not os.path.isfile(_path(image)):
        problems.append(f"libvirt.image: {image} does not exist; run `make image` or point libvirt.image at a qcow2 file")
    return LibvirtConfig(
        uri=r.get(sec, "uri", "libvirt", str, "qemu:///system"), domain_type=domain_type, cpu_mode=cpu_mode,
        cpu_model=str(cpu_model) if cpu_model else None,
        image=_path(image) if "://" not in image else image,
        pool=r.get(sec, "pool", "libvirt", str, "kubelab"), pool_path=sec.get("pool_path"),
        network_name=r.get(sec, "network_name", "libvirt", str, ""),
    )


DO_REGIONS = ("ams3", "blr1", "fra1", "lon1", "nyc1", "nyc2", "nyc3", "sfo2", "sfo3", "sgp1", "syd1", "tor1", "atl1")
DO_SIZE_RE = re.compile(r"^s-(\d+)vcpu-(\d+(?:\.\d+)?)gb(-[a-z0-9-]+)?$|^(c|g|gd|m|so|c2)-\d+vcpu-\d+gb(-[a-z0-9-]+)?$|^(c|g|gd|m|so|c2)-\d+(-[a-z0-9-]+)?$")


def _do_size_memory_gib(size: str) -> float | None:
    m = re.match(r"^s-\d+vcpu-(\d+(?:\.\d+)?)gb", size)
    if m:
        return float(m.group(1))
    m = re.match(r"^s-\d+vcpu-(\d+)mb", size)
    if m:
        return int(m.group(1)) / 1024
    return None


def _digitalocean(r: _Reader, raw: dict, platform: str, roles: dict[str, RoleConfig], problems: list[str]) -> DigitalOceanConfig | None:
    sec = r.section(raw, "digitalocean", "cluster")
    if platform != "digitalocean":
        if sec:
            problems.append(f"digitalocean: only used with platform digitalocean (platform is {platform}); remove the section")
        return None
    r.unknown(sec, {"region", "image", "allowed_cidrs", "reserved_ip", "monitoring"}, "digitalocean")
    region = r.get(sec, "region", "digitalocean", str, "fra1")
    if region not in DO_REGIONS:
        problems.append(f"digitalocean.region: unknown region {region!r}; choose one of {', '.join(DO_REGIONS)}")
    image = r.get(sec, "image", "digitalocean", str, "debian-13-x64")
    if not re.match(r"^(debian-1[2-9]|ubuntu-2[2-9]-\d\d)-x64$", image):
        problems.append(f"digitalocean.image: {image!r} is not a supported x64 image slug; use debian-13-x64, debian-12-x64 or ubuntu-24-04-x64")
    for role, default in (("master", "s-2vcpu-4gb"), ("worker", "s-2vcpu-2gb")):
        size = roles[role].size or default
        roles[role] = RoleConfig(roles[role].cpus, roles[role].memory_mib, roles[role].disk_gib, size)
        if not DO_SIZE_RE.match(size) and not re.match(r"^s-\d+vcpu-\d+mb", size):
            problems.append(f"{role}s.size: {size!r} is not a DigitalOcean size slug; e.g. s-2vcpu-4gb")
        mem = _do_size_memory_gib(size)
        if role == "master" and mem is not None and mem < 2:
            problems.append(f"masters.size: {size} has {mem:g} GB of memory; masters need at least 2 GB, e.g. s-2vcpu-2gb or s-2vcpu-4gb")
    cidrs = sec.get("allowed_cidrs")
    if not isinstance(cidrs, list) or not cidrs:
        problems.append("digitalocean.allowed_cidrs: list the networks allowed to reach SSH and the API (6443), e.g. [203.0.113.7/32]; an empty list would lock you out")
        cidrs = []
    for i, c in enumerate(cidrs):
        _parse_network(str(c), f"digitalocean.allowed_cidrs[{i}]", problems)
    return DigitalOceanConfig(
        region=region, image=image, allowed_cidrs=tuple(str(c) for c in cidrs),
        reserved_ip=r.get(sec, "reserved_ip", "digitalocean", bool, False),
        monitoring=r.get(sec, "monitoring", "digitalocean", bool, True),
    )
