"""The resource graph under Pulumi mocks: ordering, per-role resource sets, exports, secrets.

Ordering is read from the dependency graph the program really registers (a recording
monitor), not from the code: a missing ``depends_on`` fails here.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re

import pytest

from components.versions import bundle_key, load_versions
from tests import diff_contract
from tests.conftest import base_config, make_bundle
from tests.mockrun import Graph, run_program
from tests.test_rendered import unwrap

CMD = "command:remote:Command"
COPY = "command:remote:CopyToRemote"
SECRET_SIG = "4dabf18193072939515e22adb298388d"

MASTER_STEPS_1_2 = {"wait-for-ssh", "etcd", "etcd-auth", "etcd-backup", "flannel-network-config", "kube-apiserver", "rbac-apiserver-to-kubelet",
                    "kube-controller-manager", "kube-scheduler", "flanneld", "kube-proxy", "addon-coredns",
                    "addon-metrics-server", "cluster-ready", "registry",
                    "remove-node-worker-1", "remove-node-worker-2", "unpack-etcd", "unpack-kubernetes",
                    # the rollout's steps around each worker (no-ops on create)
                    "drain-worker-1", "uncordon-worker-1", "drain-worker-2", "uncordon-worker-2"}
WORKER_STEPS = {"wait-for-ssh", "unpack-node", "apiserver-lb", "flanneld", "containerd", "kubelet", "kube-proxy"}
# Binaries travel as archives (binaries.node_archives); image archives one by one.
MASTER_UPLOADS = {"etcd", "kubernetes"}
IMAGE_UPLOADS = {"images-pause.tar", "images-coredns.tar", "images-metrics-server.tar"}
# The private registry on the first master (on by default in the lab): every image (its
# binaries are in the master's kubernetes archive).
REGISTRY_UPLOADS = IMAGE_UPLOADS
WORKER_UPLOADS = {"node"}


@pytest.fixture(scope="module")
def lab(module_cache) -> Graph:
    return run_program(base_config(module_cache, "libvirt"))


@pytest.fixture(scope="module")
def seed000(module_cache) -> Graph:
    raw = base_config(module_cache, "libvirt")
    raw.update(masters={"count": 3}, workers={"count": 0}, masters_run_workloads=True)
    return run_program(raw)


@pytest.fixture(scope="module")
def ha(module_cache) -> Graph:
    """Issue 12's HA control plane: three masters that run no pods, one worker."""
    raw = base_config(module_cache, "libvirt")
    raw.update(masters={"count": 3}, workers={"count": 1})
    return run_program(raw)


def steps_of(g: Graph, node: str) -> set[str]:
    return {r.name.removeprefix(f"{node}-") for r in g.find(CMD) if r.name.startswith(f"{node}-")}


def uploads_of(g: Graph, node: str) -> set[str]:
    return {r.name.removeprefix(f"{node}-upload-") for r in g.find(COPY) if r.name.startswith(f"{node}-upload-")}


def test_per_role_resource_sets_1_master_2_workers(lab):
    assert steps_of(lab, "master-1") == MASTER_STEPS_1_2
    assert steps_of(lab, "worker-1") == WORKER_STEPS
    assert steps_of(lab, "worker-2") == WORKER_STEPS
    assert uploads_of(lab, "master-1") == MASTER_UPLOADS | REGISTRY_UPLOADS
    assert uploads_of(lab, "worker-1") == WORKER_UPLOADS  # images come from the registry
    counts = collections.Counter(r.type for r in lab.registrations)
    assert counts["libvirt:index/domain:Domain"] == 3
    assert counts["libvirt:index/cloudInitDisk:CloudInitDisk"] == 3
    assert counts["libvirt:index/volume:Volume"] == 4  # base + one copy-on-write disk per node
    assert counts["libvirt:index/network:Network"] == 1
    assert counts["kubelab:worker:WorkerNode"] == 2
    assert counts["tls:index/selfSignedCert:SelfSignedCert"] == 3  # cluster, etcd, front-proxy CAs


