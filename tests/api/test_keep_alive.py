"""An idle keep-alive connection outlives clients' own idle pools, so the client always
closes it first. A benchmark client (aiohttp underneath) once reused a connection just as the
server closed it after uvicorn's default 5 s and lost that request ("Can not write request
body"); aiohttp keeps idle connections 15 s, httpx 5 s."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Receive, Scope, Send

from kvcake.api.server import KEEP_ALIVE_S, ApiServer
from kvcake.common.errors import InvalidParamsError
from kvcake.conductor.config import ConductorServerConfig

aiohttp = pytest.importorskip("aiohttp")

OLD_KEEP_ALIVE_S = 5.0  # uvicorn's default, what the API used to close idle connections at
CLIENT_POOL_S = 15.0  # aiohttp's default keepalive_timeout


async def _client_port(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the client's port: the same port means the same connection."""
    body = str(scope["client"][1]).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _ports_across_an_idle_gap(idle_s: float) -> tuple[str, str]:
    server = ApiServer(_client_port, "127.0.0.1", 0)
    address = await server.startup()
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=CLIENT_POOL_S)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"http://{address}/v1/completions", data=b"{}") as first:
                before = await first.text()
            await asyncio.sleep(idle_s)  # idle, in the client's pool
            async with session.post(f"http://{address}/v1/completions", data=b"{}") as second:
                after = await second.text()
    finally:
        await server.shutdown()
    return before, after


def test_a_connection_idle_past_the_old_timeout_is_reused_without_error() -> None:
    assert OLD_KEEP_ALIVE_S < CLIENT_POOL_S < KEEP_ALIVE_S
    before, after = asyncio.run(_ports_across_an_idle_gap(OLD_KEEP_ALIVE_S + 1.0))
    assert before == after  # the same connection: the server kept it open


def test_keep_alive_is_configurable_and_checked() -> None:
    assert ConductorServerConfig().keep_alive_s == KEEP_ALIVE_S
    assert ConductorServerConfig(keep_alive_s=120).keep_alive_s == 120
    with pytest.raises(InvalidParamsError, match="keep_alive_s must be >= 1, got 0"):
        ConductorServerConfig(keep_alive_s=0)
