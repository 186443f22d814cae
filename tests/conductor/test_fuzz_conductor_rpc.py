"""Hostile bytes and messages against a live Conductor RPC server with no workers: every call
is answered (an error naming the fault, never an internal one), the connection survives a bad
request, and what the server holds stays consistent with its service after every message."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import (
    INTS,
    Address,
    address_of,
    assert_only_errors,
    assert_rpc_answers,
    call_frame,
    decodes,
    exchange,
    fuzz_settings,
    open_partial_connections,
    rss_bytes,
    wait_until,
    wire_values,
)
from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode
from kvcake.common.frames import FrameOp, pack_header
from kvcake.common.hashing import DIGEST_SIZE
from kvcake.common.rpc import MAX_CALL_BYTES, RpcClient
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.server import ConductorServer
from kvcake.wire.conductor import (
    MAX_BLOCK_HASHES,
    MAX_EVENTS,
    MAX_OUTPUTS,
    MAX_SAMPLES,
    ROLES,
    ConductorRequest,
    DecodeSample,
    InstanceLoad,
    KVEvent,
    Outputs,
    PrefillDone,
    Register,
    Report,
    ReportReply,
    Snapshot,
)
from kvcake.wire.output import MAX_TOKENS, MAX_TOP_LOGPROBS, TokenOutput

T = TypeVar("T")
TIMEOUT_S = 5.0
IDS = ["i1", "i2", "store", ""]
IDLE = InstanceLoad(0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Conductor:
    thread: LoopThread
    server: ConductorServer
    address: Address

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return fn(*args)
        return self.thread.run(call(), TIMEOUT_S)

    def assert_consistent(self) -> None:
        """The instances the RPC server holds handles for are exactly the service's."""
        def check() -> None:
            assert set(self.server.instances) == set(self.server.service.instances)
            self.server.service.check_integrity()
        self.on_loop(check)


@pytest.fixture(scope="module")
def conductor() -> Iterator[Conductor]:
    thread = LoopThread("fuzz-conductor")
    server = ConductorServer(ConductorServerConfig(rpc_port=0, instance_ttl_s=3600.0),
                             ConductorConfig())
    try:
        endpoint = thread.run(server.startup(), TIMEOUT_S)
        yield Conductor(thread, server, address_of(endpoint))
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()




GOOD = codec.encode(Report("nobody", IDLE))


def assert_answered(conductor: Conductor, body: bytes) -> None:
    assert_rpc_answers(conductor.address, body, GOOD, decodes(body, ConductorRequest))
    conductor.assert_consistent()


# ----- framing and payloads

@fuzz_settings(100)
@given(data=st.binary(max_size=400))
def test_random_bytes(conductor: Conductor, data: bytes) -> None:
    assert_only_errors(conductor.address, data)


@fuzz_settings(40)
@given(op=st.sampled_from([op for op in FrameOp if op is not FrameOp.CALL]),
       length=st.integers(0, 64) | st.integers(MAX_CALL_BYTES + 1, 2**64 - 1))
def test_frames_other_than_calls_and_huge_calls_end_the_connection(
        conductor: Conductor, op: FrameOp, length: int) -> None:
    frames, _ = exchange(conductor.address, pack_header(op, 1, length=length))
    if op is FrameOp.READ and length <= MAX_CALL_BYTES:
        assert len(frames) == 1  # no payload follows a READ: it is refused at once
    assert len(frames) <= 1
    for header, payload in frames:
        assert header.status == ErrorCode.INVALID_PARAMS, payload


@fuzz_settings(100)
@given(body=st.binary(max_size=300))
def test_garbage_payloads_are_answered(conductor: Conductor, body: bytes) -> None:
    assert_answered(conductor, body)


TAGS = ["Register", "Report", "Outputs", "PrefillDone", "ReportReply", "Snapshot", "register",
        "", "Nope"]
