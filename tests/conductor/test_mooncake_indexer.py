"""Mooncake's indexer API on a real Conductor server: instances register over its RPC socket
with what they cache, and ``/query`` / ``/query_by_hash`` report each one's longest prefix in
Mooncake's shape; bad bodies are refused by name."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import prefix_block_hashes
from kvcake.common.rpc import RpcClient
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.indexer import (
    HashQuery,
    MooncakeIndexer,
    Query,
    Registration,
    Unregistration,
    decode_body,
    low64,
)
from kvcake.conductor.run import conductor_view
from kvcake.conductor.server import ConductorServer
from kvcake.wire.conductor import Register, Snapshot

TIMEOUT_S = 5.0
BLOCK = 16
TOKENS = list(range(1000, 1000 + 5 * BLOCK + 3))  # 5 full blocks and a partial one
SALT = b"fp/default"


class Harness:
    def __init__(self) -> None:
        self.thread = LoopThread("indexer-test")
        self.server = ConductorServer(ConductorServerConfig(rpc_port=0),
                                      ConductorConfig(block_size=BLOCK))
        self.endpoint = self.thread.run(self.server.startup(), TIMEOUT_S)
        self.indexer = MooncakeIndexer(conductor_view(self.server, "smollm2"))

    def register(self, instance_id: str, hashes: list[bytes]) -> None:
        message = Register(instance_id, "both", "127.0.0.1:1", "m", "fp", BLOCK, 64, 4096,
                           None, Snapshot(0, hashes))

        async def once() -> bytes:
            client = RpcClient(self.endpoint, TIMEOUT_S)
            try:
                return await client.call(codec.encode(message))
            finally:
                client.close()
        self.thread.run(once(), TIMEOUT_S)

    def run(self, call: Any) -> Any:
        async def answer() -> Any:
            result = call()
            return await result if asyncio.iscoroutine(result) else result
        return self.thread.run(answer(), TIMEOUT_S)

    def close(self) -> None:
        self.thread.run(self.indexer.close(), TIMEOUT_S)
        self.thread.run(self.server.shutdown(), TIMEOUT_S)
        self.thread.stop()


@pytest.fixture
def conductor() -> Iterator[Harness]:
    harness = Harness()
    try:
        hashes = prefix_block_hashes(TOKENS, BLOCK, SALT)
        harness.register("a", hashes[:4])
        harness.register("b", hashes[:1] + hashes[2:])  # a hole at block 1
        yield harness
    finally:
        harness.close()


def _matched(reply: dict[str, Any]) -> dict[str, int]:
    return {name: hit["longest_matched"] for name, hit in reply["instances"].items()}


def test_query_reports_each_instances_longest_prefix_in_mooncakes_shape(
        conductor: Harness) -> None:
    reply = conductor.run(lambda: conductor.indexer.query(
        Query("smollm2", BLOCK, TOKENS)))
    assert _matched(reply) == {"a": 4 * BLOCK, "b": BLOCK}
    assert reply["instances"]["a"] == {
        "longest_matched": 64, "gpu": 64, "dp": {"0": 64}, "cpu": 64, "disk": 64,
        "rank_matches": {"0": {"gpu": 64, "cpu": 64, "disk": 64}}}
    as_bytes = b"".join(t.to_bytes(4, "little") for t in TOKENS)  # Mooncake's bin form
    assert _matched(conductor.run(lambda: conductor.indexer.query(
        Query("smollm2", BLOCK, as_bytes, instance_id="b")))) == {"b": BLOCK}


def test_a_query_no_instance_can_hold_is_empty(conductor: Harness) -> None:
    for query in (Query("another-model", BLOCK, TOKENS), Query("smollm2", 32, TOKENS),
                  Query("smollm2", BLOCK, TOKENS, cache_salt="s")):
        assert conductor.run(lambda q=query: conductor.indexer.query(q)) == {"instances": {}}
    assert set(_matched(conductor.run(lambda: conductor.indexer.query(
        Query("smollm2", BLOCK, TOKENS, tenant_id="other")))).values()) == {0}


def test_query_by_hash_takes_digests_or_their_low64(conductor: Harness) -> None:
    hashes = prefix_block_hashes(TOKENS, BLOCK, SALT)
    by_hex = HashQuery("smollm2", seq_hashes=[h.hex() for h in hashes])
    assert _matched(conductor.run(lambda: conductor.indexer.query_by_hash(by_hex))) == \
        {"a": 4 * BLOCK, "b": BLOCK}
    by_int = HashQuery("smollm2", block_hash=[low64(h) for h in hashes[:3]])
    assert _matched(conductor.run(lambda: conductor.indexer.query_by_hash(by_int))) == \
        {"a": 3 * BLOCK, "b": BLOCK}
    with pytest.raises(InvalidParamsError, match="neither an integer nor hex"):
        conductor.run(lambda: conductor.indexer.query_by_hash(
            HashQuery("smollm2", seq_hashes=["zz"])))


def test_bodies_in_json_or_msgpack_and_unknown_fields_refused_by_name() -> None:
    query = {"model": "smollm2", "block_size": BLOCK, "token_ids": [1, 2]}
    assert decode_body(msgspec.json.encode(query), Query, msgpack=False).token_ids == [1, 2]
    assert decode_body(msgspec.msgpack.encode(query), Query, msgpack=True).block_size == BLOCK
    with pytest.raises(InvalidParamsError, match="unknown field `tokens`"):
        decode_body(msgspec.json.encode({**query, "tokens": []}), Query, msgpack=False)
    with pytest.raises(InvalidParamsError, match="Object missing required field `model`"):
        decode_body(b"{}", Query, msgpack=False)


def test_registrations_other_than_vllm_publishers_are_refused(conductor: Harness) -> None:
    mooncake = Registration("tcp://127.0.0.1:5557", "Mooncake", "m", "x", BLOCK)
    with pytest.raises(InvalidParamsError, match="kvcake indexes vLLM publishers"):
        conductor.run(lambda: conductor.indexer.register(mooncake))
    http = Registration("http://127.0.0.1:5557", "vLLM", "m", "x", BLOCK)
    with pytest.raises(InvalidParamsError, match=r"tcp:// or ipc://"):
        conductor.run(lambda: conductor.indexer.register(http))
    with pytest.raises(KeyError, match=r"service not found: x\|default\|0"):
        conductor.run(lambda: conductor.indexer.unregister(Unregistration("x")))
