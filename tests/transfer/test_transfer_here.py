"""``TransferEngine.transfer_here``: small transfers run in the caller's thread (tcp frames
on the thread's own connection, same-host copies in place), with the grants and errors of
the engine's batches; what is not for here is left to ``submit``."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from kvcake.common.auth import ClusterAuth
from kvcake.common.errors import AccessDeniedError, TransferError
from kvcake.transfer import GrantMode, TransferEngine, TransferOp, TransferRequest
from kvcake.transfer.transports import SPLIT_BYTES

TOKEN = "here-token-" + "h" * 24
MakeEngine = Callable[..., TransferEngine]


def _owner(make_engine: MakeEngine, size: int = 1 << 20) -> TransferEngine:
    owner = make_engine(transport="tcp", auth=ClusterAuth(TOKEN))
    owner.register_segment("kv0", size).view[:] = b"\xee" * size
    return owner


def test_reads_and_writes_inside_grants_move_and_a_refused_one_fails_alone(
        make_engine: MakeEngine) -> None:
    owner = _owner(make_engine)
    peer = make_engine(transport="tcp", auth=ClusterAuth(TOKEN))
    remote = peer.open_segment(f"{owner.endpoint}/kv0")
    grant = owner.sign_grant("kv0", 0, 8192, GrantMode.READ | GrantMode.WRITE, 30)
    data = memoryview(bytearray(bytes(range(256)) * 16))
    back, denied = memoryview(bytearray(4096)), memoryview(bytearray(16))
    outcome: list[object] = []

    def worker() -> None:  # any thread but the engine's own
        outcome.append(peer.transfer_here([
            TransferRequest(TransferOp.WRITE, remote, 4096, data, grant),
            TransferRequest(TransferOp.READ, remote, 8192, denied, grant),  # past the grant
            TransferRequest(TransferOp.READ, remote, 4096, back, grant)]))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    errors = outcome[0]
    assert isinstance(errors, list) and errors[0] is None and errors[2] is None
    assert isinstance(errors[1], AccessDeniedError)
    assert bytes(back) == bytes(data)
    view = owner._table.get("kv0").view
    assert bytes(view[4096:8192]) == bytes(data) and bytes(view[:4096]) == b"\xee" * 4096


def test_what_is_not_for_here_is_left_to_submit(make_engine: MakeEngine) -> None:
    owner = make_engine(transport="tcp")
    owner.register_segment("kv0", SPLIT_BYTES + 4096)
    peer = make_engine(transport="tcp")
    remote = peer.open_segment(f"{owner.endpoint}/kv0")
    big = memoryview(bytearray(SPLIT_BYTES))
    assert peer.transfer_here([TransferRequest(TransferOp.READ, remote, 0, big)]) is None
    small = memoryview(bytearray(64))
    from_loop = peer.io.run(_here_on_loop(peer, TransferRequest(TransferOp.READ, remote, 0,
                                                                  small)))
    assert from_loop is None  # never blocks the engine's own loop
    assert peer.transfer_here([TransferRequest(TransferOp.READ, remote, 0, small)]) == [None]


async def _here_on_loop(engine: TransferEngine, request: TransferRequest) -> object:
    return engine.transfer_here([request])


def test_same_host_requests_are_copied_in_place(make_engine: MakeEngine) -> None:
    owner = make_engine(transport="auto")
    owner.register_segment("kv0", 4096).view[:] = b"\x5a" * 4096
    peer = make_engine(transport="auto")
    remote = peer.open_segment(f"{owner.endpoint}/kv0")
    assert remote.transport == "shm"
    back = memoryview(bytearray(100))
    assert peer.transfer_here([TransferRequest(TransferOp.READ, remote, 10, back)]) == [None]
    assert bytes(back) == b"\x5a" * 100


def test_a_peer_that_is_gone_fails_each_request_and_a_new_one_is_reached(
        make_engine: MakeEngine) -> None:
    owner = _owner(make_engine)
    peer = make_engine(transport="tcp", auth=ClusterAuth(TOKEN))
    remote = peer.open_segment(f"{owner.endpoint}/kv0")
    grant = owner.sign_grant("kv0", 0, 4096, GrantMode.READ, 30)
    back = memoryview(bytearray(64))
    request = TransferRequest(TransferOp.READ, remote, 0, back, grant)
    assert peer.transfer_here([request]) == [None]
    owner.close()
    errors = peer.transfer_here([request, request])
    assert errors is not None and all(isinstance(e, TransferError) for e in errors)
    again = _owner(make_engine)
    moved = peer.open_segment(f"{again.endpoint}/kv0")
    grant = again.sign_grant("kv0", 0, 4096, GrantMode.READ, 30)
    assert peer.transfer_here([TransferRequest(TransferOp.READ, moved, 0, back, grant)]) == \
        [None]
    assert bytes(back) == b"\xee" * 64


def test_threads_each_use_their_own_connection(make_engine: MakeEngine) -> None:
    owner = _owner(make_engine)
    peer = make_engine(transport="tcp", auth=ClusterAuth(TOKEN))
    remote = peer.open_segment(f"{owner.endpoint}/kv0")
    grant = owner.sign_grant("kv0", 0, 1 << 20, GrantMode.READ | GrantMode.WRITE, 30)
    failures: list[int] = []

    def work(n: int) -> None:
        data = memoryview(bytes([n]) * 4096)
        back = memoryview(bytearray(4096))
        for i in range(30):
            offset = (n * 30 + i) * 4096
            errors = peer.transfer_here([
                TransferRequest(TransferOp.WRITE, remote, offset, data, grant),
                TransferRequest(TransferOp.READ, remote, offset, back, grant)])
            if errors != [None, None] or bytes(back) != bytes(data):
                failures.append(n)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []


def test_the_sync_api_runs_small_batches_in_the_callers_thread(
        make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """``transfer`` / ``read`` / ``write``: a small batch never goes through ``submit`` (no
    hop to the I/O thread); a large one does, and a failure raises as a batch's does."""
    owner = _owner(make_engine, SPLIT_BYTES + 4096)
    peer = make_engine(transport="tcp", auth=ClusterAuth(TOKEN))
    remote = peer.open_segment(f"{owner.endpoint}/kv0")
    grant = owner.sign_grant("kv0", 0, SPLIT_BYTES, GrantMode.READ | GrantMode.WRITE, 30)
    submitted: list[int] = []
    submit = peer.submit
    monkeypatch.setattr(peer, "submit", lambda requests: submitted.append(len(requests))
                        or submit(requests))
    data = memoryview(bytearray(b"sync" * 1024))
    peer.transfer([TransferRequest(TransferOp.WRITE, remote, 0, data, grant)])
    back = memoryview(bytearray(4096))
    peer.transfer([TransferRequest(TransferOp.READ, remote, 0, back, grant)])
    assert bytes(back) == bytes(data) and submitted == []
    with pytest.raises(AccessDeniedError):  # past the grant
        peer.transfer([TransferRequest(TransferOp.READ, remote, SPLIT_BYTES, back, grant)])
    big = memoryview(bytearray(SPLIT_BYTES))
    peer.transfer([TransferRequest(TransferOp.READ, remote, 0, big, grant)])
    assert submitted == [1] and bytes(big[:4096]) == bytes(data)