def test_per_role_resource_sets_seed_000_master_is_also_a_node(seed000):
    for node in ("master-1", "master-2", "master-3"):
        steps = steps_of(seed000, node)
        assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                "flanneld", "containerd", "kubelet", "kube-proxy"} <= steps
        assert uploads_of(seed000, node) == MASTER_UPLOADS | (REGISTRY_UPLOADS if node == "master-1" else set())
        # one archive besides etcd's: the control plane and the runtime with its kubelet
        unpack = unwrap(seed000.one(f"{node}-unpack-kubernetes").inputs["create"])
        assert all(f" bin/{b}\n" in unpack for b in ("kube-apiserver", "kubelet", "containerd", "runc", "flanneld"))
    assert len(seed000.find("kubelab:worker:WorkerNode")) == 3
    # cluster-wide steps run once, on the first master
    assert {"cluster-ready", "addon-coredns", "flannel-network-config"} <= steps_of(seed000, "master-1")
    assert "cluster-ready" not in steps_of(seed000, "master-2")
    # the other masters that run pods leave through the same drain-and-delete step
    assert {"remove-node-master-2", "remove-node-master-3"} <= steps_of(seed000, "master-1")
    assert "remove-node-master-1" not in steps_of(seed000, "master-1")


def test_etcd_auth_least_privilege_before_any_client_uses_etcd(lab):
    """flannel's etcd key sits on every node: with etcd auth on, it reaches only flannel's
    prefix. Auth is set up after every member is healthy, before flannel or the API server."""
    auth = lab.one("master-1-etcd-auth")
    assert lab.depends_on(auth, lab.one("master-1-etcd"))
    for later in ("master-1-flannel-network-config", "master-1-kube-apiserver", "worker-1-flanneld"):
        assert lab.depends_on(lab.one(later), auth), later
    script = auth.inputs["create"]
    assert "etcdctl role grant-permission flannel --prefix=true readwrite /coreos.com/network/" in script
    assert "ensure_user kube-apiserver-etcd-client root" in script
    assert "ensure_user flannel flannel" in script
    assert "ensure_user kube-etcd-healthcheck-client kube-etcd-healthcheck" in script
    assert "etcdctl role grant-permission kube-etcd-healthcheck read health" in script
    assert "etcdctl auth enable" in script
    assert "root-client.crt" in lab.one("master-1-flannel-network-config").inputs["create"]


def test_a_removed_worker_is_drained_and_deleted_before_its_machine_goes(lab):
    """Scale-down: Pulumi deletes in reverse dependency order, so the removal step (on the
    first master) depends on the node's steps and its machine; cluster-ready depends on it,
    so on a destroy of the whole cluster cluster-ready's delete goes first and marks it."""
    for node in ("worker-1", "worker-2"):
        removal = lab.one(f"master-1-remove-node-{node}")
        assert lab.depends_on(removal, lab.one(f"{node}-kubelet"))
        assert lab.depends_on(removal, lab.one(node, "libvirt:index/domain:Domain"))
        assert lab.depends_on(removal, lab.one("master-1-kube-apiserver"))
        delete = removal.inputs["delete"]
        assert f"kubectl drain {node} --ignore-daemonsets --delete-emptydir-data --force --timeout=300s" in delete
        assert f"kubectl delete node {node} --wait=true" in delete
        assert "if [ -e /var/lib/kubelab/cluster-destroying ]" in delete
        assert lab.depends_on(lab.one("master-1-cluster-ready"), removal)
    ready = lab.one("master-1-cluster-ready")
    assert "touch /var/lib/kubelab/cluster-destroying" in ready.inputs["delete"]
    assert "rm -f /var/lib/kubelab/cluster-destroying" in ready.inputs["create"]


