"""The checked-in stubs under client/lossd/v1 are exactly what the proto generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "client" / "lossd" / "v1"


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    for relative in generated:
        checked_in = ROOT / "client" / relative
        assert checked_in.exists(), f"{relative} is generated but not checked in; run scripts/gen_protos.sh"
        assert checked_in.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} differs from the proto; run scripts/gen_protos.sh and commit the result"
        )
    stubs = {p.name for p in CHECKED_IN.glob("*_pb2*")}
    assert stubs == {p.name for p in generated}, "a checked-in stub has no proto behind it"


def test_proto_package_is_the_import_path() -> None:
    from lossd.v1 import loss_service_pb2 as pb

    assert pb.DESCRIPTOR.package == "lossd.v1"
    assert "LossService" in pb.DESCRIPTOR.services_by_name
