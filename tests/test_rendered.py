"""What ships to the nodes, taken from the registered commands themselves, checked by real tools.

Units pass ``systemd-analyze verify``; kubeconfigs load in a real ``kubectl``; YAML, TOML and
JSON parse; every remote script passes ``bash -n``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import base_config
from tests.mockrun import Graph, run_program

CMD = "command:remote:Command"
PUT = re.compile(r"^put (\d{4}) (\S+) <<'KUBELAB_EOF'\n(.*?)^KUBELAB_EOF$", re.M | re.S)
SECRET_INSTALL = re.compile(r'^install -D -m (\d{4}) -o root -g root "\$secrets/(\d+)" (\S+)$', re.M)
MANIFEST = re.compile(r"<<'KUBELAB_MANIFEST'\n(.*?)^KUBELAB_MANIFEST$", re.M | re.S)


def unwrap(create: str) -> str:
    """The script inside the ``bash -c "$(cat <<'KUBELAB_SCRIPT' ...)"`` wrapper."""
    m = re.search(r"<<'KUBELAB_SCRIPT'\n(.*)\nKUBELAB_SCRIPT\n\)\"$", create, re.S)
    return m.group(1) if m else create


def shipped_files(g: Graph) -> dict[str, dict[str, str]]:
    """node -> {path: content} for every file any step writes (plain and secret)."""
    out: dict[str, dict[str, str]] = {}
    for r in g.find(CMD):
        script = unwrap(r.inputs["create"])
        node = re.search(r"^KUBELAB_NODE=(\S+)$|wait until (\S+) has finished booting", script, re.M).group(1, 2)
        files = out.setdefault(node[0] or node[1], {})
        for _mode, path, content in PUT.findall(script):
            files[path] = content
        if "stdin" in r.inputs:
            payload = base64.b64decode(r.inputs["stdin"]["value"])
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(payload))) as tar:
                members = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
            for _mode, idx, path in SECRET_INSTALL.findall(script):
                files[path] = members[idx]
    return out


@pytest.fixture(scope="module")
def lab_files(module_cache) -> tuple[Graph, dict[str, dict[str, str]]]:
    raw = base_config(module_cache, "libvirt")
    raw["registry_mirrors"] = {"docker.io": ["http://10.240.0.11:5000"]}
    raw["addons"] = {"dashboard": True}
    g = run_program(raw)
    return g, shipped_files(g)


def test_each_node_gets_its_units(lab_files):
    _, files = lab_files
    units = {node: sorted(Path(p).name for p in f if p.endswith(".service")) for node, f in files.items()}
    # kube-proxy on the master too (Services reachable from the control plane), but no kubelet
    assert units["master-1"] == ["etcd-backup.service", "etcd.service", "flanneld.service", "kube-apiserver.service",
                                 "kube-controller-manager.service", "kube-proxy.service", "kube-scheduler.service",
                                 "kubelab-registry.service"]
    for w in ("worker-1", "worker-2"):
        assert units[w] == ["containerd.service", "flanneld.service", "kube-proxy.service", "kubelab-apiserver-lb.service",
                            "kubelet.service"]


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory) -> Path:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: `make test` installs Debian's systemd package")
    root = tmp_path_factory.mktemp("sysroot")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    return root


def test_units_pass_systemd_analyze_verify(lab_files, systemd_root):
    _, files = lab_files
    verify_units(files, systemd_root)


def verify_units(files: dict[str, dict[str, str]], systemd_root: Path) -> None:
    """Every rendered unit of every node passes a real ``systemd-analyze verify``."""
    import tempfile

    for node, node_files in files.items():
        root = Path(tempfile.mkdtemp(dir=systemd_root.parent, prefix=f"{node}-"))
        shutil.copytree(systemd_root, root, symlinks=True, dirs_exist_ok=True)
        units = []
        for path, content in node_files.items():
            if path.endswith((".service", ".timer")):
                dest = root / path.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(content)
                units.append(path)
                for exe in re.findall(r"^ExecStart(?:Pre)?=-?(/\S+)", content, re.M):
                    stub = root / exe.lstrip("/")
                    stub.parent.mkdir(parents=True, exist_ok=True)
                    stub.write_text("#!/bin/sh\n")
                    stub.chmod(0o755)
        # --man=no: a `man:` Documentation= page lives on the node, not on the test host (a
        # fresh host without man-db failed here with "Command 'man iptables(8)' failed").
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{node}: {proc.stderr}"


def test_digitalocean_pods_cannot_reach_the_metadata_service(module_cache, systemd_root):
    """Droplet user_data holds the SSH host key and is served at 169.254.169.254: every
    DigitalOcean node that runs pods drops pod traffic to it before containerd starts."""
    g = run_program(base_config(module_cache, "digitalocean"))
    files = shipped_files(g)
    for node in ("worker-1", "worker-2"):
        unit = files[node]["/etc/systemd/system/kubelab-metadata-block.service"]
        assert "-t raw -I PREROUTING -s 10.200.0.0/16 -d 169.254.169.254/32 -j DROP" in unit
        assert re.search(r"^Before=.*containerd\.service.*kubelet\.service", unit, re.M)
        block, containerd = g.one(f"{node}-metadata-block"), g.one(f"{node}-containerd")
        assert g.depends_on(containerd, block)
    assert "/etc/systemd/system/kubelab-metadata-block.service" not in files["master-1"]  # runs no pods
    verify_units({n: f for n, f in files.items() if n != "master-1"}, systemd_root)
    lab = shipped_files(run_program(base_config(module_cache, "libvirt")))
    assert not [n for n, f in lab.items() if "/etc/systemd/system/kubelab-metadata-block.service" in f]


def test_units_restart_on_failure_and_order_explicitly(lab_files):
    _, files = lab_files
    for node_files in files.values():
        for path, content in node_files.items():
            if path.endswith(".service") and "Type=oneshot" not in content:  # a timer's job runs and ends
                assert "Restart=on-failure" in content, path
                assert re.search(r"^After=", content, re.M), path
                assert "WantedBy=multi-user.target" in content, path
                wd = re.search(r"^WorkingDirectory=(\S+)", content, re.M)
                if wd:  # seed 001: a WorkingDirectory that does not exist kills the unit
                    assert any(wd.group(1) in s for s in _all_scripts(lab_files)), wd.group(1)


def _all_scripts(lab_files) -> list[str]:
    g, _ = lab_files
    return [unwrap(r.inputs["create"]) for r in g.find(CMD)]


def test_tls_everywhere_flags(lab_files):
    _, files = lab_files
    api = files["master-1"]["/etc/systemd/system/kube-apiserver.service"]
    for flag in ("--anonymous-auth=false", "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction,PodSecurity",
                 "--etcd-certfile=", "--kubelet-certificate-authority=", "--encryption-provider-config=", "--etcd-servers=https://"):
        assert flag in api, flag
    assert "--insecure-port" not in api
    etcd = files["master-1"]["/etc/systemd/system/etcd.service"]
    assert "--client-cert-auth=true" in etcd and "--peer-client-cert-auth=true" in etcd
    assert "http://" not in etcd.replace("http://127.0.0.1:2381", "")
    kubelet = yaml.safe_load(files["worker-1"]["/var/lib/kubelet/config.yaml"])
    assert kubelet["authentication"]["anonymous"]["enabled"] is False
    assert kubelet["authentication"]["webhook"]["enabled"] is True
    assert kubelet["authorization"]["mode"] == "Webhook"
    assert kubelet["readOnlyPort"] == 0


def test_apiserver_audit_log_and_pod_security_defaults(lab_files):
    """An audit log that records who did what but never a body (so never a Secret's data), with
    rotation; Pod Security admission: baseline enforced, restricted warned, cluster-wide."""
    _, files = lab_files
    master = files["master-1"]
    api = master["/etc/systemd/system/kube-apiserver.service"]
    for flag in ("--audit-policy-file=/etc/kubernetes/audit-policy.yaml", "--audit-log-path=/var/log/kubernetes/audit.log",
                 "--audit-log-maxage=30", "--audit-log-maxbackup=10", "--audit-log-maxsize=100",
                 "--admission-control-config-file=/etc/kubernetes/admission-config.yaml"):
        assert flag in api, flag
    policy = yaml.safe_load(master["/etc/kubernetes/audit-policy.yaml"])
    assert policy["kind"] == "Policy"
    assert {rule["level"] for rule in policy["rules"]} <= {"None", "Metadata"}  # no Request/RequestResponse: no bodies
    assert policy["rules"][-1] == {"level": "Metadata"}  # everything else is recorded
    secrets_rule = next(r for r in policy["rules"] if any("secrets" in g.get("resources", []) for g in r.get("resources", [])))
    assert secrets_rule["level"] == "Metadata"
    admission = yaml.safe_load(master["/etc/kubernetes/admission-config.yaml"])
    ps = admission["plugins"][0]["configuration"]
    assert admission["plugins"][0]["name"] == "PodSecurity"
    assert (ps["defaults"]["enforce"], ps["defaults"]["warn"], ps["defaults"]["audit"]) == ("baseline", "restricted", "restricted")
    assert ps["exemptions"]["namespaces"] == ["kube-system"]


def test_pod_security_levels_follow_the_config(module_cache):
    raw = base_config(module_cache, "libvirt")
    raw["pod_security"] = {"enforce": "restricted", "warn": "restricted", "exempt_namespaces": ["kube-system", "monitoring"]}
    files = shipped_files(run_program(raw))
    ps = yaml.safe_load(files["master-1"]["/etc/kubernetes/admission-config.yaml"])["plugins"][0]["configuration"]
    assert ps["defaults"]["enforce"] == "restricted"
    assert ps["exemptions"]["namespaces"] == ["kube-system", "monitoring"]


def test_apiserver_etcd_checks_wait_out_an_election(lab_files, module_cache):
    """etcd's defaults keep the API server's own 2 s checks; the lab's slow Raft timing gives
    them an election timeout (rounded up), so /readyz does not fail on every master at once."""
    api = lab_files[1]["master-1"]["/etc/systemd/system/kube-apiserver.service"]
    assert "--etcd-healthcheck-timeout=2s" in api and "--etcd-readycheck-timeout=2s" in api
    raw = base_config(module_cache, "libvirt")
    raw["etcd"] = {"heartbeat_interval_ms": 500, "election_timeout_ms": 4500}
    api = shipped_files(run_program(raw))["master-1"]["/etc/systemd/system/kube-apiserver.service"]
    assert "--etcd-healthcheck-timeout=5s" in api and "--etcd-readycheck-timeout=5s" in api



@pytest.mark.parametrize("reads, leads", [
    (["master-1_old 2026-12-07T23:11:40.100000Z", "master-1_old 2026-12-07T23:11:40.100000Z"], False),  # stopped: renews nothing
    (["master-1_old 2026-12-07T23:11:40.100000Z", "master-1_new 2026-12-07T23:12:50.200000Z"], False),  # taking over: ask again
    (["master-1_new 2026-12-07T23:12:50.200000Z", "master-1_new 2026-12-07T23:12:55.300000Z"], True),
    (["master-2_x 2026-12-07T23:12:50.200000Z", "master-2_x 2026-12-07T23:12:55.300000Z"], True),  # another master leads
    ([None, None], False),  # no lease yet (or the API does not answer)
])
def test_controllers_step_waits_until_an_instance_leads(lab_files, tmp_path, reads, leads):
    """The controller-manager and scheduler steps go on only when a live instance holds their
    leader lease (its renewTime moves under the same holder), not the one the step stopped."""
    g, _ = lab_files
    scripts = {r.name: unwrap(r.inputs["create"]) for r in g.find(CMD)}
    for step, lease in (("master-1-kube-controller-manager", "kube-controller-manager"), ("master-1-kube-scheduler", "kube-scheduler")):
        script = scripts[step]
        assert re.search(rf"^retry \d+ \d+ leads {lease}$", script, re.M), step
        assert script.index("start_units") < script.index(f"leads {lease}\n")
        functions = script[script.index("lease_holder() {"):script.index("\n}\n", script.index("leads() {")) + 3]
        fake = tmp_path / step
        fake.mkdir()
        n = fake / "n"
        answers = "\n".join(f'{i}) {"echo -n " + repr(r) if r else "exit 1"} ;;' for i, r in enumerate(reads, 1))
        (fake / "kubectl").write_text(f'#!/bin/bash\n[[ " $* " == *" get lease {lease} "* ]] || exit 2\n'
                                      f'c=$(( $(cat {n} 2>/dev/null || echo 0) + 1 )); echo $c >{n}\ncase $c in\n{answers}\nesac\n')
        (fake / "sleep").write_text("#!/bin/sh\nexit 0\n")
        for f in ("kubectl", "sleep"):
            (fake / f).chmod(0o755)
        proc = subprocess.run(["bash", "-c", functions.replace("/usr/local/bin/kubectl", str(fake / "kubectl")) + f"\nleads {lease}"],
                              capture_output=True, text=True, check=False, timeout=30,
                              env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
        assert (proc.returncode == 0) is leads, (step, reads, proc.stdout, proc.stderr)

def test_cgroup_driver_matches_between_kubelet_and_containerd(lab_files):
    _, files = lab_files
    kubelet = yaml.safe_load(files["worker-1"]["/var/lib/kubelet/config.yaml"])
    containerd = tomllib.loads(files["worker-1"]["/etc/containerd/config.toml"])
    runc = containerd["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["runc"]["options"]
    assert kubelet["cgroupDriver"] == "systemd" and runc["SystemdCgroup"] is True
    images = containerd["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == "registry.k8s.io/pause:3.10.1"
    assert images["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_registry_mirror_is_an_explicit_insecure_http_host(lab_files):
    _, files = lab_files
    hosts = tomllib.loads(files["worker-1"]["/etc/containerd/certs.d/docker.io/hosts.toml"])
    assert hosts["server"] == "https://registry-1.docker.io"
    assert "http://10.240.0.11:5000" in hosts["host"]


def test_yaml_json_toml_parse(lab_files):
    _, files = lab_files
    count = 0
    for node_files in files.values():
        for path, content in node_files.items():
            if path.endswith((".yaml", "kubeconfig")):
                list(yaml.safe_load_all(content))
            elif path.endswith((".json", ".conflist")):
                json.loads(content)
            elif path.endswith(".toml"):
                tomllib.loads(content)
            else:
                continue
            count += 1
    assert count >= 15
    flannel = json.loads(files["worker-1"]["/etc/cni/net.d/10-flannel.conflist"])
    assert [p["type"] for p in flannel["plugins"]] == ["flannel", "portmap"]


def test_addon_manifests_parse(lab_files):
    g, _ = lab_files
    kinds = []
    for r in g.find(CMD):
        for manifest in MANIFEST.findall(unwrap(r.inputs["create"])):
            kinds += [d["kind"] for d in yaml.safe_load_all(manifest) if d]
    assert {"ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ConfigMap", "Namespace"} <= set(kinds)
    assert kinds.count("Deployment") == 3  # coredns, dashboard, metrics-scraper


def real_kubectl() -> str | None:
    cache = Path(os.environ.get("KUBELAB_REAL_CACHE", Path.home() / ".cache/kubelab"))
    for candidate in sorted(cache.glob("bundles/*/bin/kubectl")):
        return str(candidate)
    return shutil.which("kubectl")


def test_kubeconfigs_load_in_real_kubectl(lab_files, tmp_path):
    kubectl = real_kubectl()
    if not kubectl:
        pytest.skip("no kubectl on this machine (make tools builds one into the bundle)")
    _, files = lab_files
    checked = 0
    for node, node_files in files.items():
        for path, content in node_files.items():
            if path.endswith("kubeconfig"):
                f = tmp_path / f"{node}-{Path(path).name}"
                f.write_text(content)
                proc = subprocess.run([kubectl, "config", "view", "--kubeconfig", str(f), "--raw", "-o", "json"],
                                      capture_output=True, text=True, check=False)
                assert proc.returncode == 0, f"{node}:{path}: {proc.stderr}"
                cfg = json.loads(proc.stdout)
                assert cfg["users"][0]["user"]["client-key-data"]
                assert cfg["clusters"][0]["cluster"]["server"].startswith("https://")
                if Path(path).parent.name in ("kubelet", "kube-proxy"):
                    # a master's own API server, or the node's load balancer in front of all of them
                    assert cfg["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443", f"{node}:{path}"
                checked += 1
    assert checked >= 6


def test_remote_scripts_are_valid_bash_and_fail_loudly(lab_files):
    g, _ = lab_files
    for r in g.find(CMD):
        script = unwrap(r.inputs["create"])
        assert "set -Eeuo pipefail" in script, r.name  # -E: the ERR trap also fires inside functions
        proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{r.name}: {proc.stderr}"
        for side in ("update", "delete"):
            if r.inputs.get(side):
                proc = subprocess.run(["bash", "-n"], input=unwrap(r.inputs[side]), capture_output=True, text=True, check=False)
                assert proc.returncode == 0, f"{r.name} {side}: {proc.stderr}"


def test_teardown_never_kills_its_own_shell(module_cache):
    """``pkill -f`` matches full command lines, the teardown script's own included: every
    pattern must be anchored to the binary's path (found when a replayed teardown killed itself)."""
    g = run_program(base_config(module_cache, "static"))
    pkills = [(r.name, line) for r in g.find(CMD) for line in unwrap(r.inputs.get("delete") or "").splitlines()
              if "pkill -f" in line]
    assert pkills, "the static teardown stops leftover containerd shims"
    for name, line in pkills:
        assert re.search(r"pkill -f '\^/", line), f"{name}: unanchored {line!r}"
        script = subprocess.run(["bash", "-n"], input=line, capture_output=True, text=True, check=False)
        assert script.returncode == 0, script.stderr


def test_a_unit_that_will_not_start_reports_node_step_and_journal(tmp_path):
    """A failure inside a shell function (``start_units``) still names the node and the step and
    prints the unit's status and journal tail: real bash, a fake ``systemctl``/``journalctl``."""
    from components.render import render

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text('#!/bin/sh\n[ "$1" = restart ] && { echo "Job for $2.service failed" >&2; exit 1; }\n'
                                    '[ "$1" = status ] && echo "STATUS-OF-$4"\nexit 0\n')
    (fake / "journalctl").write_text('#!/bin/sh\necho "JOURNAL-TAIL-OF-$2: kubelet: unknown flag --bogus"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    script = render("scripts/install-service.sh.j2", node="worker-1", machine_id="uuid-1", step="kubelet", units=["kubelet"], files=[],
                    secret_files=[], binaries=[], images=[], dirs=[], checks=[])
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                               "KUBELAB_SYSTEMD_LOCK": str(tmp_path / "systemd.lock")})
    assert proc.returncode != 0
    assert "kubelab: step 'kubelet' failed on node 'worker-1'" in proc.stderr
    assert "----- journalctl -u kubelet -n 50 (node worker-1) -----" in proc.stderr
    assert "JOURNAL-TAIL-OF-kubelet: kubelet: unknown flag --bogus" in proc.stderr
    assert "STATUS-OF-kubelet" in proc.stderr