def test_etcd_backups_on_every_master_after_their_etcd_user_exists(seed000, module_cache):
    """Each member snapshots itself on a timer, as the etcd user the etcd-auth step creates
    (etcd lets only the root role take snapshots); off, nothing of it is created."""
    auth = seed000.one("master-1-etcd-auth")
    assert "ensure_user kubelab-etcd-backup root" in unwrap(auth.inputs["create"])
    for node in ("master-1", "master-2", "master-3"):
        backup = seed000.one(f"{node}-etcd-backup")
        assert seed000.depends_on(backup, auth) and seed000.depends_on(backup, seed000.one(f"{node}-etcd"))
    off = run_program({**base_config(module_cache, "libvirt"), "backup": {"enabled": False}})
    assert not [r for r in off.find() if "etcd-backup" in r.name]
    assert "kubelab-etcd-backup" not in unwrap(off.one("master-1-etcd-auth").inputs["create"])


@pytest.mark.parametrize("graph", ["lab", "seed000"])
def test_bootstrap_order_etcd_apiserver_controllers(request, graph):
    g: Graph = request.getfixturevalue(graph)
    etcd = [r for r in g.find(CMD) if r.name.endswith("-etcd")]
    apis = [r for r in g.find(CMD) if r.name.endswith("-kube-apiserver")]
    assert etcd and apis
    for api in apis:
        for member in etcd:  # every API server waits for every etcd member
            assert g.depends_on(api, member), f"{api.name} does not wait for {member.name}"
    for r in g.find(CMD):
        if r.name.endswith(("-kube-controller-manager", "-kube-scheduler")):
            node = r.name.rsplit("-kube-", 1)[0]
            assert g.depends_on(r, g.one(f"{node}-kube-apiserver"))
    flannel_cfg = g.one("master-1-flannel-network-config")
    assert all(g.depends_on(flannel_cfg, m) for m in etcd)


@pytest.mark.parametrize("graph", ["lab", "seed000"])
def test_node_services_wait_for_the_api_server_and_containerd_for_nothing_on_workers(request, graph):
    """kubelet and kube-proxy start once every API server answers, beside the controllers
    (they need nothing from each other to start); containerd (and its image imports) needs
    nothing from the control plane and, on workers, runs while the masters bootstrap."""
    g: Graph = request.getfixturevalue(graph)
    apiservers = [r for r in g.find(CMD) if r.name.endswith("-kube-apiserver")]
    controllers = [r for r in g.find(CMD) if r.name.endswith(("-kube-controller-manager", "-kube-scheduler"))]
    assert apiservers and controllers
    for containerd in [r for r in g.find(CMD) if r.name.endswith("-containerd")]:
        # ...except on a master that runs pods: there it would compete with etcd and the API server.
        on_master = containerd.name.startswith("master-")
        assert all(g.depends_on(containerd, a) for a in apiservers) == on_master, containerd.name
    worker_steps = [r for r in g.find(CMD, parent_type="kubelab:worker:WorkerNode") if not r.name.endswith("-containerd")]
    assert worker_steps
    for step in worker_steps:
        for a in apiservers:
            assert g.depends_on(step, a), f"{step.name} does not wait for {a.name}"
        for c in controllers:
            assert not g.depends_on(step, c), f"{step.name} waits for {c.name}, which it does not need"
    # The addons are API objects: applied once the API servers answer, beside the controllers.
    addons = [r for r in g.find(CMD) if "-addon-" in r.name]
    assert addons
    for step in addons:
        assert all(g.depends_on(step, a) for a in apiservers), step.name
        assert not any(g.depends_on(step, c) for c in controllers), step.name
    # flanneld talks to etcd only: it waits for its network config there, not for the API server.
    flannel_cfg = g.one("master-1-flannel-network-config")
    for flanneld in [r for r in g.find(CMD) if r.name.endswith("-flanneld")]:
        assert g.depends_on(flanneld, flannel_cfg), flanneld.name
        assert not any(g.depends_on(flanneld, a) for a in apiservers), flanneld.name


