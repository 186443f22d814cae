"""A prefix read from a real etcd in pages: every key under the prefix once, in key order,
none outside it. One read of a whole journal passes gRPC's message limit past some 20,000
objects."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvcake.common.etcd import etcd_client, read_prefix
from kvcake.ops import start_etcd

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd server binary"),
]


@pytest.mark.parametrize("page_keys", [1, 4, 25, 1000])
def test_a_prefix_is_read_whole_in_pages(tmp_path: Path, page_keys: int) -> None:
    process, endpoint = start_etcd(tmp_path / "etcd")
    try:
        client = etcd_client(endpoint)
        for i in reversed(range(25)):
            client.put(f"j/objects/k{i:03d}", f"v{i}")
        client.put("j/objects", "not under the prefix")
        client.put("j/objectt", "past it")
        rows = read_prefix(client, "j/objects/", page_keys=page_keys)
    finally:
        process.stop()
    assert [(meta.key, value) for value, meta in rows] == [
        (f"j/objects/k{i:03d}".encode(), f"v{i}".encode()) for i in range(25)]
    assert len({meta.mod_revision for _, meta in rows}) == 25