def test_a_systemctl_call_that_times_out_on_a_busy_node_is_asked_again(tmp_path):
    """PID 1 of a loaded TCG guest once took longer than D-Bus's 25 s default and a CI run failed
    on ``Failed to enable unit: Connection timed out``. Under real bash with a fake ``systemctl``
    that times out once: the call is repeated and the step completes; units are enabled and the
    daemon reloaded once per step (reloads stall PID 1), then each unit restarted."""
    from components.render import render

    fake, log, state = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "timed-out-once"
    fake.mkdir()
    (fake / "systemctl").write_text(
        f'#!/bin/sh\necho "$* bus=$SYSTEMD_BUS_TIMEOUT" >>{log}\n'
        f'if [ "$1" = enable ] && [ ! -e {state} ]; then touch {state}; '
        'echo "Failed to enable unit: Connection timed out" >&2; exit 1; fi\nexit 0\n')
    (fake / "systemctl").chmod(0o755)
    script = render("scripts/install-service.sh.j2", node="worker-1", machine_id="uuid-1", step="kube-proxy",
                    units=["kubelet", "kube-proxy"], files=[], secret_files=[], binaries=[], images=[], dirs=[], checks=[])
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                               "KUBELAB_SYSTEMD_LOCK": str(tmp_path / "systemd.lock")})
    assert proc.returncode == 0, proc.stderr
    assert "kubelab: systemctl enable --quiet --no-reload kubelet kube-proxy timed out on node 'worker-1' (try 1 of 3)" in proc.stderr
    assert "kubelab: step 'kube-proxy' done on node 'worker-1'" in proc.stdout
    assert log.read_text().splitlines() == [
        "enable --quiet --no-reload kubelet kube-proxy bus=300",
        "enable --quiet --no-reload kubelet kube-proxy bus=300",
        "daemon-reload bus=300",
        "restart kubelet bus=300",
        "restart kube-proxy bus=300",
    ]


