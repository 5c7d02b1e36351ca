"""The private registry: config, resource graph, rendered files, and the push script under real bash."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, parse_cluster_config
from components.images import ArchiveError, normalize, read_archive
from components.render import render
from tests.conftest import base_config, image_archive
from tests.mockrun import run_program
from tests.test_rendered import shipped_files, unwrap


@pytest.fixture(scope="module")
def lab(module_cache):
    raw = base_config(module_cache, "libvirt")
    archive = image_archive(module_cache / "app.tar", "team/app:1.0", layout=False)
    raw["registry"] = {"preload": [str(archive)], "mirror_for": ["registry.k8s.io", "docker.io", "quay.io"]}
    raw["registry_mirrors"] = {"quay.io": ["http://10.240.0.99:5000"]}
    g = run_program(raw)
    return g, shipped_files(g)


def test_registry_is_seeded_beside_the_control_plane_and_the_addons_wait_for_it(lab):
    """It needs only its own host and uploads, so it is off the control plane's path."""
    g, _ = lab
    registry = g.one("master-1-registry")
    assert g.depends_on(registry, g.one("master-1-wait-for-ssh"))
    for cp in ("master-1-etcd", "master-1-kube-apiserver", "master-1-kube-controller-manager"):
        assert not g.depends_on(registry, g.one(cp)), cp
    for addon in ("master-1-addon-coredns", "master-1-addon-metrics-server"):
        assert g.depends_on(g.one(addon), registry), addon
    assert g.stack_outputs["registryUrl"] == "https://10.240.0.11:5000"


def test_registry_is_seeded_with_the_bundle_images_and_the_users_archives(lab):
    g, files = lab
    script = unwrap(g.one("master-1-registry").inputs["create"])
    pushed = [line.split()[3] for line in script.splitlines() if line.startswith("push ")]
    assert pushed == ["registry.k8s.io/pause:3.10.1", "registry.k8s.io/coredns/coredns:v1.14.7",
                      "registry.k8s.io/metrics-server/metrics-server:v0.8.0", "docker.io/team/app:1.0"]
    assert "push images/coredns.tar" in script and " layout" in script and " tarball" in script
    master = files["master-1"]
    served = yaml.safe_load(master["/etc/kubelab/registry/config.yml"])
    assert served["http"]["addr"] == "10.240.0.11:5000"
    assert served["http"]["tls"]["certificate"] == "/etc/kubelab/registry/tls.crt"
    assert served["storage"]["maintenance"]["readonly"]["enabled"] is True  # nothing on the network writes
    writer = yaml.safe_load(master["/etc/kubelab/registry/writer.yml"])
    assert writer["http"]["addr"] == "127.0.0.1:5001" and "tls" not in writer["http"]
    assert writer["storage"]["maintenance"]["readonly"]["enabled"] is False
    assert "BEGIN CERTIFICATE" in master["/etc/kubelab/registry/tls.crt"]
    assert "PRIVATE KEY" not in g.one("master-1-registry").inputs["create"]  # the key travels on stdin


def test_every_node_pulls_through_the_registry_and_gets_no_image_archives(lab):
    g, files = lab
    for w in ("worker-1", "worker-2"):
        create = g.one(f"{w}-containerd").inputs["create"]
        assert "images import" not in create
        k8s = tomllib.loads(files[w]["/etc/containerd/certs.d/registry.k8s.io/hosts.toml"])
        assert k8s["server"] == "https://registry.k8s.io"
        assert k8s["host"]["https://10.240.0.11:5000/v2/registry.k8s.io"] == {
            "capabilities": ["pull", "resolve"], "override_path": True,
            "ca": "/etc/containerd/certs.d/kubelab-registry-ca.crt"}
        docker = tomllib.loads(files[w]["/etc/containerd/certs.d/docker.io/hosts.toml"])
        assert docker["server"] == "https://registry-1.docker.io"
        # the private registry first, then the user's own mirror
        quay = files[w]["/etc/containerd/certs.d/quay.io/hosts.toml"]
        assert quay.index("10.240.0.11:5000/v2/quay.io") < quay.index("10.240.0.99:5000")
        assert "BEGIN CERTIFICATE" in files[w]["/etc/containerd/certs.d/kubelab-registry-ca.crt"]


