"""A request routed to an instance that just died is a 503 with ``Retry-After`` (try again:
the next attempt goes to a live instance), never a 502 — whether the Conductor had already
dropped it or its RPC connection is refused first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flights import first_output_error
from kvcake.api.errors import RETRY_AFTER_S, ApiError
from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.rpc import RpcClient
from kvcake.common.sockets import free_port
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.flight import InstanceLostError
from kvcake.conductor.server import ConductorServer
from kvcake.wire.conductor import Register, Snapshot

TIMEOUT_S = 5.0


@pytest.fixture
def conductor() -> Iterator[tuple[LoopThread, ConductorServer]]:
    thread = LoopThread("instance-lost-test")
    server = ConductorServer(ConductorServerConfig(rpc_port=0), ConductorConfig())
    endpoint = thread.run(server.startup(), TIMEOUT_S)
    try:
        _register_dead_instance(thread, endpoint)
        yield thread, server
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()


def _register_dead_instance(thread: LoopThread, endpoint: str) -> None:
    """A colocated instance whose RPC port no longer has anyone listening (it was killed
    before the Conductor noticed its silence)."""
    dead = f"127.0.0.1:{free_port()}"
    message = Register("both-0", "both", dead, "m", "fp", 16, 64, 256, None, Snapshot(0, []))

    async def register() -> None:
        client = RpcClient(endpoint, TIMEOUT_S)
        try:
            await client.call(codec.encode(message))
        finally:
            client.close()
    thread.run(register(), TIMEOUT_S)


def test_a_request_on_an_instance_that_just_died_is_a_503(
        conductor: tuple[LoopThread, ConductorServer]) -> None:
    thread, server = conductor
    error = first_output_error(thread, server, "r1", 20, TIMEOUT_S)
    assert isinstance(error, InstanceLostError), error
    assert error.status == 503 and error.instance_id == "both-0"


def test_the_api_answers_an_instance_lost_with_503_and_retry_after() -> None:
    response = ApiError.of(InstanceLostError("decode-0", "r1")).response()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert b"instance decode-0 serving request r1 stopped responding" in response.body


def test_other_errors_carry_no_retry_after() -> None:
    assert "Retry-After" not in ApiError(400, "bad").response().headers
