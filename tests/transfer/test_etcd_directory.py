"""Segment descriptors through a real etcd server started for the test."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcake.common.errors import MetadataError, SegmentNotFoundError
from kvcake.common.sockets import free_port
from kvcake.transfer import EtcdDirectory, TransferEngine
from kvcake.transfer.config import TransferConfig

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd server binary"),
]




@pytest.fixture
def etcd_url(tmp_path: Path) -> Iterator[str]:
    client, peer = free_port(), free_port()
    process = subprocess.Popen(
        ["etcd", "--data-dir", str(tmp_path / "etcd"), "--name", "kvcake-test",
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"kvcake-test=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_serving(client)
        yield f"etcd://127.0.0.1:{client}"
    finally:
        process.terminate()
        process.wait(10)


def _wait_until_serving(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            directory = EtcdDirectory(f"etcd://127.0.0.1:{port}")
            try:
                directory.lookup("probe")
            except SegmentNotFoundError:
                return
            finally:
                directory.close()
        except MetadataError:
            time.sleep(0.1)
    raise RuntimeError("etcd did not start")


def test_engines_find_each_other_through_etcd(etcd_url: str) -> None:
    config = TransferConfig(metadata=etcd_url, timeout_s=5)
    with TransferEngine(config) as owner:
        owner.register_segment("cluster-kv0", 1 << 20)
        with TransferEngine(TransferConfig(metadata=etcd_url, transport="tcp")) as user:
            remote = user.open_segment("cluster-kv0")
            assert remote.descriptor.endpoint == owner.endpoint
            user.write(remote, 10, memoryview(b"via etcd"))
            out = bytearray(8)
            user.read(remote, 10, memoryview(out))
            assert out == b"via etcd"
    # The owner closed: its lease is revoked and its descriptors are gone.
    directory = EtcdDirectory(etcd_url)
    try:
        with pytest.raises(SegmentNotFoundError, match="cluster-kv0"):
            directory.lookup("cluster-kv0")
    finally:
        directory.close()


def test_unregister_removes_the_descriptor(etcd_url: str) -> None:
    with TransferEngine(TransferConfig(metadata=etcd_url)) as owner:
        owner.register_segment("short-lived", 4096)
        assert owner.directory.lookup("short-lived").size == 4096
        owner.unregister_segment("short-lived")
        with pytest.raises(SegmentNotFoundError):
            owner.directory.lookup("short-lived")


def test_unreachable_etcd_is_a_metadata_error() -> None:
    directory = EtcdDirectory(f"etcd://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(MetadataError, match="etcd"):
            directory.lookup("anything")
    finally:
        directory.close()
