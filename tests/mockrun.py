"""Run the real program under Pulumi mocks and record the real dependency graph.

``MockResourceArgs`` carries no parent or dependencies, so the monitor itself is subclassed
to record every ``RegisterResource`` request (parent, dependencies, property dependencies,
custom timeouts) before the mock answers it.
"""

from __future__ import annotations

import json
import runpy
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pulumi
from pulumi.runtime import mocks as pmocks

REPO = Path(__file__).resolve().parent.parent

PEM_KEY = "-----BEGIN EC PRIVATE KEY-----\nMOCK\n-----END EC PRIVATE KEY-----\n"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMOCK\n-----END CERTIFICATE-----\n"


class KubelabMocks(pulumi.runtime.Mocks):
    """Outputs the providers would compute (keys, certificates, droplet addresses).

    ``ids`` overrides the id of named resources (a replaced VM gets a new domain id);
    ``outputs`` are the stack's last outputs, as the engine's readStackOutputs answers them.
    """

    def __init__(self, ids: dict[str, str] | None = None, outputs: dict | None = None) -> None:
        self.count = 0
        self.ids = ids or {}
        self.outputs = outputs

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.count += 1
        state = dict(args.inputs)
        t = args.typ
        if t == "tls:index/privateKey:PrivateKey":
            state.update(privateKeyPem=PEM_KEY, publicKeyPem="-----BEGIN PUBLIC KEY-----\nMOCK\n-----END PUBLIC KEY-----\n",
                         privateKeyOpenssh="-----BEGIN OPENSSH PRIVATE KEY-----\nMOCK\n-----END OPENSSH PRIVATE KEY-----\n",
                         publicKeyOpenssh=f"ssh-ed25519 AAAAMOCK{args.name}\n")
        elif t in ("tls:index/selfSignedCert:SelfSignedCert", "tls:index/locallySignedCert:LocallySignedCert"):
            state["certPem"] = PEM_CERT.replace("MOCK", "MOCK-" + args.name)
        elif t == "tls:index/certRequest:CertRequest":
            state["certRequestPem"] = "CSR " + args.name
        elif t == "digitalocean:index/droplet:Droplet":
            state.update(ipv4Address=f"203.0.113.{10 + self.count % 200}", ipv4AddressPrivate=f"10.240.0.{10 + self.count % 200}",
                         dropletUrn=f"do:droplet:{self.count}")
            return [str(1000 + self.count), state]
        elif t == "digitalocean:index/reservedIp:ReservedIp":
            state.update(ipAddress="198.51.100.5", reservedIpUrn="do:floatingip:198.51.100.5")
        elif t == "digitalocean:index/sshKey:SshKey":
            state["fingerprint"] = "aa:bb:cc"
        elif t == "command:remote:Command":
            state.update(stdout="", stderr="")
        return [self.ids.get(args.name, f"{args.name}-id"), state]

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "pulumi:pulumi:readStackOutputs" and self.outputs is not None:
            return {"outputs": self.outputs}
        return {}


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    parent: str
    dependencies: list[str]
    property_dependencies: dict[str, list[str]]
    custom_timeouts: dict[str, str]
    inputs: dict
    ignore_changes: list[str] = field(default_factory=list)
    delete_before_replace: bool = False
    deleted_with: str = ""


class RecordingMonitor(pmocks.MockMonitor):
    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        from google.protobuf import json_format

        inputs = json_format.MessageToDict(request.object)
        self.registrations.append(Registration(
            type=request.type, name=request.name, urn=response.urn, parent=request.parent,
            dependencies=list(request.dependencies),
            property_dependencies={k: list(v.urns) for k, v in request.propertyDependencies.items()},
            custom_timeouts={"create": request.customTimeouts.create, "update": request.customTimeouts.update},
            inputs=inputs,
            ignore_changes=list(request.ignoreChanges),
            delete_before_replace=request.deleteBeforeReplace,
            deleted_with=request.deletedWith,
        ))
        return response


@dataclass
class Graph:
    registrations: list[Registration]
    stack_outputs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_urn = {r.urn: r for r in self.registrations}

    def find(self, type_: str | None = None, name: str | None = None, parent_type: str | None = None) -> list[Registration]:
        out = []
        for r in self.registrations:
            if type_ and r.type != type_:
                continue
            if name and r.name != name:
                continue
            if parent_type and (r.parent not in self.by_urn or self.by_urn[r.parent].type != parent_type):
                continue
            out.append(r)
        return out

    def one(self, name: str, type_: str = "command:remote:Command") -> Registration:
        found = self.find(type_, name)
        assert len(found) == 1, f"{name}: {len(found)} matches"
        return found[0]

    def direct_deps(self, r: Registration) -> set[str]:
        deps = set(r.dependencies)
        for urns in r.property_dependencies.values():
            deps.update(urns)
        return deps

    def ancestors(self, r: Registration) -> set[str]:
        """Every resource ``r`` waits for, transitively."""
        seen: set[str] = set()
        todo = deque(self.direct_deps(r))
        while todo:
            urn = todo.popleft()
            if urn in seen:
                continue
            seen.add(urn)
            if urn in self.by_urn:
                todo.extend(self.direct_deps(self.by_urn[urn]))
        return seen

    def depends_on(self, later: Registration, earlier: Registration) -> bool:
        return earlier.urn in self.ancestors(later)


def run_program(raw_config: dict, stack: str = "test", ids: dict[str, str] | None = None,
                outputs: dict | None = None) -> Graph:
    """Run ``__main__.py`` with ``raw_config`` as ``kubelab:cluster`` under recording mocks
    (``outputs``: the stack's last outputs, for an update of a running cluster)."""
    mocks = KubelabMocks(ids, outputs)
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="kubelab", stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config({"kubelab:cluster": json.dumps(raw_config)})

    exports: dict[str, pulumi.Output] = {}
    resolved: dict = {}

    @pulumi.runtime.test
    def program():
        with mock.patch.object(pulumi, "export", side_effect=lambda k, v: exports.__setitem__(k, pulumi.Output.from_input(v))):
            runpy.run_path(str(REPO / "__main__.py"), run_name="__main__")
        return pulumi.Output.all(**exports).apply(resolved.update)

    program()
    return Graph(monitor.registrations, resolved)