def test_without_the_registry_nodes_preload_their_images(module_cache):
    raw = base_config(module_cache, "libvirt")
    raw["registry"] = {"enabled": False}
    g = run_program(raw)
    assert not [r for r in g.find("command:remote:Command") if r.name.endswith("-registry")]
    assert "images import --local \"$STAGE/images/coredns.tar\"" in g.one("worker-1-containerd").inputs["create"]
    assert g.stack_outputs["registryUrl"] == ""


def test_insecure_registry_serves_http_and_nodes_trust_no_ca(module_cache):
    raw = base_config(module_cache, "libvirt")
    raw["registry"] = {"insecure": True}
    g = run_program(raw)
    files = shipped_files(g)
    assert g.stack_outputs["registryUrl"] == "http://10.240.0.11:5000"
    assert "tls" not in yaml.safe_load(files["master-1"]["/etc/kubelab/registry/config.yml"])["http"]
    hosts = tomllib.loads(files["worker-1"]["/etc/containerd/certs.d/registry.k8s.io/hosts.toml"])
    assert hosts["host"]["http://10.240.0.11:5000/v2/registry.k8s.io"].get("ca") is None
    assert "/etc/containerd/certs.d/kubelab-registry-ca.crt" not in files["worker-1"]


def test_registry_defaults_per_platform(config_for):
    assert parse_cluster_config(config_for("libvirt")).registry.enabled is True
    assert parse_cluster_config(config_for("digitalocean")).registry.enabled is False
    assert parse_cluster_config(config_for("static")).registry.enabled is False


@pytest.mark.parametrize(("setting", "fragments"), [
    ({"port": 6443}, ["registry.port: 6443", "kube-apiserver"]),
    ({"port": 31000}, ["registry.port: 31000 is inside apiserver.service_node_port_range"]),
    ({"mirror_for": ["https://quay.io"]}, ["registry.mirror_for: 'https://quay.io'", "no scheme"]),
    ({"preload": ["/nonexistent/app.tar"]}, ["registry.preload[0]: /nonexistent/app.tar does not exist", "docker save"]),
    ({"preload": [{"image": "x:1"}]}, ["registry.preload[0]: write a path"]),
    ({"enabled": False, "preload": ["/nonexistent/app.tar"]}, ["the registry is off"]),
    ({"tls": True}, ["registry.tls: unknown setting"]),
])
def test_registry_settings_refused(config_for, setting, fragments):
    raw = config_for("libvirt")
    raw["registry"] = setting
    with pytest.raises(ConfigError) as exc:
        parse_cluster_config(raw)
    for fragment in fragments:
        assert fragment in str(exc.value), str(exc.value)


def test_archives_name_their_image(tmp_path):
    assert read_archive(image_archive(tmp_path / "a.tar", "registry.k8s.io/pause:3.10.1")).image == "registry.k8s.io/pause:3.10.1"
    docker = read_archive(image_archive(tmp_path / "b.tar", "nginx:1.27", layout=False))
    assert (docker.image, docker.layout) == ("docker.io/library/nginx:1.27", False)
    assert read_archive(tmp_path / "b.tar", "registry.example/team/web:2").image == "registry.example/team/web:2"
    (tmp_path / "c.tar").write_bytes(b"not a tar")
    with pytest.raises(ArchiveError, match="cannot be read as an image archive"):
        read_archive(tmp_path / "c.tar")
    assert normalize("team/app") == "docker.io/team/app:latest"
    assert normalize("localhost:5000/app:1") == "localhost:5000/app:1"
    with pytest.raises(ArchiveError):
        normalize("Bad Ref")


