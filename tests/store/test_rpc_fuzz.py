"""Hostile bytes against a live MasterServer: every frame is answered with an error or the
connection ends, nothing hangs, and afterwards the server serves and has lost nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fuzzing
from fuzzing import Frames, assert_error_frame, assert_rpc_answers, call_frame, fuzz_settings
from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.frames import HEADER_SIZE, FrameHeader, FrameOp, pack_header
from kvcake.common.rpc import MAX_CALL_BYTES, RpcClient
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.server import MasterServer
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m
from kvcake.wire.store import ReplicaHandle, ReplicateConfig

T = TypeVar("T")

TIMEOUT_S = 5.0
POOL = 1 << 20
PRE_KEY = "pre"
PRE_SIZE = 12345
LONG_KEY = "x" * 100_000
FUZZ = fuzz_settings(200)


@dataclass(frozen=True)
class Master:
    thread: LoopThread
    server: MasterServer
    address: tuple[str, int]
    pre_handles: list[ReplicaHandle]

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the server's loop thread (the only thread that may touch it)."""
        async def call() -> T:
            return fn(*args)
        return self.thread.run(call(), TIMEOUT_S)


@pytest.fixture(scope="module")
def master() -> Iterator[Master]:
    config = MasterConfig(port=0, metrics_port=-1, client_ttl_s=3600.0, put_timeout_s=3600.0,
                          summary_s=0.0, seed=1)
    thread = LoopThread("fuzz-master")
    server = MasterServer(config)
    host, port = thread.run(server.startup(), TIMEOUT_S).rsplit(":", 1)
    master = Master(thread, server, (host, int(port)), [])
    try:
        master.pre_handles.extend(master.on_loop(pre_store, server))
        yield master
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()


def pre_store(server: MasterServer) -> list[ReplicaHandle]:
    service = server.service
    service.register_client("owner", "host-owner")
    service.register_client("fuzzer", "host-fuzzer")
    service.mount_segment("owner", SegmentDescriptor("pool", 0, POOL, "host-owner",
                                                     "127.0.0.1:1", "", 0))
    handles = service.put_start("owner", PRE_KEY, PRE_SIZE, ReplicateConfig())
    assert isinstance(handles, list)
    assert service.put_end("owner", PRE_KEY) is ErrorCode.OK
    return handles


# ----- one raw exchange

def exchange(master: Master, data: bytes) -> tuple[Frames, bool]:
    return fuzzing.exchange(master.address, data)


def assert_only_errors(master: Master, data: bytes) -> None:
    fuzzing.assert_only_errors(master.address, data)


def call(master: Master, request: Any) -> tuple[FrameHeader, bytes]:
    """One well-formed call on its own connection; its single reply."""
    frames, reset = exchange(master, call_frame(7, codec.encode(request)))
    assert not reset and len(frames) == 1, frames
    header, payload = frames[0]
    assert (header.op, header.request_id) == (FrameOp.CALL_REPLY, 7)
    return header, payload


# ----- framing

@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(master: Master, data: bytes) -> None:
    assert_only_errors(master, data)


@FUZZ
@given(request_id=st.integers(0, 2**64 - 1), length=st.integers(0, 2**64 - 1),
       status=st.integers(-(2**31), 2**31 - 1), cut=st.integers(0, HEADER_SIZE - 1))
def test_truncated_headers_get_no_reply(master: Master, request_id: int, length: int,
                                        status: int, cut: int) -> None:
    header = pack_header(FrameOp.CALL, request_id, length=length, status=status)
    frames, _ = exchange(master, header[:cut])
    assert frames == []


@FUZZ
@given(op=st.integers(0, 255).filter(lambda op: op != FrameOp.CALL),
       length=st.integers(0, 4096))
def test_frames_other_than_call_end_the_connection(master: Master, op: int,
                                                   length: int) -> None:
    header = pack_header(FrameOp.CALL, 1, length=length)
    frames, _ = exchange(master, header[:3] + bytes([op]) + header[4:] + b"\0" * length)
    assert len(frames) == 1
    assert_error_frame(*frames[0])
    assert frames[0][0].status == ErrorCode.INVALID_PARAMS


@FUZZ
@given(length=st.integers(MAX_CALL_BYTES + 1, 2**64 - 1), tail=st.binary(max_size=64))
def test_a_declared_length_over_the_limit_is_refused(master: Master, length: int,
                                                     tail: bytes) -> None:
    frames, _ = exchange(master, pack_header(FrameOp.CALL, 3, length=length) + tail)
    assert len(frames) == 1
    assert_error_frame(*frames[0])
    assert b"exceeds the limit" in frames[0][1]


@FUZZ
@given(length=st.integers(1, MAX_CALL_BYTES), sent=st.binary(max_size=256))
def test_a_payload_cut_short_ends_with_the_connection(master: Master, length: int,
                                                      sent: bytes) -> None:
    sent = sent[: length - 1]
    frames, _ = exchange(master, pack_header(FrameOp.CALL, 4, length=length) + sent)
    assert frames == []