FIELDS = ["instance_id", "role", "endpoint", "block_size", "num_blocks", "snapshot", "load",
          "events", "outputs", "output", "error", "kv_region", "prefill_samples"]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
MESSAGES = st.builds(lambda tag, fields: {"type": tag, **fields}, st.sampled_from(TAGS),
                     st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5))


@fuzz_settings(150)
@given(message=st.one_of(MESSAGES, VALUES))
@example(message={"type": "Report", "instance_id": "i1", "load": [0, 0, 0, 0, 0, 0]})
@example(message={"type": "Outputs", "instance_id": "i1", "outputs": [["r", [1], [0.0]]]})
@example(message={"type": "Register"})
def test_msgpack_of_the_wrong_shape_is_answered(conductor: Conductor, message: Any) -> None:
    assert_answered(conductor, msgspec.msgpack.encode(message))


# ----- well-typed messages with values at and past the edges

HASHES = st.lists(st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)
                  | st.binary(max_size=40), max_size=4)
INSTANCE_IDS = st.sampled_from(IDS) | st.text(max_size=4)


@st.composite
def registers(draw: st.DrawFn) -> dict[str, Any]:
    """A Register with any values, its ids, roles and sizes mostly near the real ones."""
    return draw(wire_values(Register)) | {
        "instance_id": draw(INSTANCE_IDS),
        "role": draw(st.sampled_from(ROLES) | st.text(max_size=6)),
        "endpoint": "127.0.0.1:1",  # never dialled: nothing is routed here
        "fingerprint": draw(st.sampled_from(["fp", "other"])),
        "block_size": draw(st.sampled_from([16, 0, -16, 32])),
        "snapshot": {"seq": draw(st.integers(-3, 3) | INTS), "block_hashes": draw(HASHES)}}


def register(instance_id: str, role: str = "decode", seq: int = 0,
             hashes: tuple[bytes, ...] = ()) -> dict[str, Any]:
    message = Register(instance_id, role, "127.0.0.1:1", "m", "fp", 16, 8, 64, None,
                       Snapshot(seq, list(hashes)))
    return msgspec.to_builtins(message, builtin_types=(bytes,))


@fuzz_settings(150)
@given(request=registers())
@example(request=register("i1"))
@example(request=register("i1", role="bogus"))
@example(request=register("i1", seq=-1))
@example(request=register("i1", hashes=(b"short",)))
def test_registers_are_answered_and_keep_the_server_consistent(
        conductor: Conductor, request: dict[str, Any]) -> None:
    header = assert_rpc_answers(conductor.address, msgspec.msgpack.encode(request), GOOD,
                                decodes=True)
    # a live instance's id is taken: a second register under it is refused whole
    assert header.status in (0, ErrorCode.INVALID_PARAMS, ErrorCode.OBJECT_ALREADY_EXISTS)
    conductor.assert_consistent()


def report(instance_id: str, **fields: Any) -> dict[str, Any]:
    return msgspec.to_builtins(Report(instance_id, IDLE)) | fields


@fuzz_settings(150)
@given(request=wire_values(Report | Outputs | PrefillDone), instance_id=st.sampled_from(IDS))
@example(request=report("", events=[[1, "stored", [b"x" * DIGEST_SIZE]]]), instance_id="i1")
@example(request=report("", events=[[5, "stored", []]], snapshot=[-1, []]), instance_id="i1")
@example(request=report("", load=[0, 0, 0, 0, 9, 1]), instance_id="i1")
def test_reports_and_outputs_are_answered_and_keep_the_server_consistent(
        conductor: Conductor, request: dict[str, Any], instance_id: str) -> None:
    exchange(conductor.address, call_frame(1, msgspec.msgpack.encode(register(instance_id,
                                                                                "both"))))
    body = msgspec.msgpack.encode(request | {"instance_id": instance_id})
    header = assert_rpc_answers(conductor.address, body, GOOD,
                                decodes=decodes(body, ConductorRequest))
    assert header.status in (0, ErrorCode.INVALID_PARAMS)
    conductor.assert_consistent()