def test_push_script_pushes_each_archive_once(tmp_path):
    """The real step body under bash, with fake systemctl/systemd-run/curl/crane: every archive
    is unpacked, checked and pushed through the loopback writer; a re-run pushes nothing."""
    import gzip
    import hashlib

    stage, data, fake = tmp_path / "stage", tmp_path / "registry", tmp_path / "bin"
    (stage / "images").mkdir(parents=True)
    fake.mkdir()
    archive = image_archive(tmp_path / "pause.tar", "registry.k8s.io/pause:3.10.1")
    (stage / "images/pause.tar.gz").write_bytes(gzip.compress(archive.read_bytes()))
    log = tmp_path / "crane.log"
    (fake / "crane").write_text(f'#!/bin/sh\necho "$@" >>{log}\n'
                                f'[ "$1" = digest ] && {{ grep -q "^push .* $3$" {log} || exit 1; }}\nexit 0\n')
    for tool in ("systemctl", "systemd-run", "curl", "journalctl"):
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    url = tmp_path / "url"
    url.write_text("https://10.240.0.11:5000")
    script = render("scripts/install-registry.sh.j2", node="master-1", machine_id="m1", step="registry",
                    units=["kubelab-registry"], files=[], secret_files=[], binaries=[], images=[], dirs=[], checks=[],
                    writer="127.0.0.1:5001", tls=True, directory=str(data),
                    pushes=[{"name": "images/pause.tar", "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                             "image": "registry.k8s.io/pause:3.10.1", "layout": True}])
    script = (script.replace("STAGE=/var/lib/kubelab/stage", f"STAGE={stage}")
              .replace("/usr/local/bin/crane", str(fake / "crane")).replace("/etc/kubelab/registry/url", str(url)))

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, timeout=60,
                              env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                                   "KUBELAB_SYSTEMD_LOCK": str(tmp_path / "systemd.lock")})

    first = run()
    assert first.returncode == 0, first.stderr
    assert "kubelab: pushed registry.k8s.io/pause:3.10.1" in first.stdout
    pushes = [line for line in log.read_text().splitlines() if line.startswith("push")]
    assert len(pushes) == 1 and pushes[0].endswith(" 127.0.0.1:5001/registry.k8s.io/pause:3.10.1")
    assert "--insecure" in pushes[0] and "layout." in pushes[0]  # an unpacked OCI layout dir
    assert not list(stage.glob("layout.*"))
    second = run()
    assert second.returncode == 0, second.stderr
    assert "already in the registry" in second.stdout
    assert len([line for line in log.read_text().splitlines() if line.startswith("push")]) == 1
    assert Path(data / "kubelab-pushed").is_dir()


def dashboard_docs(g) -> list[dict]:
    create = unwrap(g.one("master-1-addon-dashboard").inputs["create"])
    return [d for d in yaml.safe_load_all(create.split("<<'KUBELAB_MANIFEST'\n", 1)[1].split("\nKUBELAB_MANIFEST", 1)[0]) if d]


def test_dashboard_login_is_read_only_unless_chosen(module_cache):
    raw = base_config(module_cache, "libvirt")
    raw["addons"] = {"dashboard": True}
    docs = dashboard_docs(run_program(raw))
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == "kubelab-dashboard-login")
    assert binding["roleRef"]["name"] == "view"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubelab-dashboard-login", "namespace": "kubernetes-dashboard"}]
    raw["dashboard"] = {"access": "cluster-admin"}
    docs = dashboard_docs(run_program(raw))
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == "kubelab-dashboard-login")
    assert binding["roleRef"]["name"] == "cluster-admin"
    raw["dashboard"] = {"access": "admin"}
    with pytest.raises(ConfigError, match=r"dashboard\.access: 'admin' is not offered"):
        parse_cluster_config(raw)


def test_cluster_ready_waits_for_the_dashboard_only_when_its_images_are_provided(module_cache):
    from components.addons import dashboard_images_missing

    raw = base_config(module_cache, "libvirt")
    raw["addons"] = {"dashboard": True}
    cfg = parse_cluster_config(raw)
    assert dashboard_images_missing(cfg) == list(cfg.dashboard.images)
    ready = run_program(raw).one("master-1-cluster-ready").inputs["create"]
    assert "deployment/kubernetes-dashboard" not in ready and "deployment/coredns" in ready
    archives = [str(image_archive(module_cache / f"dash-{i}.tar", ref)) for i, ref in enumerate(cfg.dashboard.images)]
    raw["registry"] = {"preload": archives}
    assert dashboard_images_missing(parse_cluster_config(raw)) == []
    g = run_program(raw)
    assert "kubectl -n kubernetes-dashboard wait --for=condition=Available deployment/kubernetes-dashboard" in \
        g.one("master-1-cluster-ready").inputs["create"]
    assert "push preload/" in g.one("master-1-registry").inputs["create"]
