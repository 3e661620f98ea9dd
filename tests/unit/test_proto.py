"""The committed gencode is exactly what proto/generate.sh makes from proto/."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parents[2]
# Every generated package: the device plugin API and the PodResources API.
GENERATED = [Path("macvtapdp/api/v1beta1"), Path("macvtapdp/api/podresources/v1")]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """proto/generate.sh run into a temporary root."""
    out = tmp_path_factory.mktemp("gencode")
    bindir = os.path.dirname(sys.executable)  # python and protoc-gen-mypy of this env
    subprocess.run(
        [str(ROOT / "proto" / "generate.sh"), str(out)],
        check=True,
        env={**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"},
    )
    return out


@pytest.mark.parametrize("package", GENERATED, ids=str)
def test_committed_gencode_matches_the_proto(fresh: Path, package: Path) -> None:
    made = sorted(p.name for p in (fresh / package).iterdir())
    assert made == ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi"]
    _, mismatch, errors = filecmp.cmpfiles(fresh / package, ROOT / package, made)
    assert (mismatch, errors) == ([], []), "run proto/generate.sh and commit the result"
    assert (ROOT / package / "__init__.py").is_file()


def test_generated_packages_are_all_checked(fresh: Path) -> None:
    """A proto added to generate.sh without a drift check here fails this test."""
    made = sorted(p.parent.relative_to(fresh) for p in fresh.rglob("api_pb2.py"))
    assert made == sorted(GENERATED)


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


def test_pod_resources_wire_names_are_the_kubelets() -> None:
    from macvtapdp.api.podresources.v1 import api_pb2

    assert api_pb2.DESCRIPTOR.package == "v1"
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert [(m.name, m.input_type.name, m.output_type.name) for m in service.methods] == [
        ("List", "ListPodResourcesRequest", "ListPodResourcesResponse"),
        ("GetAllocatableResources", "AllocatableResourcesRequest", "AllocatableResourcesResponse"),
        ("Get", "GetPodResourcesRequest", "GetPodResourcesResponse"),
    ]

    def numbers(message: type[Message]) -> dict[str, int]:
        return {n: f.number for n, f in message.DESCRIPTOR.fields_by_name.items()}

    assert numbers(api_pb2.PodResources) == {"name": 1, "namespace": 2, "containers": 3}
    assert numbers(api_pb2.ContainerResources) == {
        "name": 1,
        "devices": 2,
        "cpu_ids": 3,
        "memory": 4,
        "dynamic_resources": 5,
    }
    assert numbers(api_pb2.ContainerDevices) == {"resource_name": 1, "device_ids": 2, "topology": 3}
    assert numbers(api_pb2.GetPodResourcesRequest) == {"pod_name": 1, "pod_namespace": 2}
    assert numbers(api_pb2.AllocatableResourcesResponse) == {
        "devices": 1,
        "cpu_ids": 2,
        "memory": 3,
    }


def test_both_protos_load_together() -> None:
    """Both files are named api.proto: at distinct paths they share one descriptor pool."""
    from macvtapdp.api.podresources.v1 import api_pb2 as podresources
    from macvtapdp.api.v1beta1 import api_pb2 as deviceplugin

    assert deviceplugin.DESCRIPTOR.name != podresources.DESCRIPTOR.name
    assert deviceplugin.DESCRIPTOR.pool is podresources.DESCRIPTOR.pool