@pytest.mark.parametrize("graph", ["lab", "ha"])
def test_nodes_reach_the_api_through_their_own_load_balancer(request, graph):
    """Every node that is not a master has a node-local load balancer in front of every API
    server; its kubelet and kube-proxy wait for it. It needs nothing from the control plane
    (it installs while the masters bootstrap), and masters have none."""
    g: Graph = request.getfixturevalue(graph)
    lbs = {r.name.removesuffix("-apiserver-lb"): r for r in g.find(CMD) if r.name.endswith("-apiserver-lb")}
    nodes = {r.name.removesuffix("-wait-for-ssh") for r in g.find(CMD) if r.name.endswith("-wait-for-ssh")}
    assert set(lbs) == {n for n in nodes if not n.startswith("master-")} and lbs
    assert {r.urn for r in lbs.values()} == {r.urn for r in g.find(CMD, parent_type="kubelab:node:ApiServerLoadBalancer")}
    apiservers = [r for r in g.find(CMD) if r.name.endswith("-kube-apiserver")]
    for node, lb in lbs.items():
        assert not any(g.depends_on(lb, a) for a in apiservers), node
        for step in ("kubelet", "kube-proxy"):
            assert g.depends_on(g.one(f"{node}-{step}"), lb), f"{node}-{step}"
        config = re.search(r"^put \d+ /etc/kubelab/apiserver-lb/haproxy.cfg <<'KUBELAB_EOF'\n(.*?)^KUBELAB_EOF$",
                           unwrap(lb.inputs["create"]), re.M | re.S).group(1)
        masters = [(f"master-{i}", f"10.240.0.{10 + i}:6443") for i in range(1, len(apiservers) + 1)]
        assert re.findall(r"^  server (\S+) (\S+)$", config, re.M) == masters, node
        # The same servers again, unchecked, for when none passes its check.
        assert re.findall(r"^  server (\S+)-unchecked (\S+) backup no-check$", config, re.M) == masters, node


def test_node_local_order_and_final_readiness(lab):
    for node in ("worker-1", "worker-2"):
        kubelet = lab.one(f"{node}-kubelet")
        assert lab.depends_on(kubelet, lab.one(f"{node}-containerd"))
        assert lab.depends_on(kubelet, lab.one(f"{node}-flanneld"))
        assert lab.depends_on(kubelet, lab.one(f"{node}-wait-for-ssh"))
        assert lab.depends_on(kubelet, lab.one(f"{node}-unpack-node"))
        assert lab.depends_on(lab.one(f"{node}-unpack-node"), lab.one(f"{node}-upload-node", COPY))
    final = lab.one("master-1-cluster-ready")
    for r in lab.find(CMD):
        if r is not final and not r.name.endswith("wait-for-ssh"):
            assert lab.depends_on(final, r) or r.name.startswith("master-1-") , r.name
    for r in lab.find(CMD, parent_type="kubelab:worker:WorkerNode"):
        assert lab.depends_on(final, r)


def test_a_destroyed_machine_takes_its_steps_deletes_with_it(lab, config_for):
    """On libvirt every step and upload is deleted with its VM (Pulumi's deletedWith): a
    destroy of the lab runs no remote delete, not even cluster-ready's mark or a drain; a
    worker removed alone is still drained, its removal step living on the first master."""
    domains = {r.name: r.urn for r in lab.find("libvirt:index/domain:Domain")}
    for r in lab.find(CMD) + lab.find(COPY):
        node = next(n for n in domains if r.name.startswith(n + "-"))
        assert r.deleted_with == domains[node], r.name
    assert lab.one("master-1-remove-node-worker-1").deleted_with == domains["master-1"]
    # Existing hosts outlive the stack: their steps' deletes always run.
    assert all(r.deleted_with == "" for r in run_program(config_for("static")).find(CMD))


def test_every_command_waits_for_ssh_and_its_vm(lab):
    domains = {r.name: r for r in lab.find("libvirt:index/domain:Domain")}
    for r in lab.find(CMD) + lab.find(COPY):
        node = next(n for n in ("master-1", "worker-1", "worker-2") if r.name.startswith(n + "-"))
        assert lab.depends_on(r, domains[node])
        if not r.name.endswith("wait-for-ssh"):
            assert lab.depends_on(r, lab.one(f"{node}-wait-for-ssh"))


