"""The checked-in stubs (services/v1, imported as specserve.v1) are what scripts/gen_protos.sh makes from
protos/specserve/v1: a proto edited without regenerating fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from specserve.v1 import common_pb2, drafter_pb2, router_pb2, verifier_pb2

REPO = Path(__file__).resolve().parents[3]
STUBS = REPO / "services" / "v1"


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = {p.name: p.read_text() for p in tmp_path.iterdir() if p.suffix in (".py", ".pyi")}
    checked_in = {p.name: p.read_text() for p in STUBS.iterdir() if p.suffix in (".py", ".pyi")}
    generated.pop("__init__.py", None)
    checked_in.pop("__init__.py", None)
    assert sorted(generated) == sorted(checked_in)
    stale = [name for name in generated if generated[name] != checked_in[name]]
    assert not stale, f"stale stubs (run scripts/gen_protos.sh): {stale}"


def test_every_service_of_the_design_is_declared() -> None:
    assert set(router_pb2.DESCRIPTOR.services_by_name["Router"].methods_by_name) >= {"Generate", "GenerateStream"}
    assert set(verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].methods_by_name) >= {
        "Prefill", "Verify", "Release"}
    assert "Propose" in drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].methods_by_name
    assert common_pb2.DESCRIPTOR.package == "specserve.v1"


def test_token_ids_are_packed() -> None:
    """proto3 packs repeated scalars: 1000 small token ids cost about 1 byte each, not 2+."""
    message = router_pb2.TokenChunk(token_ids=list(range(100)) * 10)
    assert len(message.SerializeToString()) < 1200
