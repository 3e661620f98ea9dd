"""The committed gencode is exactly what proto/generate.sh makes from proto/."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = Path("macvtapdp/api/v1beta1")


def test_committed_gencode_matches_the_proto(tmp_path: Path) -> None:
    bindir = os.path.dirname(sys.executable)  # python and protoc-gen-mypy of this env
    subprocess.run(
        [str(ROOT / "proto" / "generate.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"},
    )
    fresh = sorted(p.name for p in (tmp_path / GENERATED).iterdir())
    assert fresh == ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi"]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / GENERATED, ROOT / GENERATED, fresh)
    assert (mismatch, errors) == ([], []), "run proto/generate.sh and commit the result"


def test_wire_names_are_the_kubelets() -> None:
    from macvtapdp.api.v1beta1 import api_pb2

    services = api_pb2.DESCRIPTOR.services_by_name
    assert services["Registration"].full_name == "v1beta1.Registration"
    assert [m.name for m in services["DevicePlugin"].methods] == [
        "GetDevicePluginOptions",
        "ListAndWatch",
        "GetPreferredAllocation",
        "Allocate",
        "PreStartContainer",
    ]
    fields = api_pb2.ContainerAllocateResponse.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in fields.items()} == {
        "envs": 1,
        "mounts": 2,
        "devices": 3,
        "annotations": 4,
        "cdi_devices": 5,
    }