def test_wait_for_ssh_dials_without_limit_and_has_a_timeout(lab):
    for r in lab.find(CMD):
        conn = r.inputs["connection"]["value"]
        assert conn["hostKey"].startswith("ssh-ed25519 "), "host key must be pinned"
        if r.name.endswith("wait-for-ssh"):
            assert conn["dialErrorLimit"] == -1
            assert r.custom_timeouts["create"] == "20m"
        else:
            assert r.custom_timeouts["create"], f"{r.name} has no create timeout"


def test_no_command_uses_triggers(lab):
    # triggers replace the resource; a kubelet flag change must only update that step.
    for r in lab.find(CMD):
        assert "triggers" not in r.inputs, r.name
        # an update would warn that sshd refuses PULUMI_COMMAND_STDOUT (seen on the real engine)
        assert r.inputs["addPreviousOutputInEnv"] is False, r.name
    # An upload has nothing remote to delete: its one trigger is the machine it copies to.
    for r in lab.find(COPY):
        node = r.name.split("-upload-")[0]
        assert r.inputs["triggers"] == [f"{node}-id"], r.name


def test_libvirt_objects_replace_cleanly_and_diff_quietly(lab):
    """Fixed names: a replacement deletes the old object first. The domain's interface
    addresses are read back from DHCP leases the guests never take: ignored in diffs, so a
    no-op preview of a lab plans nothing (found on the first real `pulumi up`)."""
    for typ in ("libvirt:index/domain:Domain", "libvirt:index/volume:Volume", "libvirt:index/cloudInitDisk:CloudInitDisk",
                "libvirt:index/network:Network"):
        for r in lab.find(typ):
            assert r.delete_before_replace, r.name
    for d in lab.find("libvirt:index/domain:Domain"):
        assert d.ignore_changes == ["networkInterfaces[0].addresses"], d.name
        assert d.inputs["networkInterfaces"][0]["addresses"], d.name  # still set on create


def test_libvirt_volumes_are_created_one_at_a_time(request):
    """Every volume and cloud-init disk of the pool waits for the one before it: libvirt and
    the provider deadlock on parallel cloud-init uploads (a CI run hung an hour on it)."""
    for name in ("lab", "seed000"):
        g = request.getfixturevalue(name)
        volumes = g.find("libvirt:index/volume:Volume") + g.find("libvirt:index/cloudInitDisk:CloudInitDisk")
        assert len(volumes) == 1 + 2 * 3, name
        for i, a in enumerate(volumes):
            for b in volumes[i + 1:]:
                assert g.depends_on(a, b) or g.depends_on(b, a), f"{name}: {a.name} and {b.name} may run in parallel"


def step_inputs(g: Graph) -> dict[str, dict]:
    """Every remote step's and upload's inputs, by name: what a preview would diff."""
    return {r.name: r.inputs for r in g.find(CMD) + g.find(COPY)}


def test_a_replaced_machine_reruns_exactly_its_own_steps_and_uploads(module_cache):
    """A VM replaced (disk, image, size, or deleted by hand) keeps name, address and host key:
    only its new domain id tells. Every step and upload on that node changes, nothing else."""
    raw = base_config(module_cache, "libvirt")
    before = run_program(raw)
    after = run_program(raw, ids={"worker-1": "worker-1-replaced-uuid"})

    old, new = step_inputs(before), step_inputs(after)
    assert old.keys() == new.keys()
    changed = {name for name in old if old[name] != new[name]}
    on_worker_1 = {name for name in old if name.startswith("worker-1-")}
    assert changed == on_worker_1, sorted(changed ^ on_worker_1)
    assert "worker-1-replaced-uuid" in new["worker-1-kubelet"]["create"]
    assert new["worker-1-upload-node"]["triggers"] == ["worker-1-replaced-uuid"]
    assert "worker-1-replaced-uuid" in new["worker-1-unpack-node"]["create"]


