"""The committed CSI bindings are fresh, and the wire contract matches the official numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.csi import csi_pb2
from tests.conftest import REPO

GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(REPO / "proto" / "generate.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        fresh = (tmp_path / "agent" / "csi" / name).read_text()
        committed = (REPO / "agent" / "csi" / name).read_text()
        assert committed == fresh, f"agent/csi/{name} is stale: run `make proto` and commit it"


def _numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_official_field_numbers() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert _numbers(csi_pb2.NodePublishVolumeRequest) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }
    assert _numbers(csi_pb2.NodeUnpublishVolumeRequest) == {"volume_id": 1, "target_path": 2}
    assert _numbers(csi_pb2.NodeGetInfoResponse) == {
        "node_id": 1,
        "max_volumes_per_node": 2,
        "accessible_topology": 3,
    }
    assert _numbers(csi_pb2.VolumeCapability) == {"block": 1, "mount": 2, "access_mode": 3}
    assert _numbers(csi_pb2.VolumeCapability.MountVolume) == {
        "fs_type": 1,
        "mount_flags": 2,
        "volume_mount_group": 3,
    }
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP == 6
    services = {s.full_name for s in csi_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {"csi.v1.Identity", "csi.v1.Node"}