# ----- payloads

def classify(body: bytes) -> bool:
    """Whether ``body`` is a request the master could decode."""
    try:
        codec.decode(body, m.MasterRequest)  # type: ignore[arg-type]
    except KvcakeError:
        return False
    return True


def assert_answered_and_still_open(master: Master, body: bytes) -> FrameHeader:
    """``body`` as call 1, then a good GetStats as call 2 on the same connection."""
    return assert_rpc_answers(master.address, body, codec.encode(m.GetStats()), classify(body))


@FUZZ
@given(body=st.binary(max_size=300))
def test_garbage_payloads_are_answered(master: Master, body: bytes) -> None:
    assert_answered_and_still_open(master, body)


TAGS = ["PutStart", "PutEnd", "PutRevoke", "GetReplicas", "Exist", "DescribeSegments",
        "Heartbeat", "MountSegment", "GetStats", "Nope", "", "putstart"]  # no removes
FIELDS = ["client_id", "keys", "sizes", "config", "descriptor", "segment_ids", "host_id",
          "force", "disk_capacity", "control_endpoint"]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
MESSAGES = st.builds(lambda tag, fields: {"type": tag, **fields}, st.sampled_from(TAGS),
                     st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4))


@FUZZ
@given(message=st.one_of(MESSAGES, VALUES))
@example(message={"type": "PutStart", "keys": 5})
@example(message={"type": "PutStart", "client_id": "fuzzer", "keys": ["k"], "sizes": ["1"]})
@example(message={"type": "GetReplicas", "keys": [None]})
@example(message={"type": "MountSegment", "client_id": "fuzzer", "descriptor": {}})
@example(message=["PutStart", "fuzzer", ["k"], [1]])
def test_msgpack_of_the_wrong_shape_is_answered(master: Master, message: Any) -> None:
    assert_answered_and_still_open(master, msgspec.msgpack.encode(message))


# ----- well-formed requests with values at and past the edges

def invalid_key(key: str) -> bool:
    return not key or len(key.encode()) > 4096


BAD_KEYS = st.sampled_from(["", LONG_KEY, "\u00e9" * 2049])
ANY_KEYS = BAD_KEYS | st.text(min_size=1, max_size=12).filter(lambda k: k != PRE_KEY)
BAD_SIZES = st.integers(-(2**63), 0) | st.integers(POOL + 1, 2**64 - 1)
BAD_REPLICAS = st.integers(-(2**63), 0) | st.integers(17, 2**64 - 1)


@st.composite
def bad_put_starts(draw: st.DrawFn) -> m.PutStart:
    """Every key is refused: a bad key, a bad size, or a bad replica_num for all."""
    replica_num = draw(BAD_REPLICAS | st.integers(1, 16))
    sizes = BAD_SIZES if 1 <= replica_num <= 16 else BAD_SIZES | st.integers(1, POOL)
    keys = draw(st.lists(ANY_KEYS, max_size=5))
    count = len(keys) if draw(st.booleans()) else draw(st.integers(0, 6))
    return m.PutStart("fuzzer", keys, draw(st.lists(sizes, min_size=count, max_size=count)),
                      ReplicateConfig(replica_num=replica_num,
                                      preferred_segment=draw(st.sampled_from(["", "pool"]))))


@FUZZ
@given(request=bad_put_starts())
@example(request=m.PutStart("fuzzer", ["k"], [64], ReplicateConfig(replica_num=0)))
@example(request=m.PutStart("fuzzer", ["k", ""], [-1, 64]))
@example(request=m.PutStart("fuzzer", ["k"], [2**64 - 1]))
@example(request=m.PutStart("fuzzer", [LONG_KEY], [64]))
@example(request=m.PutStart("fuzzer", ["a", "b"], [64]))
def test_bad_put_starts_are_refused_per_key_or_whole(master: Master,
                                                     request: m.PutStart) -> None:
    header, payload = call(master, request)
    if len(request.keys) != len(request.sizes):
        assert_error_frame(header, payload)
        assert b"keys but" in payload
        return
    assert header.status == 0
    reply = codec.decode(payload, m.PutStartReply)
    assert len(reply.codes) == len(request.keys)
    assert all(code < 0 for code in reply.codes), reply.codes
    assert reply.replicas == [[] for _ in request.keys]


@FUZZ
@given(keys=st.lists(ANY_KEYS | st.just(PRE_KEY), max_size=5),
       kind=st.sampled_from([m.PutEnd, m.PutRevoke]),
       client_id=st.sampled_from(["fuzzer", "", "ghost", "owner"]))
