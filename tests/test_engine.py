"""The real Pulumi engine and providers, offline: previews of the libvirt and DigitalOcean
stacks, a bad config and a change the running cluster cannot take, each refused with
nothing planned (marker ``engine``)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import base_config, prepare_cache
from tests.pulumi_support import DIGITALOCEAN, REPO, STATIC, Project, planned, toolchain_bin

pytestmark = pytest.mark.engine

sys.path.insert(0, str(REPO / "lab"))


@pytest.fixture(scope="module")
def lab_daemons(tmp_path_factory):
    """A real libvirtd inside a network namespace of the test's own (stopped afterwards)."""
    toolchain_bin()
    from harness import Lab  # lab/harness.py

    state = tmp_path_factory.mktemp("lab") / "state.json"
    lab = Lab(state_file=state)
    lab.up()
    yield lab
    lab.down()


def count_by_type(steps: list[dict]) -> collections.Counter:
    return collections.Counter(s["type"] for s in steps)


def test_libvirt_preview_against_real_libvirtd(tmp_path, lab_daemons):
    cache = prepare_cache(tmp_path / "cache")
    cluster = base_config(cache, "libvirt")
    cluster["libvirt"]["network_name"] = "kubelab-engine-test"
    project = Project(tmp_path, "engine", cluster, prefix=lab_daemons.exec_prefix(), cache=cache)
    preview, _ = project.preview_json()
    steps = planned(preview)
    assert all(s["op"] == "create" for s in steps), steps
    types = count_by_type(steps)
    assert types["libvirt:index/domain:Domain"] == 3
    assert types["libvirt:index/volume:Volume"] == 4
    assert types["libvirt:index/cloudInitDisk:CloudInitDisk"] == 3
    assert types["libvirt:index/network:Network"] == 1
    # metrics-server, etcd backup client, registry, the node-local API load balancers' health check
    assert types["tls:index/locallySignedCert:LocallySignedCert"] == 21
    # 25 install steps (etcd-backup, registry) + a remove-node step per worker + an unpack step
    # per node archive (etcd and kubernetes on the master, node on each worker) + an
    # apiserver-lb step per worker + the rollout's drain and uncordon per worker
    assert types["command:remote:Command"] == 27 + 2 + 1 + 1 + 2 + 4
    # the node archives, and the three images the master's registry is seeded with (workers pull)
    assert types["command:remote:CopyToRemote"] == (2 + 3) + 1 + 1
    names = {s["name"] for s in steps}
    for node in ("master-1", "worker-1", "worker-2"):
        assert f"{node}-wait-for-ssh" in names
    assert {"worker-1-kubelet", "worker-2-kubelet", "master-1-kube-apiserver", "master-1-cluster-ready",
            "master-1-unpack-etcd", "master-1-unpack-kubernetes", "worker-1-unpack-node",
            "worker-1-apiserver-lb", "worker-2-apiserver-lb"} <= names
    assert "kubeconfig" in str(preview.get("outputs", preview))  # planned export


def test_digitalocean_preview_with_dummy_token_offline(tmp_path):
    cache = prepare_cache(tmp_path / "cache")
    project = Project(tmp_path, "do", base_config(cache, "digitalocean"),
                      secrets={"digitalocean:token": "dummy-token-not-real"}, cache=cache, providers=DIGITALOCEAN)
    preview, _ = project.preview_json()
    types = count_by_type(planned(preview))
    assert types["digitalocean:index/droplet:Droplet"] == 3
    assert types["digitalocean:index/vpc:Vpc"] == 1
    assert types["digitalocean:index/firewall:Firewall"] == 1
    assert types["digitalocean:index/tag:Tag"] == 3
    assert types["digitalocean:index/project:Project"] == 1
    assert types["command:remote:Command"] == 32 + 2 + 4  # as libvirt, plus a metadata-block step per worker


