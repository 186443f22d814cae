"""A colocated instance's request leaves its prefill queue with its first output, and the
Conductor times that prefill against what it predicted (the drain fit, the closing line)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.rpc import RpcClient, RpcServer
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.server import ConductorServer
from kvcake.wire.conductor import Outputs, Register, Snapshot
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams
from kvcake.wire.worker import Ack

TIMEOUT_S = 5.0
PROMPT = list(range(40))


@pytest.fixture
def conductor() -> Iterator[tuple[LoopThread, ConductorServer, RpcClient]]:
    """A Conductor with one colocated instance that accepts every call and sends nothing
    by itself; the test speaks for it through the returned client."""
    thread = LoopThread("prefill-queue-test")
    server = ConductorServer(ConductorServerConfig(rpc_port=0), ConductorConfig())
    instance = RpcServer(lambda frame: codec.encode(Ack()), "127.0.0.1", 0)
    endpoint = thread.run(server.startup(), TIMEOUT_S)
    address = thread.run(instance.startup(), TIMEOUT_S)
    client = RpcClient(endpoint, TIMEOUT_S)
    thread.run(client.call(codec.encode(Register(
        "both-0", "both", address, "m", "fp", 16, 64, 256, None, Snapshot(0, [])))), TIMEOUT_S)
    try:
        yield thread, server, client
    finally:
        client.close()
        thread.run(instance.shutdown(), TIMEOUT_S)
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()


def test_a_colocated_request_leaves_the_queue_with_its_first_output(
        conductor: tuple[LoopThread, ConductorServer, RpcClient]) -> None:
    thread, server, client = conductor

    async def scenario() -> None:
        flight = await server.submit("r1", PROMPT, SamplingParams(max_tokens=4), "t")
        try:
            assert server.service.prefilling("r1")
            assert server.service.stats().instances["both-0"].queue_s > 0
            first = TokenOutput("r1", [7], [0.0], None, len(PROMPT), 0, 0)
            await client.call(codec.encode(Outputs("both-0", [first])))
            assert (await flight.next_output(TIMEOUT_S)).token_ids == [7]
            assert not server.service.prefilling("r1")  # decoding now, no longer queued
            assert server.service.stats().instances["both-0"].queue_s == 0
            second = TokenOutput("r1", [8], [0.0], None, len(PROMPT), 0, 0)
            await client.call(codec.encode(Outputs("both-0", [second])))  # no second end
            assert (await flight.next_output(TIMEOUT_S)).token_ids == [8]
        finally:
            await server.end(flight)

    thread.run(scenario(), TIMEOUT_S * 2)
    metrics = server.render_metrics()
    assert "kvcake_conductor_prefill_ends_total 1" in metrics
    assert 'kvcake_conductor_drain_factor{instance="both-0",part="queue"} 1' in metrics
    summary = server.metrics.prefill_summary(server.service.stats())
    assert summary.startswith("kvcake TTFT model: 1 prefills ended ")
    assert summary.endswith("drain (queue/own): both-0 1.00/1.00")
    assert server.metrics.pd_summary() == ""  # nothing went through P/D
