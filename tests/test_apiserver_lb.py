"""The node-local API load balancer's rendered config under the real haproxy, on loopback.

Two stand-in API servers (TLS, client certificates required, ``/readyz`` like the real one)
sit behind the config kubelab renders for a worker. What is checked is what a node relies
on: TLS passes through to a server that answers ``/readyz`` (haproxy checks it with its own
client certificate, since anonymous auth is off), one that stops answering ready or goes away
gets no more connections, and one that comes back gets them again.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components.render import render

HAPROXY = "/usr/sbin/haproxy"


def _openssl(tmp: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)


def _leaf(tmp: Path, name: str, cn: str, ext: str) -> None:
    _openssl(tmp, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    (tmp / f"{name}.ext").write_text(ext + "\n")
    _openssl(tmp, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-out", f"{name}.crt", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lb-pki")
    _openssl(tmp, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kubernetes-ca", "-days", "1")
    _leaf(tmp, "server", "kube-apiserver", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _leaf(tmp, "client", "kubelab:apiserver-lb-healthcheck", "extendedKeyUsage=clientAuth")
    # haproxy reads the client certificate and key from one PEM, as the step installs it.
    (tmp / "healthcheck.pem").write_text((tmp / "client.crt").read_text() + (tmp / "client.key").read_text())
    return tmp


class _TLSServer(ThreadingHTTPServer):
    """An HTTPS server that does each TLS handshake in the request's own thread.

    Wrapping the listening socket instead does the handshake inside ``accept()``, and a client
    that hangs up mid-handshake (haproxy's health checks do, and so does its plain TCP probe)
    then leaks the half-made ``SSLSocket`` there: a ResourceWarning that fails the test at
    random. Here the socket is wrapped, used and closed in one place, and a peer that goes away
    is not an error.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], ctx: ssl.SSLContext):
        super().__init__(address, handler)
        self.ctx = ctx

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        try:
            with self.ctx.wrap_socket(request, server_side=True) as tls:
                self.RequestHandlerClass(tls, client_address, self)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass  # the client went away during the handshake or the reply


class FakeApiServer:
    """An HTTPS server that wants a client certificate: ``/readyz`` answers 200 while
    ``ready``, 500 otherwise (as kube-apiserver does); ``/whoami`` names the server."""

    def __init__(self, name: str, certs: Path):
        self.name, self.ready = name, True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/readyz":
                    code, body = (200, b"ok") if outer.ready else (500, b"[-]etcd failed: not ready")
                else:
                    code, body = 200, outer.name.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
        ctx.load_verify_locations(certs / "ca.crt")
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd = _TLSServer(("127.0.0.1", 0), Handler, ctx)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lb(certs, tmp_path) -> Iterator[tuple[int, dict[str, FakeApiServer]]]:
    if not Path(HAPROXY).is_file():
        pytest.fail(f"{HAPROXY} is missing: `make test-deps` installs Debian's haproxy package")
    for f in ("ca.crt", "healthcheck.pem"):
        shutil.copy(certs / f, tmp_path / f)
    servers = {n: FakeApiServer(n, certs) for n in ("master-1", "master-2")}
    port = _free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render("config/apiserver-lb.haproxy.cfg.j2", node="worker-1", config_dir=str(tmp_path),
                          listen=f"127.0.0.1:{port}",
                          masters=[{"name": n, "address": "127.0.0.1", "port": s.port} for n, s in servers.items()]))
    # The unit's ExecStartPre: the config is valid as haproxy reads it.
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp_path / "haproxy.log").open("w")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port, servers
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for s in servers.values():
            s.stop()


def _whoami(port: int, certs: Path) -> str | None:
    """One request through the load balancer, as kubelet makes it (TLS to the API server)."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(certs / "client.crt", certs / "client.key")
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/whoami", context=ctx, timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


def _until(pred, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.25)
    pytest.fail(f"after {timeout} s: {what}")


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return True
    except OSError:
        return False


def _served_by(port: int, certs: Path, n: int = 12) -> set[str | None]:
    return {_whoami(port, certs) for _ in range(n)}


def test_haproxy_forwards_only_to_api_servers_that_are_ready(lb, certs):
    port, servers = lb
    # The step's own check: it accepts connections once it listens (retried, as the step does).
    _until(lambda: _connects(port), "haproxy listens", timeout=10)
    _until(lambda: _served_by(port, certs) == {"master-1", "master-2"}, "both ready masters serve", timeout=40)

    servers["master-1"].ready = False  # /readyz fails: three checks (within 5 + 2 + 2 s) and it is out
    _until(lambda: _served_by(port, certs) == {"master-2"}, "only master-2 serves while master-1 is not ready",
           timeout=40)
    assert _served_by(port, certs, 20) == {"master-2"}

    servers["master-1"].ready = True
    _until(lambda: _served_by(port, certs) == {"master-1", "master-2"}, "master-1 serves again once ready",
           timeout=40)

    servers["master-2"].stop()  # a master that is gone (virsh destroy)
    _until(lambda: _served_by(port, certs) == {"master-1"}, "only master-1 serves once master-2 is gone", timeout=40)
    assert _served_by(port, certs, 20) == {"master-1"}


def test_haproxy_still_connects_when_no_api_server_passes_its_check(lb, certs, tmp_path):
    """A check that fails everywhere (a worker too starved to finish its TLS handshakes in time,
    or every API server not ready) must not leave the node with no API at all: the masters are
    tried unchecked, so the client gets the API server's own answer."""
    port, servers = lb
    _until(lambda: _connects(port), "haproxy listens", timeout=10)
    _until(lambda: _served_by(port, certs) == {"master-1", "master-2"}, "both ready masters serve", timeout=40)
    for s in servers.values():
        s.ready = False
    log = tmp_path / "haproxy.log"  # the lb fixture's haproxy -db writes its log here
    _until(lambda: "0 active and 2 backup servers left. Running on backup." in log.read_text(),
           "haproxy marks both masters down and runs on the unchecked ones", timeout=40)
    assert _served_by(port, certs, 20) == {"master-1", "master-2"}