@pytest.mark.parametrize(("setting", "value", "expected"), [
    ("kubelet", {"max_pods": 60}, {"worker-1-kubelet": "maxPods: 60", "worker-2-kubelet": "maxPods: 60"}),
    ("apiserver", {"service_node_port_range": "31000-31999"},
     {"master-1-kube-apiserver": "--service-node-port-range=31000-31999"}),
    # The API server's etcd checks wait out an election, so they follow etcd's timing too.
    ("etcd", {"heartbeat_interval_ms": 300, "election_timeout_ms": 3000},
     {"master-1-etcd": "--election-timeout=3000", "master-1-kube-apiserver": "--etcd-readycheck-timeout=3s"}),
])
def test_a_setting_changes_exactly_the_steps_it_belongs_to(module_cache, setting, value, expected):
    """The graph half of the pull-request diff contract (the e2e checks it on the real engine):
    one setting, one changed step per node that runs it, the new value as a line in it."""
    raw = base_config(module_cache, "libvirt")
    before = run_program(raw)
    after = run_program({**raw, setting: value})

    old, new = step_inputs(before), step_inputs(after)
    assert old.keys() == new.keys()
    assert {name for name in old if old[name] != new[name]} == set(expected)
    for name, line in expected.items():
        assert line in new[name]["create"] and line not in old[name]["create"]


K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl")


def test_a_kubernetes_patch_version_changes_its_binaries_uploads_and_installs_only(module_cache):
    """The diff contract's version row: a new patch release changes the uploads of the binaries
    it replaces and the steps that install them; etcd, containerd, flannel and every config stay."""
    raw = base_config(module_cache, "libvirt")
    before = run_program(raw)
    versions = {**load_versions()["node"], "kubernetes": "1.36.5"}
    bundle = make_bundle(module_cache / "bundles" / bundle_key(versions), versions)
    for b in K8S_BINARIES:  # a new release: new bytes, new checksums
        (bundle / "bin" / b).write_bytes(f"{b} v1.36.5\n".encode())
    (bundle / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(bundle)}\n"
        for f in sorted(bundle.rglob("*")) if f.is_file() and f.name not in ("SHA256SUMS", "versions.json")))
    after = run_program({**raw, "versions": {"kubernetes": "1.36.5"}})

    old, new = step_inputs(before), step_inputs(after)
    assert old.keys() == new.keys()
    changed = {name for name in old if old[name] != new[name]}
    creates = {name: unwrap(i["create"]) for name, i in old.items() if "create" in i}
    want = diff_contract.patch_updates({f"bin/{b}" for b in K8S_BINARIES}, creates, {name: [] for name in old})
    assert {"master-1-upload-kubernetes", "master-1-unpack-kubernetes", "worker-1-upload-node", "worker-1-kubelet",
            "master-1-kube-apiserver"} <= want.keys()
    assert changed == set(want), sorted(changed ^ set(want))
    # etcd's own archive, the runtime's and flannel's steps, every config: untouched
    assert not any("etcd" in name or "containerd" in name or "flanneld" in name for name in changed)


def test_exports_present(lab):
    out = lab.stack_outputs
    assert out["apiserverUrl"] == "https://10.240.0.11:6443"
    assert "client-key-data" in out["kubeconfig"]
    assert [n["name"] for n in out["nodes"]] == ["master-1", "worker-1", "worker-2"]
    assert {n["role"] for n in out["nodes"]} == {"master", "worker"}


def is_secret(value) -> bool:
    return isinstance(value, dict) and SECRET_SIG in value


