"""Hostile bytes and messages against a live worker RPC server (a colocated instance of the
tiny random model; its Conductor is never reachable): every call is answered, an error names
the fault, and the engine thread survives: a call that needs it is still served afterwards.

It lives beside the engine tests for their tiny-model fixture.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import (
    Address,
    address_of,
    assert_only_errors,
    assert_rpc_answers,
    call_frame,
    decodes,
    exchange,
    fuzz_settings,
    wait_until,
    wire_values,
)
from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode, InvalidParamsError
from kvcake.common.frames import FrameOp, pack_header
from kvcake.common.rpc import MAX_CALL_BYTES
from kvcake.engine.config import EngineConfig
from kvcake.wire.output import MAX_TOP_LOGPROBS
from kvcake.wire.sampling import MAX_STOP_TOKEN_IDS, MAX_STOPS, SamplingParams
from kvcake.wire.worker import (
    MAX_BLOCK_IDS,
    MAX_PROMPT_TOKENS,
    Abort,
    Ack,
    Commit,
    Prefill,
    Reserve,
    WorkerRequest,
)
from kvcake.worker.config import WorkerConfig
from kvcake.worker.server import WorkerServer

TIMEOUT_S = 10.0
GOOD = codec.encode(Abort("nobody"))  # served on the engine thread: proves it still runs


@dataclass(frozen=True)
class Worker:
    thread: LoopThread
    server: WorkerServer
    address: Address


@pytest.fixture
def worker(tiny_model_dir: Callable[..., Path]) -> Iterator[Worker]:
    config = WorkerConfig(role="both", conductor="127.0.0.1:1", profile=False, report_s=60.0)
    engine = EngineConfig(model=str(tiny_model_dir()), dtype="float32", kv_cache_bytes=1 << 20,
                          max_model_len=96, max_num_seqs=8)
    thread = LoopThread("fuzz-worker")

    async def start() -> WorkerServer:
        server = WorkerServer(config, engine)
        await server.startup()
        return server

    server = thread.run(start(), 60.0)
    try:
        yield Worker(thread, server, address_of(server.endpoint))
    finally:
        thread.run(server.shutdown(), 60.0)
        thread.stop()




def assert_served_after(worker: Worker, body: bytes) -> int:
    header = assert_rpc_answers(worker.address, body, GOOD, decodes(body, WorkerRequest))
    assert header.status in (0, ErrorCode.INVALID_PARAMS), header
    return header.status


SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
TAGS = st.sampled_from(["Prefill", "Reserve", "Commit", "Release", "Abort", "Reserved", "Ack",
                        "", "prefill"])
MESSAGES = st.builds(lambda tag, fields: {"type": tag, **fields}, TAGS,
                     st.dictionaries(st.sampled_from(["request_id", "prompt_token_ids",
                                                      "params", "tenant", "target",
                                                      "num_prompt_tokens", "first_token"]),
                                     VALUES, max_size=5))


def test_framing_garbage_and_huge_lengths(worker: Worker) -> None:
    @fuzz_settings(60)
    @given(data=st.binary(max_size=300))
    def random_bytes(data: bytes) -> None:
        assert_only_errors(worker.address, data)

    @fuzz_settings(60)
    @given(body=st.binary(max_size=200) | st.one_of(MESSAGES, VALUES).map(msgspec.msgpack.encode))
    @example(body=msgspec.msgpack.encode({"type": "Reserve", "request_id": 1}))
    @example(body=b"")
    def garbage_payloads(body: bytes) -> None:
        assert_served_after(worker, body)

    random_bytes()
    garbage_payloads()
    for length in (MAX_CALL_BYTES + 1, 2**62, 2**64 - 1):
        frames, _ = exchange(worker.address, pack_header(FrameOp.CALL, 1, length=length))
        [(header, payload)] = frames
        assert header.status == ErrorCode.INVALID_PARAMS and b"exceeds the limit" in payload


def prefill(tokens: list[int], **params: Any) -> dict[str, Any]:
    message = Prefill("p", tokens, SamplingParams(max_tokens=2), "t")
    return msgspec.to_builtins(message) | {"params": msgspec.to_builtins(message.params)
                                           | params}


REQUEST_IDS = itertools.count()
EDGE_INTS = st.integers(0, 300) | st.sampled_from([2**31, 2**63 - 1, 2**64 - 1])


@st.composite
def prefills(draw: st.DrawFn) -> dict[str, Any]:
    """Prefills the decoder accepts, at every edge the engine must survive: any token ids,
    temperatures from 0 to infinity, huge top_k, seeds, stop ids and lengths."""
    params = {
        "max_tokens": draw(st.integers(1, 6) | st.sampled_from([2**31, 2**63 - 1])),
        "temperature": draw(st.floats(0.0, 2.0) | st.floats(0.0, 1e-3)
                            | st.sampled_from([1e-300, 5e-324, 1e308, float("inf")])),
        "top_p": draw(st.floats(0.0, 1.0, exclude_min=True) | st.just(5e-324)),
        "top_k": draw(st.sampled_from([-1, 0, 1]) | EDGE_INTS),
        "min_p": draw(st.floats(0.0, 1.0)),
        "seed": draw(st.none() | st.integers(-(2**63), 2**64 - 1)),
        "stop": draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        "stop_token_ids": draw(st.lists(EDGE_INTS, max_size=3)),
        "ignore_eos": draw(st.booleans()),
        "logprobs": draw(st.none() | st.integers(0, 25)),
    }
    vocabulary = st.integers(0, 255)
    tokens = draw(st.lists(vocabulary, min_size=1, max_size=90)
                  | st.lists(vocabulary | EDGE_INTS | st.integers(-2, -1), max_size=100))
    return prefill(tokens) | {"request_id": f"p{next(REQUEST_IDS)}", "params": params}


def test_any_valued_requests_leave_the_engine_serving(worker: Worker) -> None:
    @fuzz_settings(150)
    @given(message=st.one_of(wire_values(WorkerRequest), prefills(), prefills()))
    @example(message=prefill([300]))  # outside the vocabulary
    @example(message=prefill([1] * 200))  # longer than max_model_len
    @example(message=prefill([]))
    @example(message=prefill([1, 2], seed=2**64 - 1, top_k=2**63, stop_token_ids=[2**64 - 1]))
    @example(message=prefill([1, 2], max_tokens=2**63, temperature=1e308, logprobs=2**31))
    @example(message=msgspec.to_builtins(Reserve("r", -1)))
    @example(message=msgspec.to_builtins(Reserve("r", 2**63)))
    def requests(message: dict[str, Any]) -> None:
        assert_served_after(worker, msgspec.msgpack.encode(message))

    requests()
    assert_engine_finishes_everything(worker)


def assert_engine_finishes_everything(worker: Worker) -> None:
    """Every accepted request runs to its end on an engine thread that is still alive."""
    loop = worker.server._loop
    assert loop is not None

    def idle() -> bool:
        assert loop._thread.is_alive(), "the engine thread died"
        return not loop.call(loop.core.has_unfinished).result(TIMEOUT_S)
    wait_until(idle, timeout_s=60.0)


def test_after_fuzzing_a_prefill_is_answered_and_aborted(worker: Worker) -> None:
    body = codec.encode(Prefill("real", [5, 6, 7], SamplingParams(max_tokens=4), "t"))
    frames, _ = exchange(worker.address, call_frame(1, body), replies=1)
    [(header, payload)] = frames
    assert header.status == 0 and codec.decode(payload, Ack) == Ack()
    assert_served_after(worker, codec.encode(Abort("real")))


def test_a_list_past_its_maximum_is_refused_and_the_instance_serves_on(worker: Worker) -> None:
    params = SamplingParams(max_tokens=4)
    over_long = [
        Prefill("p", [1] * (MAX_PROMPT_TOKENS + 1), params, "t"),
        Prefill("p", [1], params, "t", None, [0] * (MAX_BLOCK_IDS + 1)),
        Prefill("p", [1], params, "t", None, [], [b""] * (MAX_BLOCK_IDS + 1)),
        Commit("c", [1] * (MAX_PROMPT_TOKENS + 1), 1, 0.0, params, "t"),
        Commit("c", [1], 1, 0.0, params, "t", [(1, 0.0)] * (MAX_TOP_LOGPROBS + 1)),
    ]
    bodies = [codec.encode(message) for message in over_long]
    for field, limit in (("stop", MAX_STOPS), ("stop_token_ids", MAX_STOP_TOKEN_IDS)):
        message = msgspec.to_builtins(Prefill("p", [1], params, "t"))
        message["params"][field] = ["x" if field == "stop" else 1] * (limit + 1)
        bodies.append(msgspec.msgpack.encode(message))
    for body in bodies:
        assert not decodes(body, WorkerRequest)
        assert assert_served_after(worker, body) == ErrorCode.INVALID_PARAMS
    assert_engine_finishes_everything(worker)


def test_sampling_params_built_in_process_keep_the_same_bounds() -> None:
    with pytest.raises(InvalidParamsError, match="stop takes at most 64 entries, got 65"):
        SamplingParams(stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(InvalidParamsError, match="stop_token_ids takes at most 1024 entries"):
        SamplingParams(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1))