def test_ending_or_revoking_others_puts_is_refused(master: Master, keys: list[str],
                                                   kind: type[m.PutEnd | m.PutRevoke],
                                                   client_id: str) -> None:
    header, payload = call(master, kind(client_id, keys))
    assert header.status == 0
    codes = codec.decode(payload, m.CodesReply).codes
    assert len(codes) == len(keys)
    for key, code in zip(keys, codes, strict=True):
        # the owner ending its own finished put again is a no-op (a retry after a failover)
        own_end = kind is m.PutEnd and client_id == "owner" and key == PRE_KEY
        assert code == 0 if own_end else code < 0, (key, code)


@FUZZ
@given(keys=st.lists(ANY_KEYS, max_size=5), get=st.booleans())
def test_reads_of_bad_or_missing_keys_find_nothing(master: Master, keys: list[str],
                                                   get: bool) -> None:
    header, payload = call(master, m.GetReplicas(keys) if get else m.Exist(keys))
    assert header.status == 0
    if get:
        reply = codec.decode(payload, m.GetReplicasReply)
        assert all(code < 0 for code in reply.codes) and len(reply.codes) == len(keys)
        assert reply.replicas == [[] for _ in keys]
    else:
        codes = codec.decode(payload, m.CodesReply).codes
        assert codes == [int(ErrorCode.INVALID_KEY) if invalid_key(k) else 0 for k in keys]


@FUZZ
@given(name=st.sampled_from(["", "ok-name"]), size=st.integers(-(2**63), 4095),
       endpoint=st.sampled_from(["", "127.0.0.1:1"]), disk=st.integers(-(2**63), 2**63),
       client_id=st.sampled_from(["fuzzer", "ghost"]))
def test_bad_mounts_are_refused(master: Master, name: str, size: int, endpoint: str,
                                disk: int, client_id: str) -> None:
    descriptor = SegmentDescriptor(name, 0, size, "host-fuzzer", endpoint, "", 0)
    header, payload = call(master, m.MountSegment(client_id, descriptor, disk))
    assert_error_frame(header, payload)


# ----- lists past their documented maximum

TOO_MANY = m.MAX_KEYS_PER_CALL + 1


@pytest.mark.parametrize("request_", [
    m.Exist(["k"] * TOO_MANY),
    m.GetReplicas([PRE_KEY] * TOO_MANY),
    m.PutStart("fuzzer", ["k"] * TOO_MANY, [1] * TOO_MANY),
    m.PutEnd("owner", [PRE_KEY] * TOO_MANY),
    m.Remove([PRE_KEY] * TOO_MANY, force=True, client_id="owner"),
    m.DescribeSegments(list(range(m.MAX_SEGMENT_IDS + 1))),
], ids=lambda r: type(r).__name__)
def test_a_list_past_its_maximum_is_refused_whole_and_the_master_serves_on(
        master: Master, request_: Any) -> None:
    """Refused while decoding (the message names the limit); the owner's over-long remove
    deletes nothing, which the last test below checks."""
    frames, reset = fuzzing.exchange(master.address, call_frame(1, codec.encode(request_))
                                     + call_frame(2, codec.encode(m.GetStats())), replies=2)
    assert not reset and [h.request_id for h, _ in frames] == [1, 2]
    (header, payload), (after, _) = frames
    assert header.status == ErrorCode.INVALID_PARAMS
    limit = m.MAX_SEGMENT_IDS if isinstance(request_, m.DescribeSegments) else TOO_MANY - 1
    assert f"length <= {limit}".encode() in payload, payload
    assert after.status == 0


@pytest.mark.parametrize("reply", [
    m.CodesReply([0] * TOO_MANY),
    m.PutStartReply([0], [[ReplicaHandle(1, 0)] * (m.MAX_HANDLES + 1)]),
    m.GetReplicasReply(1.0, [0] * TOO_MANY, [1] * TOO_MANY, [[]] * TOO_MANY),
    m.DescribeSegmentsReply([None] * (m.MAX_SEGMENT_IDS + 1)),
], ids=lambda r: type(r).__name__)
def test_replies_are_bounded_like_their_requests(reply: Any) -> None:
    with pytest.raises(KvcakeError, match="length <="):
        codec.decode(codec.encode(reply), type(reply))


# ----- afterwards

def test_after_fuzzing_the_server_serves_and_lost_nothing(master: Master) -> None:
    async def real_client_call() -> m.GetReplicasReply:
        client = RpcClient(f"{master.address[0]}:{master.address[1]}", TIMEOUT_S)
        try:
            return codec.decode(await client.call(codec.encode(m.GetReplicas([PRE_KEY]))),
                                m.GetReplicasReply)
        finally:
            client.close()

    reply = master.thread.run(real_client_call(), TIMEOUT_S)
    assert (reply.codes, reply.sizes, reply.replicas) == ([0], [PRE_SIZE], [master.pre_handles])
    stats = master.on_loop(master.server.service.stats)
    assert (stats.num_keys, stats.num_segments, stats.used_bytes) == (1, 1, 12352)
    master.on_loop(master.server.service.check_integrity)
