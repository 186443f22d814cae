"""What every fuzz test shares: hypothesis settings sized for CI, and raw framed exchanges.

Each fuzz test names a modest example count that keeps the whole set near a minute on two
cores; ``KVCAKE_FUZZ_EXAMPLES=N`` raises every count to at least ``N`` for a longer local run
(``make fuzz``). Runs are derandomized and keep no example database, so CI sees the same
inputs every time.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.frames import HEADER_SIZE, FrameHeader, FrameOp, pack_header, unpack_header

TIMEOUT_S = 5.0
Frames = list[tuple[FrameHeader, bytes]]
Address = tuple[str, int]


def fuzz_settings(max_examples: int) -> settings:
    """``max_examples`` in CI, or ``KVCAKE_FUZZ_EXAMPLES`` when that is larger."""
    wanted = int(os.environ.get("KVCAKE_FUZZ_EXAMPLES", "0") or 0)
    return settings(max_examples=max(max_examples, wanted), deadline=None, database=None,
                    derandomize=True, suppress_health_check=[
                        HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                        HealthCheck.data_too_large, HealthCheck.filter_too_much])


def address_of(endpoint: str) -> Address:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


# ----- one raw exchange

def exchange(address: Address, data: bytes, replies: int | None = None) -> tuple[Frames, bool]:
    """Send ``data``, half-close, read until the server closes. The frames it answered and
    whether the connection was reset; a server that neither answers nor closes fails.

    With ``replies``, the connection stays open (a server may close a half-closed one before
    replies still being computed go out) and reading stops after that many frames."""
    with socket.create_connection(address, timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            if replies is None:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed on us mid-send: the connection ended
        received, reset = bytearray(), False
        while replies is None or len(parse_frames(bytes(received), True)) < replies:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                reset = True
                break
            except TimeoutError:
                pytest.fail(f"server hung: no reply and no close in {TIMEOUT_S}s "
                            f"after {bytes(data[:60])!r}")
            if not chunk:
                break
            received += chunk
    return parse_frames(bytes(received), truncated_ok=reset), reset


def parse_frames(data: bytes, truncated_ok: bool) -> Frames:
    frames: Frames = []
    position = 0
    while len(data) - position >= HEADER_SIZE:
        header = unpack_header(data[position : position + HEADER_SIZE], 1 << 30)
        end = position + HEADER_SIZE + header.payload_size
        if end > len(data):
            break
        frames.append((header, data[position + HEADER_SIZE : end]))
        position = end
    assert truncated_ok or position == len(data), f"a partial frame: {data[position:]!r}"
    return frames


def decodes(body: bytes, kind: Any) -> bool:
    """Whether ``body`` is a valid message of ``kind`` (a message union) for the codec."""
    try:
        codec.decode(body, kind)
    except KvcakeError:
        return False
    return True


def call_frame(request_id: int, body: bytes) -> bytes:
    return pack_header(FrameOp.CALL, request_id, length=len(body)) + body


def assert_error_frame(header: FrameHeader, payload: bytes,
                       op: FrameOp = FrameOp.CALL_REPLY) -> None:
    """A reply that failed for a reason the caller caused, saying what it was."""
    assert header.op is op
    assert header.status != 0, "an error frame must carry a non-zero status"
    assert ErrorCode(header.status) is not ErrorCode.INTERNAL_ERROR, payload
    assert payload.decode(), "an error frame must say what was wrong"


def assert_only_errors(address: Address, data: bytes) -> Frames:
    frames, _ = exchange(address, data)
    for header, payload in frames:
        assert_error_frame(header, payload)
    return frames


def assert_rpc_answers(address: Address, body: bytes, good: bytes,
                       decodes: bool) -> FrameHeader:
    """``body`` as call 1, then the well-formed call ``good`` as call 2, on one connection:
    both are answered, ``body`` with an error unless it ``decodes``, and call 2 succeeds."""
    frames, reset = exchange(address, call_frame(1, body) + call_frame(2, good), replies=2)
    assert not reset
    assert [h.request_id for h, _ in frames] == [1, 2], frames
    (header, payload), (after, after_payload) = frames
    if not decodes:
        assert_error_frame(header, payload)
        assert header.status == ErrorCode.INVALID_PARAMS, payload
    elif header.status:  # well-formed, and refused by the handler
        assert_error_frame(header, payload)
    assert after.status == 0, f"a rejected request must not end the connection: {after_payload!r}"
    return header


# ----- memory

def rss_bytes() -> int:
    """This process's resident set now (not the peak: allocations freed again do not count)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@contextlib.contextmanager
def open_partial_connections(address: Address, data: bytes, count: int) -> Iterator[None]:
    """``count`` connections that each sent ``data`` and wait, held open while suspended."""
    sockets = [socket.create_connection(address, timeout=TIMEOUT_S) for _ in range(count)]
    try:
        for sock in sockets:
            sock.sendall(data)
        yield
    finally:
        for sock in sockets:
            sock.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still false after {timeout_s}s"
        time.sleep(0.01)


# ----- well-typed wire messages with any values

INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
_SCALARS: dict[type[mi.Type], st.SearchStrategy[Any]] = {
    mi.IntType: st.integers(-3, 70) | INTS, mi.FloatType: st.floats(),
    mi.StrType: st.text(max_size=12), mi.BytesType: st.binary(max_size=40),
    mi.BoolType: st.booleans(), mi.NoneType: st.none(),
}


def wire_values(kind: Any) -> st.SearchStrategy[Any]:
    """Plain values shaped as a msgspec wire type (a struct, a dataclass, a union of them)
    encodes them, tags included, with any values in the fields: negative counts, NaN, 64-bit
    extremes, empty ids. What a hostile peer sends; ``msgspec.msgpack.encode`` them."""
    return _of(mi.type_info(kind))


def _of(info: mi.Type) -> st.SearchStrategy[Any]:
    if type(info) in _SCALARS:
        return _SCALARS[type(info)]
    if isinstance(info, mi.ListType | mi.VarTupleType):
        return st.lists(_of(info.item_type), max_size=4)
    if isinstance(info, mi.TupleType):
        return st.tuples(*(_of(item) for item in info.item_types)).map(list)
    if isinstance(info, mi.UnionType):
        return st.one_of([_of(member) for member in info.types])
    if isinstance(info, mi.StructType | mi.DataclassType):
        return _record(info)
    if isinstance(info, mi.EnumType):  # a member's value, or any string
        return st.sampled_from([member.value for member in info.cls]) | st.text(max_size=12)
    raise NotImplementedError(f"no strategy for {info}")


def _record(info: mi.StructType | mi.DataclassType) -> st.SearchStrategy[Any]:
    fields = {f.encode_name if isinstance(f, mi.Field) else f.name: _of(f.type)
              for f in info.fields}
    if isinstance(info, mi.StructType) and info.array_like:
        return st.tuples(*fields.values()).map(list)
    tag = {info.tag_field: st.just(info.tag)} if getattr(info, "tag", None) is not None else {}
    return st.fixed_dictionaries(tag | fields)
