"""Two engines in one process: every operation over both transports, and every refusal."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    MetadataError,
    SegmentNotFoundError,
)
from kvcake.transfer import (
    BatchState,
    LocalDirectory,
    TransferEngine,
    TransferOp,
    TransferRequest,
)

MakeEngine = Callable[..., TransferEngine]


@pytest.fixture(params=["shm", "tcp"])
def pair(request: pytest.FixtureRequest, make_engine: MakeEngine) -> tuple[
    TransferEngine, TransferEngine
]:
    owner = make_engine()
    owner.register_segment("kv0", 8 << 20)
    return owner, make_engine(transport=request.param)


def test_auto_picks_shm_on_this_host(make_engine: MakeEngine) -> None:
    owner = make_engine()
    owner.register_segment("kv0", 4096)
    assert make_engine().open_segment(f"{owner.endpoint}/kv0").transport == "shm"


def test_read_and_write_are_byte_exact(pair: tuple[TransferEngine, TransferEngine]) -> None:
    owner, user = pair
    remote = user.open_segment(f"{owner.endpoint}/kv0")
    assert remote.transport == user.config.transport
    data = os.urandom(3 << 20)
    local = user.allocate_buffer(3 << 20)
    local.view[:] = data
    user.write(remote, 12345, local.view)
    owned = owner.local_descriptor("kv0")
    assert owned.size == 8 << 20
    back = bytearray(3 << 20)
    user.read(remote, 12345, memoryview(back))
    assert back == data


def test_batch_moves_many_objects_both_ways(pair: tuple[TransferEngine, TransferEngine]) -> None:
    owner, user = pair
    remote = user.open_segment(f"{owner.endpoint}/kv0")
    blobs = [os.urandom(65536) for _ in range(64)]
    writes = [TransferRequest(TransferOp.WRITE, remote, i * 65536, memoryview(b))
              for i, b in enumerate(blobs)]
    batch = user.submit(writes)
    batch.wait(10)
    assert batch.poll() is BatchState.COMPLETED
    outs = [bytearray(65536) for _ in blobs]
    user.transfer([TransferRequest(TransferOp.READ, remote, i * 65536, memoryview(o))
                   for i, o in enumerate(outs)])
    assert [bytes(o) for o in outs] == blobs


def test_async_api(pair: tuple[TransferEngine, TransferEngine]) -> None:
    owner, user = pair

    async def main() -> bytes:
        remote = await user.aopen_segment(f"{owner.endpoint}/kv0")
        await user.awrite(remote, 0, memoryview(b"async bytes"))
        out = bytearray(11)
        await user.aread(remote, 0, memoryview(out))
        return bytes(out)

    assert asyncio.run(main()) == b"async bytes"


def test_out_of_range_is_refused_before_any_byte_moves(
    pair: tuple[TransferEngine, TransferEngine],
) -> None:
    owner, user = pair
    remote = user.open_segment(f"{owner.endpoint}/kv0")
    user.write(remote, (8 << 20) - 4, memoryview(b"tail"))
    bad = [
        TransferRequest(TransferOp.WRITE, remote, 0, memoryview(b"head")),
        TransferRequest(TransferOp.WRITE, remote, (8 << 20) - 2, memoryview(b"over")),
    ]
    with pytest.raises(InvalidParamsError) as info:
        user.submit(bad)
    assert info.value.code is ErrorCode.BUFFER_OVERFLOW
    out = bytearray(4)
    user.read(remote, 0, memoryview(out))
    assert out == bytes(4)  # the valid first request did not run either
    user.read(remote, (8 << 20) - 4, memoryview(out))
    assert out == b"tail"


def test_reads_need_writable_flat_buffers(pair: tuple[TransferEngine, TransferEngine]) -> None:
    owner, user = pair
    remote = user.open_segment(f"{owner.endpoint}/kv0")
    with pytest.raises(InvalidParamsError, match="writable"):
        user.read(remote, 0, memoryview(b"read-only"))
    with pytest.raises(InvalidParamsError, match="flat byte views"):
        user.read(remote, 0, memoryview(bytearray(8)).cast("I"))


def test_unknown_segments_and_peers(make_engine: MakeEngine) -> None:
    owner, user = make_engine(), make_engine()
    with pytest.raises(SegmentNotFoundError, match="nope"):
        user.open_segment(f"{owner.endpoint}/nope")
    with pytest.raises(InvalidParamsError, match="HOST:PORT/SEGMENT"):
        user.open_segment("kv0")
    owner.close()
    with pytest.raises(MetadataError, match="handshake"):
        user.open_segment(f"{owner.endpoint}/kv0")


def test_local_directory_shared_by_engines_of_one_process() -> None:
    directory = LocalDirectory()
    from kvcake.transfer.config import TransferConfig

    with TransferEngine(TransferConfig(metadata="local"), directory) as owner, \
            TransferEngine(TransferConfig(metadata="local", transport="tcp"), directory) as user:
        owner.register_segment("shared", 4096)
        remote = user.open_segment("shared")
        user.write(remote, 0, memoryview(b"x"))
        owner.unregister_segment("shared")
        with pytest.raises(SegmentNotFoundError):
            user.open_segment("shared")


def test_duplicate_registration_keeps_the_first(make_engine: MakeEngine) -> None:
    engine = make_engine()
    first = engine.register_segment("kv0", 4096)
    first.view[:2] = b"ok"
    with pytest.raises(KvcakeError, match="already registered"):
        engine.register_segment("kv0", 4096)
    assert bytes(first.view[:2]) == b"ok"


def test_closed_engine_refuses_work(make_engine: MakeEngine) -> None:
    owner, user = make_engine(), make_engine(transport="tcp")
    owner.register_segment("kv0", 4096)
    remote = user.open_segment(f"{owner.endpoint}/kv0")
    user.close()
    with pytest.raises(KvcakeError, match="closed"):
        user.write(remote, 0, memoryview(b"x"))


def test_peer_gone_fails_tcp_transfers_cleanly(make_engine: MakeEngine) -> None:
    owner, user = make_engine(), make_engine(transport="tcp")
    owner.register_segment("kv0", 4096)
    remote = user.open_segment(f"{owner.endpoint}/kv0")
    user.write(remote, 0, memoryview(b"x"))
    owner.close()
    with pytest.raises(KvcakeError) as info:
        user.write(remote, 0, memoryview(b"x"))
    assert info.value.code is ErrorCode.TRANSFER_FAIL