def without_xz(tmp_path: Path) -> str:
    """A PATH with every host tool but xz: a node like the lab image, which unpacks with python3."""
    nox = tmp_path / "no-xz-bin"
    nox.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for tool in Path(d).iterdir() if Path(d).is_dir() else ():
            if tool.name not in ("xz", "unxz", "xzcat") and not (nox / tool.name).exists():
                (nox / tool.name).symlink_to(tool)
    return str(nox)


@pytest.mark.parametrize("unxz", ["xz", "python3"])
def test_archives_unpack_on_the_node_and_binaries_install_only_after_their_sha256_checks(tmp_path, module_cache, unxz):
    """Real bash, real tar, real xz (or python3's lzma where a node has no xz): the archive a
    CopyToRemote delivers is checked, unpacked and every member checked against the bundle's
    sha256 and its record written; ``install_bin`` installs only a file recorded with the
    checksum it expects; re-runs change nothing; a tampered archive or an unexpected checksum
    fails loudly and installs nothing."""
    from components.binaries import LocalFile, sha256_file, xz_archive
    from components.render import render

    members = []
    for rel in ("bin/kubelet", "bin/kube-proxy"):
        f = tmp_path / "bundle" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(f"\x7fELF pretend {rel} ".encode() * 5000)
        members.append((rel, LocalFile(f, sha256_file(f))))
    archive = xz_archive(members)
    assert archive.name.endswith(".tar.xz") and archive.stat().st_size < 2 * 5000 * 30 / 20
    assert xz_archive(list(members)) == archive  # content-addressed, made once
    stage, dest = tmp_path / "stage", tmp_path / "root/usr/local/bin/kubelet"
    (stage / "bin").mkdir(parents=True)
    shutil.copy(archive, stage / "node.tar.xz")  # what the upload puts on the node
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    (fake / "systemctl").chmod(0o755)
    path = f"{fake}:{os.environ['PATH'] if unxz == 'xz' else without_xz(tmp_path)}"

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        script = script.replace("STAGE=/var/lib/kubelab/stage", f"STAGE={stage}")
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, timeout=60,
                              env={**os.environ, "PATH": path, "KUBELAB_SYSTEMD_LOCK": str(tmp_path / "lock")})

    def unpack(sha: str) -> subprocess.CompletedProcess[str]:
        return bash(render("scripts/unpack-archive.sh.j2", node="worker-1", machine_id="uuid-1", step="unpack-node",
                           units=[], files=[], secret_files=[], images=[], dirs=[], checks=[], binaries=[],
                           archive="node", sha256=sha, members=[{"name": r, "sha256": f.sha256} for r, f in members]))

    def install(sha: str) -> subprocess.CompletedProcess[str]:
        return bash(render("scripts/install-service.sh.j2", node="worker-1", machine_id="uuid-1", step="kubelet",
                           units=[], files=[], secret_files=[], images=[], dirs=[], checks=[],
                           binaries=[{"name": "bin/kubelet", "sha256": sha, "dest": str(dest)}]))

    assert subprocess.run(["bash", "-c", "command -v xz"], env={"PATH": path}, capture_output=True).returncode == \
        (0 if unxz == "xz" else 1)
    first = unpack(sha256_file(archive))
    assert first.returncode == 0, first.stderr
    assert "2 files unpacked and checked" in first.stdout
    for rel, f in members:
        assert (stage / rel).read_bytes() == f.path.read_bytes()
        assert (stage / f"{rel}.sha256").read_text().strip() == f.sha256
    assert "already unpacked" in unpack(sha256_file(archive)).stdout  # a re-run does no work
    good = members[0][1].sha256
    assert install(good).returncode == 0 and dest.read_bytes() == members[0][1].path.read_bytes()
    mtime = dest.stat().st_mtime_ns
    assert install(good).returncode == 0 and dest.stat().st_mtime_ns == mtime  # idempotent
    dest.unlink()
    bad = install("0" * 64)
    assert bad.returncode != 0 and "sha256 mismatch" in bad.stderr and not dest.exists()
    (stage / "bin/kubelet.sha256").unlink()  # a file no unpack checked is never installed
    unchecked = install(good)
    assert unchecked.returncode != 0 and "was not unpacked" in unchecked.stderr and not dest.exists()
    (stage / "bin/kubelet").unlink()
    (stage / "node.tar.xz").write_bytes(archive.read_bytes()[:-100] + b"\0" * 100)
    tampered = unpack(sha256_file(archive))
    assert tampered.returncode != 0 and "is not the archive that was uploaded" in tampered.stderr
    assert not (stage / "bin/kubelet").exists() and not list(stage.glob(".unpack.*"))