def test_static_hosts_preview_offline(tmp_path):
    """Existing hosts: nothing to create but the PKI and the remote steps (no SSH at preview)."""
    cache = prepare_cache(tmp_path / "cache")
    project = Project(tmp_path, "static", base_config(cache, "static"), cache=cache, providers=STATIC)
    preview, proc = project.preview_json()
    steps = planned(preview)
    assert all(s["op"] == "create" for s in steps), steps
    assert "static.hosts[svr002]: no host_key" in proc.stdout + proc.stderr  # trust on first use is said out loud
    types = count_by_type(steps)
    assert not [t for t in types if t.startswith(("libvirt:", "digitalocean:"))], types
    # with an unpack step per node archive, an apiserver-lb per worker, a drain and an uncordon per worker
    assert types["command:remote:Command"] == 26 + 4 + 2 + 4
    # with metrics-server serving, etcd backup client, the load balancers' health check
    assert types["tls:index/locallySignedCert:LocallySignedCert"] == 20
    names = {s["name"] for s in steps}
    assert {"svr001-wait-for-ssh", "svr001-etcd", "svr002-kubelet", "svr003-kubelet", "svr001-cluster-ready"} <= names


def test_bad_config_fails_preview_with_the_message_and_plans_nothing(tmp_path):
    cache = prepare_cache(tmp_path / "cache")
    cluster = base_config(cache, "digitalocean")
    cluster["masters"] = {"count": 0}
    cluster["network"] = {"pod_cidr": "10.32.0.0/16"}
    project = Project(tmp_path, "bad", cluster, secrets={"digitalocean:token": "dummy"}, cache=cache, providers=())
    preview, proc = project.preview_json(check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "invalid stack config (kubelab:cluster), nothing was created" in text
    assert "masters.count: a cluster needs at least one master" in text
    assert "network.service_cidr: 10.32.0.0/24 overlaps network.pod_cidr" in text
    assert "Traceback" not in text
    assert planned(preview) == []


def test_a_change_the_running_cluster_cannot_take_is_refused_at_preview(tmp_path):
    """The stack's last outputs say it runs one master (a state imported as a real ``up`` would
    leave it): a preview that asks for three is refused through the engine's own
    ``readStackOutputs``, with the setting and the way forward, and plans nothing."""
    cache = prepare_cache(tmp_path / "cache")
    cluster = base_config(cache, "digitalocean")
    project = Project(tmp_path, "running", cluster, secrets={"digitalocean:token": "dummy"}, cache=cache, providers=())
    outputs = {"nodes": [{"name": "master-1", "role": "master"}, {"name": "worker-1", "role": "worker"},
                         {"name": "worker-2", "role": "worker"}], "kubernetesVersion": "1.36.4"}
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 3, "deployment": {
        "manifest": {"time": "2026-11-24T00:00:00Z", "magic": "", "version": ""},
        "resources": [{"urn": "urn:pulumi:running::kubelab::pulumi:pulumi:Stack::kubelab-running", "custom": False,
                       "type": "pulumi:pulumi:Stack", "outputs": outputs}]}}))
    project.run("stack", "import", "--file", str(state), "--stack", "running")
    cluster["masters"] = {"count": 3}
    project.set_cluster(cluster)
    preview, proc = project.preview_json(check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    # Its last update predates the etcdMembers output: how its member started is not known.
    assert "masters: this stack runs 1 master(s) (master-1) and its last update predates the record" in text, text
    assert "Run `pulumi up` once with masters.count at 1" in text and "Traceback" not in text
    assert planned(preview) == []
    cluster["masters"] = {"count": 1}  # the same masters: the guard lets it through
    project.set_cluster(cluster)
    _, proc = project.preview_json(check=False)
    assert "masters: this stack runs" not in proc.stdout + proc.stderr


def test_secrets_are_encrypted_in_preview_state_inputs(tmp_path):
    """Private keys never show in a preview's JSON (the engine marks them secret)."""
    cache = prepare_cache(tmp_path / "cache")
    project = Project(tmp_path, "sec", base_config(cache, "digitalocean"),
                      secrets={"digitalocean:token": "dummy"}, cache=cache, providers=DIGITALOCEAN)
    proc = project.run("preview", "--json", "--show-secrets=false")
    assert "BEGIN OPENSSH PRIVATE KEY" not in proc.stdout  # the deploy key in connections
    assert "dummy" not in proc.stdout.replace('"dummy', "")  # the token


def test_pulumi_and_providers_report_pinned_versions():
    from components.versions import load_versions

    bindir = toolchain_bin(providers=())
    v = load_versions()
    out = subprocess.run([str(bindir / "pulumi"), "version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"v{v['pulumi']['cli']}"


def test_real_registry_serves_what_crane_pushed_and_containerd_pulls_through_it(tmp_path):
    """The bundle's real registry, crane and containerd on loopback, with the files kubelab
    renders: the writer takes a push of the bundle's CoreDNS archive; the read-only TLS registry
    serves it, refuses plain HTTP and a push; containerd pulls it by its upstream name through
    the rendered hosts.toml (override_path, the CA)."""
    import socket
    import tarfile
    import time

    from components.binaries import IMAGE_FILES
    from components.images import read_archive
    from components.render import render
    from components.versions import bundle_key, load_versions
    from tests.pulumi_support import REAL_CACHE

    sys.path.insert(0, str(REPO / "tools"))
    from bundle_build import scratch_containerd  # tools/bundle_build.py

    bundle = REAL_CACHE / "bundles" / bundle_key(load_versions()["node"])
    if not (bundle / "SHA256SUMS").exists():
        pytest.skip(f"NODE BUNDLE MISSING ({bundle}); run `make bundle`")
    assert "images/coredns.tar" in IMAGE_FILES

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, wport = free_port(), free_port()
    data, certs = tmp_path / "registry", tmp_path / "certs"
    data.mkdir()
    certs.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                    "-subj", "/CN=test-ca", "-keyout", str(certs / "ca.key"), "-out", str(certs / "ca.crt")],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                    "-subj", "/CN=kubelab-registry", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-CA", str(certs / "ca.crt"), "-CAkey", str(certs / "ca.key"),
                    "-keyout", str(certs / "tls.key"), "-out", str(certs / "tls.crt")], check=True, capture_output=True)
    ctx = {"version": load_versions()["node"]["distribution"], "directory": str(data)}
    served = render("config/registry.yml.j2", **ctx, listen=f"127.0.0.1:{port}", tls=True, writer=False)
    (tmp_path / "config.yml").write_text(served.replace("/etc/kubelab/registry/", f"{certs}/"))
    (tmp_path / "writer.yml").write_text(render("config/registry.yml.j2", **ctx, listen=f"127.0.0.1:{wport}", tls=False, writer=True))
    env = {**os.environ, "SSL_CERT_FILE": str(certs / "ca.crt")}
    crane, registry = str(bundle / "bin/crane"), str(bundle / "bin/registry")
    procs = []

    def serve(config: str, url: str) -> None:
        procs.append(subprocess.Popen([registry, "serve", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(100):
            if subprocess.run(["curl", "-sf", "--cacert", str(certs / "ca.crt"), "-o", "/dev/null", f"{url}/v2/"],
                              check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"registry {config} did not answer at {url}")

    try:
        archive = read_archive(bundle / "images/coredns.tar")
        layout = tmp_path / "layout"
        with tarfile.open(archive.path) as tar:
            tar.extractall(layout, filter="data")
        serve(str(tmp_path / "writer.yml"), f"http://127.0.0.1:{wport}")
        subprocess.run([crane, "push", "--insecure", str(layout), f"127.0.0.1:{wport}/{archive.image}"], check=True,
                       capture_output=True, env=env)
        procs.pop().terminate()  # the writer is gone once pushed, as on the node
        serve(str(tmp_path / "config.yml"), f"https://127.0.0.1:{port}")
        digest = subprocess.run([crane, "digest", f"127.0.0.1:{port}/{archive.image}"], check=True, capture_output=True,
                                text=True, env=env).stdout.strip()
        assert digest.startswith("sha256:")
        plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/v2/"],
                               capture_output=True, text=True, check=False).stdout
        assert plain != "200", "the read-only registry answered plain HTTP"
        refused = subprocess.run([crane, "push", str(layout), f"127.0.0.1:{port}/kubelab.local/intruder:1"],
                                 capture_output=True, text=True, check=False, env=env)
        assert refused.returncode != 0, "the read-only registry took a push"
        hosts = tmp_path / "certs.d/registry.k8s.io/hosts.toml"
        hosts.parent.mkdir(parents=True)
        hosts.write_text(render("config/hosts.toml.j2", registry="registry.k8s.io", upstream="https://registry.k8s.io",
                                own={"url": f"https://127.0.0.1:{port}/v2/registry.k8s.io", "ca": str(certs / "ca.crt")},
                                mirrors=[]))
        with scratch_containerd(bundle / "bin") as ctr:
            pulled = subprocess.run([*ctr, "images", "pull", "--hosts-dir", str(tmp_path / "certs.d"), archive.image],
                                    capture_output=True, text=True, check=False, timeout=300)
            assert pulled.returncode == 0, pulled.stdout + pulled.stderr
            assert archive.image in subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True).stdout
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