def test_private_keys_and_kubeconfigs_flow_only_into_secret_inputs(lab):
    steps_with_keys = [r for r in lab.find(CMD) if "stdin" in r.inputs]
    assert len(steps_with_keys) >= 10
    for r in steps_with_keys:
        assert is_secret(r.inputs["stdin"]), f"{r.name} stdin is not secret"
    for r in lab.find(CMD):
        create = json.dumps(r.inputs["create"])
        assert "PRIVATE KEY" not in create, f"{r.name} has a private key on its command line"
        assert "client-key-data" not in create
        assert is_secret(r.inputs["connection"]), "the SSH private key rides in the connection"
    for r in lab.find("libvirt:index/cloudInitDisk:CloudInitDisk"):
        assert is_secret(r.inputs["userData"]), "user data carries the SSH host private key"


def test_a_kubelet_flag_lives_only_in_that_nodes_kubelet_step(lab):
    holders = sorted(r.name for r in lab.registrations if "--config=/var/lib/kubelet/config.yaml" in json.dumps(r.inputs))
    assert holders == ["worker-1-kubelet", "worker-2-kubelet"]


def test_digitalocean_graph(config_for):
    g = run_program(config_for("digitalocean"))
    counts = collections.Counter(r.type for r in g.registrations)
    assert counts["digitalocean:index/droplet:Droplet"] == 3
    assert counts["digitalocean:index/vpc:Vpc"] == 1
    assert counts["digitalocean:index/firewall:Firewall"] == 1
    assert counts["digitalocean:index/project:Project"] == 1
    assert steps_of(g, "worker-1") == WORKER_STEPS | {"metadata-block"}


def test_static_graph_tears_down_on_destroy(config_for):
    g = run_program(config_for("static"))
    assert not g.find("libvirt:index/domain:Domain")
    kubelet = g.one("svr002-kubelet")
    assert "systemctl stop kubelet 2>/dev/null || true\nsystemctl disable kubelet" in kubelet.inputs["delete"]
    assert kubelet.inputs["connection"]["value"]["host"] == "192.168.50.12"


def test_static_hosts_without_host_key_are_warned_about(config_for):
    from unittest import mock

    raw = config_for("static")
    raw["static"]["hosts"][0]["host_key"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinnedKeyForSvr001xxxxxxxxxxxxxxxxxxxxx"
    with mock.patch("pulumi.log.warn") as warn:
        run_program(raw)
    said = [c.args[0] for c in warn.call_args_list]
    assert [m for m in said if "svr002" in m and "ssh-keyscan -t ed25519 192.168.50.12" in m]
    assert [m for m in said if "svr003" in m and "no host_key" in m]
    assert not [m for m in said if "svr001" in m]  # pinned: nothing to say


def test_a_binary_no_archive_carries_is_refused_with_the_node_and_step(module_cache, monkeypatch):
    """node_archives and the steps name the same binaries twice; a drift is a clear error at
    preview (which node, which step, which file), not a step that fails on the node."""
    from components import binaries

    real = binaries.node_archives

    def without_kubelet(cfg, node):
        return {a: tuple(r for r in rels if r != "bin/kubelet") for a, rels in real(cfg, node).items()}

    monkeypatch.setattr(binaries, "node_archives", without_kubelet)
    with pytest.raises(Exception, match=r"worker-1: step kubelet installs bin/kubelet, which no archive of this node carries"):
        run_program(base_config(module_cache, "libvirt"))


def test_archives_carry_exactly_what_the_node_installs(lab):
    """No binary travels to a node that does not install it (no kubelet or containerd on a
    dedicated master, no control plane on a worker)."""
    for node in ("master-1", "worker-1"):
        carried = {line.split()[-1] for r in lab.find(CMD) if r.name.startswith(f"{node}-unpack-")
                   for line in unwrap(r.inputs["create"]).splitlines() if re.fullmatch(r"[0-9a-f]{64}  \S+", line)}
        installed = {m.group(1) for r in lab.find(CMD) if r.name.startswith(f"{node}-")
                     for m in re.finditer(r"^install_bin (\S+) [0-9a-f]{64} ", unwrap(r.inputs["create"]), re.M)}
        assert carried == installed, (node, sorted(carried ^ installed))