def test_control_plane_reaches_services_and_metrics_server_tls_is_verified(lab_files):
    """Aggregator routing (the API server dials endpoints, not ClusterIPs) and kube-proxy on the
    master; metrics-server registered with the cluster CA pinned, verifying kubelets, its key
    only ever on stdin."""
    g, files = lab_files
    master = files["master-1"]
    assert "--enable-aggregator-routing=true" in master["/etc/systemd/system/kube-apiserver.service"]
    assert "/etc/systemd/system/kube-proxy.service" in master
    assert "/etc/systemd/system/kubelet.service" not in master  # still no pods on a dedicated master
    docs = list(yaml.safe_load_all(master["/etc/kubernetes/addons/metrics-server.yaml"]))
    api = next(d for d in docs if d["kind"] == "APIService")
    assert api["spec"]["service"] == {"name": "metrics-server", "namespace": "kube-system", "port": 443}
    assert "insecureSkipTLSVerify" not in api["spec"]
    assert "BEGIN CERTIFICATE" in base64.b64decode(api["spec"]["caBundle"]).decode()
    dep = next(d for d in docs if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--kubelet-certificate-authority=/etc/metrics-server/kubelet-ca/ca.crt" in args
    assert not [a for a in args if "insecure" in a]
    tls_secret = yaml.safe_load(master["/etc/kubernetes/addons/metrics-server-tls.yaml"])
    assert tls_secret["type"] == "kubernetes.io/tls" and tls_secret["data"]["tls.key"]
    step = g.one("master-1-addon-metrics-server")
    assert "PRIVATE KEY" not in step.inputs["create"]
    ready = g.one("master-1-cluster-ready").inputs["create"]
    assert "kubectl wait --for=condition=Available apiservice/v1beta1.metrics.k8s.io" in ready
    assert "kubectl -n kube-system wait --for=condition=Available deployment/metrics-server" in ready
    assert "kubectl -n kube-system rollout status" not in ready  # a slow first start passes the progress deadline
    # The lab pulls metrics-server's image from the private registry, which is seeded with it.
    assert "push images/metrics-server.tar" in g.one("master-1-registry").inputs["create"]


def test_metrics_server_off_uploads_no_image(module_cache):
    raw = base_config(module_cache, "libvirt")
    raw["addons"] = {"metrics_server": False}
    g = run_program(raw)
    assert not g.find("command:remote:Command", "master-1-addon-metrics-server")
    assert "metrics-server.tar" not in g.one("worker-1-containerd").inputs["create"]
    assert not [r for r in g.find("command:remote:CopyToRemote") if "metrics-server" in r.name]


def _backup_script(tmp_path: Path, keep: int, status_rc: int) -> tuple[str, Path, dict[str, str]]:
    """The rendered snapshot job with its etcd tools pointed at fakes (real bash runs it)."""
    from components.render import render

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "etcdctl").write_text('#!/bin/sh\n# ... snapshot save FILE\nfor a; do last=$a; done\necho "etcd data" >"$last"\n')
    (fake / "etcdutl").write_text(f'#!/bin/sh\necho "status of $3"\nexit {status_rc}\n')
    n = tmp_path / "n"
    (fake / "date").write_text(f'#!/bin/sh\nc=$(cat {n} 2>/dev/null || echo 0); c=$((c+1)); echo $c >{n}\n'
                               'printf "20261124T0000%02dZ\\n" "$c"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    backups = tmp_path / "backups"
    script = render("scripts/etcd-backup.sh.j2", name="master-1", backup_dir=str(backups), keep=keep)
    return script.replace("/usr/local/bin/", f"{fake}/"), backups, {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}


def test_etcd_backup_keeps_the_newest_and_never_keeps_an_unreadable_snapshot(tmp_path):
    script, backups, env = _backup_script(tmp_path, keep=2, status_rc=0)
    assert "set -Eeuo pipefail" in script
    for _ in range(4):
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=False, timeout=30)
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in backups.iterdir()) == ["etcd-master-1-20261124T000003Z.db", "etcd-master-1-20261124T000004Z.db"]
    bad, _, bad_env = _backup_script(tmp_path, keep=2, status_rc=1)
    proc = subprocess.run(["bash", "-c", bad], capture_output=True, text=True, env=bad_env, check=False, timeout=30)
    assert proc.returncode != 0  # the unit fails: `systemctl --failed` shows it
    assert sorted(p.name for p in backups.iterdir()) == ["etcd-master-1-20261124T000003Z.db", "etcd-master-1-20261124T000004Z.db"]


def test_etcd_restore_script_is_for_this_member_and_bumps_the_revision(module_cache):
    g = run_program(base_config(module_cache, "libvirt"))
    files = shipped_files(g)["master-1"]
    restore = files["/usr/local/lib/kubelab/etcd-restore.sh"]
    assert "set -Eeuo pipefail" in restore
    assert subprocess.run(["bash", "-n"], input=restore, capture_output=True, text=True, check=False).returncode == 0
    assert "--name master-1 --initial-cluster master-1=https://10.240.0.11:2380" in restore
    assert "--bump-revision 1000000000 --mark-compacted" in restore
    timer = files["/etc/systemd/system/etcd-backup.timer"]
    assert "OnUnitActiveSec=6h" in timer
    assert "ExecStart=/usr/local/lib/kubelab/etcd-backup.sh" in files["/etc/systemd/system/etcd-backup.service"]
