"""The blocking RPC client against a real RPC server (on its own loop thread): calls, the
cluster token, errors the server answers, a server that closed the connection or is gone."""

from __future__ import annotations

import asyncio
import gc
import select
import threading
import warnings
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass

import pytest

from kvcake.common.aio import LoopThread
from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.blocking_rpc import BlockingRpcClient
from kvcake.common.errors import AuthenticationError, ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.rpc import RpcServer
from kvcake.common.sockets import free_port

TOKEN = "t0ken-" + "c" * 26
OTHER = "t0ken-" + "d" * 26


def _handler(payload: memoryview) -> bytes | Awaitable[bytes]:
    body = bytes(payload)
    if body == b"bad":
        raise InvalidParamsError("bad request")
    if body == b"slow":
        return _later()
    return body[::-1]


async def _later() -> bytes:
    await asyncio.sleep(1.0)
    return b"late"


@dataclass
class Server:
    thread: LoopThread
    auth: ClusterAuth
    port: int
    server: RpcServer | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = RpcServer(_handler, "127.0.0.1", self.port, self.auth)
        self.thread.run(self.server.startup())

    def stop(self) -> None:
        if self.server is not None:
            self.thread.run(self.server.shutdown())
            self.server = None


@pytest.fixture(params=[NO_AUTH, ClusterAuth(TOKEN)], ids=["open", "token"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    thread = LoopThread("test-rpc-server")
    running = Server(thread, request.param, free_port())
    running.start()
    try:
        yield running
    finally:
        running.stop()
        thread.stop()


def test_calls_are_answered_in_the_callers_thread(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    try:
        assert [client.call(b"abc%d" % i) for i in range(3)] == [b"0cba", b"1cba", b"2cba"]
        assert client.sent
    finally:
        client.close()


def test_a_client_that_polls_for_its_replies_gets_every_one(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth, spin_s=200e-6)
    try:
        assert [client.call(b"%03d" % i) for i in range(50)] == \
            [(b"%03d" % i)[::-1] for i in range(50)]
        assert client.call(b"slow") == b"late"  # long after the polling gave up
        assert client.call(b"abc") == b"cba"
    finally:
        client.close()


def test_a_request_sent_unanswered_gets_its_reply_when_the_next_call_reads(
        server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    replies: list[bytes | KvcakeError] = []
    try:
        client.send(b"abc", replies.append)
        client.send(b"bad", replies.append)
        assert client.call(b"xyz") == b"zyx"  # every earlier reply is handed over by then
        assert replies[0] == b"cba"
        assert isinstance(replies[1], InvalidParamsError)
        client.send(b"slow", replies.append)
        client.close()  # its reply has not come: the callback hears why
        assert isinstance(replies[2], KvcakeError) and replies[2].code is ErrorCode.RPC_FAIL
        client.send(b"later", replies.append)
        sock, _ = client._connection.socket()
        assert select.select([sock], [], [], 5.0)[0]  # its reply has arrived
        client.close()  # and is handed over, not lost
        assert replies[3] == b"retal"
        assert client.call(b"again") == b"niaga"
    finally:
        client.close()


def test_a_begun_request_is_answered_when_taken_after_other_calls(server: Server) -> None:
    """A request whose reply is taken later (a transfer ran meanwhile): calls made on the
    client in between get their own replies, and the begun one still gets its own, or the
    error that broke the connection first."""
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    try:
        first = client.begin(b"abc")
        bad = client.begin(b"bad")
        assert client.call(b"xyz") == b"zyx"  # reads past both begun replies
        assert first() == b"cba"
        with pytest.raises(InvalidParamsError, match="bad request"):
            bad()
        waiting = client.begin(b"later")
        assert waiting() == b"retal"  # taken before any other call reads it
        slow = client.begin(b"slow")
        server.stop()  # closes the connection before the reply comes
        with pytest.raises(KvcakeError) as caught:
            slow()
        assert caught.value.code is ErrorCode.RPC_FAIL
        server.start()
        assert client.call(b"again") == b"niaga"
        slow = client.begin(b"slow")
        server.stop()
        with pytest.raises(KvcakeError, match="cannot reach"):
            client.call(b"meanwhile")  # finds the connection closed and cannot reopen it
        with pytest.raises(KvcakeError) as caught:
            slow()  # its reply went with the old connection
        assert caught.value.code is ErrorCode.RPC_FAIL
        server.start()
    finally:
        client.close()


def test_a_server_restarted_after_answering_an_unanswered_send_is_reached_again(
        server: Server) -> None:
    """The send's reply waits in the socket ahead of the server's close: it must not hide
    the close from the check before the next call, which would then be lost with it."""
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    replies: list[bytes | KvcakeError] = []
    try:
        client.send(b"abc", replies.append)
        sock, _ = client._connection.socket()
        assert select.select([sock], [], [], 5.0)[0]  # its reply has arrived
        server.stop()
        server.start()
        assert client.call(b"xyz") == b"zyx"
        assert replies == [b"cba"]
    finally:
        client.close()


def test_each_thread_with_its_own_client_is_served(server: Server) -> None:
    answers: dict[int, list[bytes]] = {}

    def work(n: int) -> None:
        client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
        try:
            answers[n] = [client.call(b"%d-%d" % (n, i)) for i in range(50)]
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {n: [(b"%d-%d" % (n, i))[::-1] for i in range(50)] for n in range(4)}


def test_an_error_the_server_answers_keeps_its_code_and_the_connection(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    try:
        with pytest.raises(InvalidParamsError, match="bad request") as caught:
            client.call(b"bad")
        assert caught.value.code is ErrorCode.INVALID_PARAMS
        assert client.call(b"ok") == b"ko"
    finally:
        client.close()


def test_a_restarted_server_is_reached_again_without_a_failed_call(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    try:
        assert client.call(b"one") == b"eno"
        server.stop()  # closes the idle connection
        server.start()
        assert client.call(b"two") == b"owt"
    finally:
        client.close()


def test_a_server_that_is_gone_fails_the_call_before_sending(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    try:
        assert client.call(b"x") == b"x"
        server.stop()
        with pytest.raises(KvcakeError, match="cannot reach") as caught:
            client.call(b"y")
        assert caught.value.code is ErrorCode.RPC_FAIL and not client.sent
    finally:
        client.close()


def test_a_reply_slower_than_the_timeout_fails_after_sending(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 0.2, server.auth)
    try:
        with pytest.raises(KvcakeError, match=r"no reply .* within 0\.2s") as caught:
            client.call(b"slow")
        assert caught.value.code is ErrorCode.RPC_FAIL and client.sent
        assert client.call(b"ab") == b"ba"  # a fresh connection: the late reply is not read
    finally:
        client.close()


@pytest.mark.parametrize(("auth", "message"), [
    (NO_AUTH, "requires the cluster token"),
    (ClusterAuth(OTHER), "holds a different cluster token"),
])
def test_without_the_token_the_call_is_refused_clearly(auth: ClusterAuth, message: str) -> None:
    thread = LoopThread("test-rpc-server")
    server = Server(thread, ClusterAuth(TOKEN), free_port())
    server.start()
    try:
        client = BlockingRpcClient(server.endpoint, 5.0, auth)
        with pytest.raises(AuthenticationError, match=message) as caught:
            client.call(b"x")
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
        assert TOKEN not in str(caught.value) and OTHER not in str(caught.value)
        assert BlockingRpcClient(server.endpoint, 5.0, ClusterAuth(TOKEN)).call(b"ab") == b"ba"
    finally:
        server.stop()
        thread.stop()


def test_a_token_against_a_server_without_one_is_a_clear_error() -> None:
    thread = LoopThread("test-rpc-server")
    server = Server(thread, NO_AUTH, free_port())
    server.start()
    try:
        client = BlockingRpcClient(server.endpoint, 5.0, ClusterAuth(TOKEN))
        with pytest.raises(AuthenticationError, match="does not take a cluster token"):
            client.call(b"x")
    finally:
        server.stop()
        thread.stop()


def test_a_client_dropped_without_close_closes_its_socket_quietly(server: Server) -> None:
    client = BlockingRpcClient(server.endpoint, 5.0, server.auth)
    assert client.call(b"ab") == b"ba"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unclosed socket would raise ResourceWarning
        cycle: list[object] = [client]
        cycle.append(cycle)  # collected by the cycle collector, as a thread's state is
        del client, cycle
        gc.collect()
