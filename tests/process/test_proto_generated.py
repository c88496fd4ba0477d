"""The checked-in generated modules of proto/expert.proto are what grpc_tools makes of it now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nextserve.proto import expert_pb2

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py")
REGENERATE = "make proto"


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Inextserve/proto=proto", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "proto/expert.proto"],
                   cwd=REPO, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "nextserve" / "proto" / name).read_bytes()
        assert fresh == (REPO / "proto" / name).read_bytes(), \
            f"proto/{name} is stale; from the repo root run: {REGENERATE}"


def test_package_is_versioned_and_stubs_import_as_package() -> None:
    assert expert_pb2.DESCRIPTOR.package == "nextserve.expert.v1"
    text = (REPO / "proto" / "expert_pb2_grpc.py").read_text()
    assert "from nextserve.proto import expert_pb2" in text


@pytest.mark.parametrize("message,field", [("DispatchRequest", "hidden"), ("DispatchRequest", "weights"),
                                           ("DispatchReply", "partial")])
def test_tensor_payloads_are_bytes(message: str, field: str) -> None:
    fd = expert_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
    assert fd.type == fd.TYPE_BYTES