# ----- memory

def test_a_flood_of_calls_declaring_the_largest_payload_costs_no_memory(
        conductor: Conductor) -> None:
    """Thirty connections each declare a call of MAX_CALL_BYTES (64 MiB), then wait."""
    def live() -> int:
        return conductor.on_loop(lambda: len(conductor.server._rpc._live))

    partial = pack_header(FrameOp.CALL, 1, length=MAX_CALL_BYTES) + b"\x81"
    wait_until(lambda: live() == 0)
    before = rss_bytes()
    with open_partial_connections(conductor.address, partial, 30):
        wait_until(lambda: live() == 30)
        grown = rss_bytes() - before
    assert grown < 32 << 20, f"RSS grew by {grown >> 20} MiB for payloads never sent"
    wait_until(lambda: live() == 0)


# ----- lists past their documented maximum

def _output(**fields: Any) -> TokenOutput:
    return msgspec.structs.replace(TokenOutput("r", [1], [0.0], None, 1, 0, 0), **fields)


OVER_LONG = [
    Register("i1", "both", "127.0.0.1:1", "m", "fp", 16, 8, 64, None,
             Snapshot(0, [b""] * (MAX_BLOCK_HASHES + 1))),
    Report("i1", IDLE, [KVEvent(1, "stored", [])] * (MAX_EVENTS + 1)),
    Report("i1", IDLE, [KVEvent(1, "stored", [b""] * (MAX_BLOCK_HASHES + 1))]),
    Report("i1", IDLE, decode_samples=[DecodeSample(1, 1, 0.1)] * (MAX_SAMPLES + 1)),
    Outputs("i1", [_output()] * (MAX_OUTPUTS + 1)),
    Outputs("i1", [_output(token_ids=[1] * (MAX_TOKENS + 1))]),
    PrefillDone("i1", _output(top_logprobs=[[(1, 0.0)] * (MAX_TOP_LOGPROBS + 1)])),
]


@pytest.mark.parametrize("message", OVER_LONG, ids=lambda m: type(m).__name__)
def test_a_list_past_its_maximum_is_refused_and_the_conductor_serves_on(
        conductor: Conductor, message: Any) -> None:
    body = codec.encode(message)
    assert not decodes(body, ConductorRequest)
    assert_rpc_answers(conductor.address, body, GOOD, decodes=False)  # INVALID_PARAMS
    conductor.assert_consistent()


# ----- afterwards

def test_after_fuzzing_a_real_instance_registers_and_reports(conductor: Conductor) -> None:
    async def register_and_report() -> ReportReply:
        client = RpcClient(f"{conductor.address[0]}:{conductor.address[1]}", TIMEOUT_S)
        try:
            await client.call(codec.encode(Register(
                "real", "both", "127.0.0.1:1", "m", "fp", 16, 8, 64, None, Snapshot(0, []))))
            return codec.decode(await client.call(codec.encode(Report("real", IDLE))),
                                ReportReply)
        finally:
            client.close()

    assert conductor.thread.run(register_and_report(), TIMEOUT_S) == ReportReply()
    conductor.assert_consistent()


def test_a_bad_register_of_a_known_instance_leaves_no_half_registered_instance(
        conductor: Conductor) -> None:
    """Found by the fuzzer: the handle was dropped before the role was checked, so the
    service kept routing to an instance the server could no longer reach or sweep. Now the
    live instance's id is not taken over at all: every later register under it, good or bad,
    is refused and the first stays whole."""
    for body in (register("again"), register("again", role="bogus"), register("again"),
                 register("again", hashes=(b"short",))):
        exchange(conductor.address, call_frame(1, msgspec.msgpack.encode(body)))
        conductor.assert_consistent()
    role = conductor.on_loop(lambda: conductor.server.service.instances["again"].role)
    assert role == "decode", "the first register's instance must be left as it was"
