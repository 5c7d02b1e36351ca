"""The e2e harness's own logic that a failed run depends on (fast tier)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.pulumi_support import in_flight


def _event(kind: str, op: str, name: str) -> str:
    urn = f"urn:pulumi:e2e::kubelab::kubelab:libvirt:Lab$libvirt:index/volume:Volume::{name}"
    return json.dumps({"sequence": 1, "timestamp": 1, kind: {"metadata": {"op": op, "urn": urn, "type": "x"}}})


def test_in_flight_names_what_the_engine_started_and_never_finished(tmp_path: Path):
    """What a stalled ``pulumi up`` reports: started, neither done nor failed (a cut-off last
    line from a killed run is skipped)."""
    log = tmp_path / "up.events.jsonl"
    log.write_text("\n".join([
        _event("resourcePreEvent", "create", "base"), _event("resOutputsEvent", "create", "base"),
        _event("resourcePreEvent", "create", "worker-1-cloudinit"), _event("resOpFailedEvent", "create", "worker-1-cloudinit"),
        _event("resourcePreEvent", "create", "master-1-cloudinit"), _event("resourcePreEvent", "create", "master-1-root"),
        '{"sequence": 9, "timestamp": 2, "resourcePreEv',
    ]))
    assert in_flight(log) == ["create master-1-cloudinit", "create master-1-root"]
    assert in_flight(tmp_path / "missing.jsonl") == []
