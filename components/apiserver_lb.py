"""The node-local API load balancer: haproxy on 127.0.0.1:6443 on every node that is not a master.

kubelet and kube-proxy on such a node talk to ``https://127.0.0.1:6443``; haproxy passes the
TLS connection through (TCP) to every master's API server that answers ``/readyz``, so a node
keeps working while one master is down. This is kubespray's ``loadbalancer_apiserver_localhost``
with haproxy's active health checks. Masters need none: their components use their own API
server on the same address.

haproxy comes from the OS packages (the lab image has it; a DigitalOcean droplet installs it;
on existing hosts it is a precondition, checked by the step with the fix in its message).
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi

from components.host import Check, File, HostAccess, SecretFile, StepSpec
from components.machine import Machine
from components.pki import ClusterPki
from components.render import render

CONFIG_DIR = "/etc/kubelab/apiserver-lb"
UNIT = "kubelab-apiserver-lb"
LISTEN = "127.0.0.1:6443"
API_PORT = 6443


class ApiServerLoadBalancer(pulumi.ComponentResource):
    """haproxy on one node in front of every master's API server (see the module docstring).

    ``step`` is the remote step that installs and starts it; the node's kubelet and kube-proxy
    depend on it.
    """

    def __init__(self, host: HostAccess, pki: ClusterPki, masters: Sequence[Machine],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("kubelab:node:ApiServerLoadBalancer", host.machine.name, None, opts)
        assert pki.apiserver_lb_healthcheck is not None
        node = host.machine.name
        config = pulumi.Output.all(*[m.private_address for m in masters]).apply(lambda addrs: render(
            "config/apiserver-lb.haproxy.cfg.j2", node=node, config_dir=CONFIG_DIR, listen=LISTEN,
            masters=[{"name": m.name, "address": a, "port": API_PORT} for m, a in zip(masters, addrs, strict=True)]))
        # haproxy reads the client certificate and its key from one PEM file.
        hc = pki.apiserver_lb_healthcheck
        pem = pulumi.Output.secret(pulumi.Output.all(hc.cert, hc.key).apply(
            lambda v: v[0].rstrip("\n") + "\n" + v[1].rstrip("\n") + "\n"))
        self.step = host.step("apiserver-lb", "scripts/install-apiserver-lb.sh.j2", StepSpec(
            units=[UNIT],
            dirs=[(CONFIG_DIR, "0755")],
            files=[File(f"/etc/systemd/system/{UNIT}.service", render(
                       "systemd/kubelab-apiserver-lb.service.j2", config=f"{CONFIG_DIR}/haproxy.cfg")),
                   File(f"{CONFIG_DIR}/haproxy.cfg", config),
                   File(f"{CONFIG_DIR}/ca.crt", pki.ca.cert)],
            secret_files=[SecretFile(f"{CONFIG_DIR}/healthcheck.pem", pem)],
            context={"install_packages": host.machine.installs_packages},
            # It accepts once it listens, whether or not a master answers yet (the kubelet waits
            # for the API servers itself); haproxy marks a master up two checks after /readyz (and
            # connects unchecked while none is up).
            checks=[Check(f"bash -c '</dev/tcp/{LISTEN.replace(':', '/')}'", tries=30, pause=1)],
        ), parent=self)
        self.register_outputs({"node": node})
