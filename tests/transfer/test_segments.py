import os

import pytest

from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    SegmentNotFoundError,
)
from kvcake.transfer.handover import HandoverRefusedError, HandoverServer
from kvcake.transfer.messages import DescribeRequest
from kvcake.transfer.segment import MappedSegment, Segment, local_host_id
from kvcake.transfer.service import SegmentTable


def test_segment_is_shared_memory_a_same_host_peer_can_map() -> None:
    table = SegmentTable(local_host_id())
    table.add(Segment("kv0", table.next_segment_id(), 1 << 20))
    server = HandoverServer(table.hand_over)
    table.shm_socket = server.name
    try:
        descriptor = table.descriptor("kv0")
        assert (descriptor.size, descriptor.owner_pid) == (1 << 20, os.getpid())
        mapped = MappedSegment(descriptor)
        mapped.view[10:15] = b"hello"
        assert bytes(table.get("kv0").view[10:15]) == b"hello"
        assert mapped.owner_alive()
        mapped.close()
    finally:
        server.close()
        table.close()


def test_mapping_a_closed_segment_fails_cleanly() -> None:
    table = SegmentTable(local_host_id())
    table.add(Segment("kv0", table.next_segment_id(), 4096))
    server = HandoverServer(table.hand_over)
    table.shm_socket = server.name
    descriptor = table.descriptor("kv0")
    table.remove("kv0").close()
    try:
        with pytest.raises(HandoverRefusedError, match="kv0"):
            MappedSegment(descriptor)
    finally:
        server.close()


@pytest.mark.parametrize("name", ["", "a/b", "x" * 201, "tab\there"])
def test_bad_segment_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidParamsError, match="segment name"):
        Segment(name, 1, 4096)


def test_zero_size_is_refused() -> None:
    with pytest.raises(InvalidParamsError, match="size"):
        Segment("kv0", 1, 0)


def test_host_id_names_boot_and_network_namespace() -> None:
    assert "/net:" in local_host_id()


@pytest.fixture
def table() -> SegmentTable:
    table = SegmentTable("host-a")
    table.endpoint = "127.0.0.1:9"
    table.add(Segment("kv0", table.next_segment_id(), 4096))
    return table


def test_resolve_checks_ids_and_ranges(table: SegmentTable) -> None:
    assert table.resolve(1, 4000, 96).nbytes == 96
    with pytest.raises(SegmentNotFoundError, match="id 2"):
        table.resolve(2, 0, 1)
    for offset, length in [(4000, 97), (-1, 1), (4096, 1)]:
        with pytest.raises(InvalidParamsError) as info:
            table.resolve(1, offset, length)
        assert info.value.code is ErrorCode.BUFFER_OVERFLOW
    table.close()


def test_duplicate_names_are_refused_and_the_first_kept(table: SegmentTable) -> None:
    duplicate = Segment("kv0", table.next_segment_id(), 4096)
    with pytest.raises(KvcakeError) as info:
        table.add(duplicate)
    assert info.value.code is ErrorCode.SEGMENT_ALREADY_EXISTS
    assert table.resolve(1, 0, 1).nbytes == 1
    duplicate.close()
    table.close()


def test_describe_answers_with_descriptors(table: SegmentTable) -> None:
    (descriptor,) = table.handle_call(DescribeRequest(["kv0"])).segments
    assert (descriptor.name, descriptor.endpoint, descriptor.host_id) == (
        "kv0", "127.0.0.1:9", "host-a"
    )
    assert [d.name for d in table.handle_call(DescribeRequest()).segments] == ["kv0"]
    with pytest.raises(SegmentNotFoundError):
        table.handle_call(DescribeRequest(["nope"]))
    table.close()
