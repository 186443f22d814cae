"""A node's SSD tier deletes only files it wrote: its manifest lists them; a directory with
``*.kv`` files it does not list is refused with nothing touched; one node per directory; a
tier larger than its free space is refused."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Awaitable
from pathlib import Path

import pytest

from kvcake.common import codec
from kvcake.common.errors import InvalidParamsError
from kvcake.store.node.disk import MANIFEST, DiskTier, control_channel
from kvcake.wire import store as m

SEGMENT = memoryview(bytearray(b"0123456789abcdef" * 4))


def _offload(tier: DiskTier, key: str, offset: int = 0, size: int = 16) -> None:
    call = control_channel(tier)(memoryview(codec.encode(m.OffloadRequest(key, offset, size))))
    assert not isinstance(call, bytes)
    reply = asyncio.run(_bytes(call))
    assert codec.decode(reply, m.CodesReply).codes == [0]


async def _bytes(call: Awaitable[bytes]) -> bytes:
    return await call


def _kv_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + ".kv"


def test_a_restart_deletes_the_files_it_wrote_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    tier = DiskTier(str(tmp_path), SEGMENT)
    _offload(tier, "a")
    _offload(tier, "b", 16)
    assert sorted(p.name for p in tmp_path.glob("*.kv")) == sorted([_kv_name("a"),
                                                                     _kv_name("b")])
    assert (tmp_path / MANIFEST).read_text().split() == [_kv_name("a"), _kv_name("b")]
    tier.close()
    DiskTier(str(tmp_path), SEGMENT).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "notes.txt"]
    assert (tmp_path / MANIFEST).read_text() == ""


def test_a_directory_with_foreign_kv_files_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "model.kv").write_text("someone else's")
    (tmp_path / ("e" * 64 + ".kv")).write_text("looks like ours, is not listed")
    with pytest.raises(InvalidParamsError, match=r"holds 2 \*\.kv file\(s\) the disk tier did "
                       r"not write \(eeee.*\.kv, model\.kv\)"):
        DiskTier(str(tmp_path), SEGMENT)
    assert (tmp_path / "model.kv").read_text() == "someone else's"
    assert (tmp_path / ("e" * 64 + ".kv")).exists()


def test_a_forged_manifest_line_deletes_nothing_outside_its_own_names(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    inner = tmp_path / "tier"
    inner.mkdir()
    (inner / MANIFEST).write_text("../victim.txt\nvictim.txt\n")
    DiskTier(str(inner), SEGMENT).close()
    assert victim.read_text() == "keep"


def test_one_node_per_directory(tmp_path: Path) -> None:
    first = DiskTier(str(tmp_path), SEGMENT)
    _offload(first, "a")
    with pytest.raises(InvalidParamsError, match="in use by another node's disk tier"):
        DiskTier(str(tmp_path), SEGMENT)
    assert (tmp_path / _kv_name("a")).exists()  # the refused one deleted nothing
    first.close()
    DiskTier(str(tmp_path), SEGMENT).close()  # free again once the first is gone


def test_a_tier_larger_than_the_free_space_is_refused(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InvalidParamsError, match=r"a disk tier of .* does not fit in --disk-dir "
                       r".*: its file system has .* free"):
        DiskTier(str(tmp_path), SEGMENT, free + (1 << 40))
    DiskTier(str(tmp_path), SEGMENT, min(free, 1 << 20)).close()  # the lock was let go
