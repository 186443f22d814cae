"""Waiting for a reply on a blocking socket by polling first (:class:`ReplyWait`): what it
receives is exactly what was sent, however and whenever it arrives; it stops polling where
replies come slower than its budget, and starts again once they come quickly."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.common.sockets import ReplyWait, kernel_timeouts
from kvcake.store.config import StoreConfig
from kvcake.transfer.config import TransferConfig

SPIN_S = 200e-6


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    reader, writer = socket.socketpair()
    kernel_timeouts(reader, 5.0)
    try:
        yield reader, writer
    finally:
        reader.close()
        writer.close()


def _received(wait: ReplyWait, reader: socket.socket, size: int) -> bytes:
    view = memoryview(bytearray(size))
    wait.recv_exactly(reader, view)
    return bytes(view)


def _write_later(writer: socket.socket, chunks: list[bytes], after: threading.Event) -> None:
    def send() -> None:
        for chunk in chunks:
            after.wait(5.0)
            writer.sendall(chunk)

    threading.Thread(target=send, daemon=True).start()


def test_a_reply_already_there_is_taken_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    wait = ReplyWait(SPIN_S)
    writer.sendall(b"0123456789")
    assert wait.polls
    assert _received(wait, reader, 10) == b"0123456789"


def test_a_reply_in_pieces_after_the_poll_gives_up_is_taken_whole(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    wait = ReplyWait(SPIN_S)
    writer.sendall(b"abc")  # polling takes these; the rest comes while it blocks
    go = threading.Event()
    _write_later(writer, [b"defg", b"hij"], go)
    timer = threading.Timer(0.05, go.set)
    timer.start()
    assert _received(wait, reader, 10) == b"abcdefghij"
    timer.join()


def test_a_reply_slower_than_the_budget_arrives_and_polling_stops(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    wait = ReplyWait(SPIN_S)
    for round_ in range(3):
        go = threading.Event()
        _write_later(writer, [b"late%d" % round_], go)
        timer = threading.Timer(0.02, go.set)  # 100 times the budget
        timer.start()
        assert _received(wait, reader, 5) == b"late%d" % round_
        timer.join()
    assert wait.typical_s > SPIN_S
    assert not wait.polls


def test_polling_resumes_once_replies_come_quickly_again() -> None:
    wait = ReplyWait(SPIN_S)
    for _ in range(3):
        wait.note(0.02)
    assert not wait.polls
    for _ in range(40):
        wait.note(50e-6)
    assert wait.polls


def test_no_budget_never_polls(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    wait = ReplyWait(0.0)
    assert not wait.polls
    writer.sendall(b"xy")
    assert _received(wait, reader, 2) == b"xy"


def test_a_peer_that_closes_while_polled_is_a_lost_connection(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    writer.close()
    with pytest.raises(ConnectionError):
        _received(ReplyWait(SPIN_S), reader, 4)


@pytest.mark.parametrize("config", [StoreConfig, TransferConfig])
def test_a_negative_budget_is_refused_by_name(config: type) -> None:
    with pytest.raises(InvalidParamsError, match="reply_spin_us must be >= 0"):
        config(reply_spin_us=-1)
