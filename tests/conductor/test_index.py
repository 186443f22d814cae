"""PrefixIndex: exact matches, event order and gaps, snapshots, integrity after every step."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import prefix_block_hashes
from kvcake.conductor import KVEvent, PrefixIndex

BLOCK = 4
DOC = prefix_block_hashes(list(range(8 * BLOCK)), BLOCK)  # 8 chained blocks
OTHER = prefix_block_hashes(list(range(100, 100 + 3 * BLOCK)), BLOCK)


def stored(seq: int, blocks: list[bytes]) -> KVEvent:
    return KVEvent(seq, "stored", blocks)


def removed(seq: int, blocks: list[bytes]) -> KVEvent:
    return KVEvent(seq, "removed", blocks)


def assert_invalid(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        call()
    assert str(caught.value) == f"INVALID_PARAMS: {message}"


@pytest.fixture
def index() -> PrefixIndex:
    index = PrefixIndex()
    assert index.apply("a", [stored(1, DOC[:6])])
    assert index.apply("b", [stored(1, DOC[:2]), stored(2, OTHER)])
    index.add_instance("c")
    index.check_integrity()
    return index


def test_match_counts_leading_blocks_only(index: PrefixIndex) -> None:
    assert index.match("a", DOC) == 6
    assert index.match("b", DOC) == 2
    assert index.match("c", DOC) == 0
    assert index.match("nobody", DOC) == 0
    assert index.match_all(DOC) == {"a": 6, "b": 2, "c": 0}
    assert index.match_all(OTHER) == {"a": 0, "b": 3, "c": 0}
    assert index.match("a", []) == 0
    assert index.holders(DOC[1]) == {"a", "b"}
    assert [index.num_blocks(i) for i in ("a", "b", "c")] == [6, 5, 0]


def test_a_hole_in_the_chain_ends_the_match(index: PrefixIndex) -> None:
    assert index.apply("a", [removed(2, [DOC[3]])])
    assert index.match("a", DOC) == 3  # blocks 4 and 5 are held but unreachable
    assert index.num_blocks("a") == 5
    assert index.holders(DOC[3]) == frozenset()
    index.check_integrity()


def test_cleared_drops_everything_of_one_instance(index: PrefixIndex) -> None:
    assert index.apply("b", [KVEvent(3, "cleared", [])])
    assert index.match_all(DOC) == {"a": 6, "b": 0, "c": 0}
    assert index.holders(OTHER[0]) == frozenset()
    assert index.num_blocks("b") == 0
    index.check_integrity()


def test_a_gap_stops_the_batch_and_a_snapshot_resumes(index: PrefixIndex) -> None:
    assert not index.apply("a", [stored(2, DOC[6:7]), stored(4, DOC[7:8]),
                                 removed(5, DOC[:6])])
    assert index.last_seq("a") == 2
    assert index.match("a", DOC) == 7  # seq 2 applied, nothing past the gap
    index.check_integrity()
    index.replace("a", 5, DOC[6:])
    assert index.last_seq("a") == 5
    assert index.match("a", DOC) == 0
    assert index.num_blocks("a") == 2
    assert index.holders(DOC[0]) == {"b"}
    assert index.apply("a", [stored(6, DOC[:1])])
    assert index.match("a", DOC) == 1
    index.check_integrity()


def test_resent_events_are_ignored(index: PrefixIndex) -> None:
    assert index.apply("a", [stored(1, OTHER), stored(2, DOC[6:7])])  # seq 1 is old
    assert index.apply("a", [stored(2, DOC[7:8])])  # a replay of seq 2: skipped too
    assert index.match("a", OTHER) == 0
    assert index.match("a", DOC) == 7
    assert index.last_seq("a") == 2
    index.check_integrity()


def test_insert_is_not_numbered_and_a_snapshot_corrects_it(index: PrefixIndex) -> None:
    index.insert("c", DOC)
    assert index.match("c", DOC) == 8
    assert index.last_seq("c") == 0
    assert index.apply("c", [removed(1, DOC[4:])])
    assert index.match("c", DOC) == 4
    index.replace("c", 1, [])
    assert index.match("c", DOC) == 0
    index.check_integrity()


def test_a_retracted_insert_forgets_only_what_no_event_confirmed(index: PrefixIndex) -> None:
    assert index.insert("c", DOC[:3]) == DOC[:3]
    assert index.insert("c", DOC) == DOC[3:]  # what another request added is not its own
    assert index.apply("c", [stored(1, DOC[3:5])])  # the instance computed those
    index.retract("c", DOC[3:])  # the second request ended before its prefill
    assert index.match("c", DOC) == 5
    index.retract("c", DOC[:3])
    assert index.match("c", DOC) == 0
    assert "c" in index.holders(DOC[3]) and "c" not in index.holders(DOC[5])  # confirmed: kept
    index.retract("ghost", DOC)  # a no-op
    index.check_integrity()


def test_remove_instance_forgets_all_it_held(index: PrefixIndex) -> None:
    index.remove_instance("b")
    index.remove_instance("ghost")  # a no-op
    assert index.instance_ids == ["a", "c"]
    assert index.holders(OTHER[2]) == frozenset()
    assert index.holders(DOC[0]) == {"a"}
    assert index.last_seq("b") == 0
    assert index.apply("b", [stored(1, OTHER[:1])])  # a newcomer starts at seq 1 again
    index.check_integrity()


def test_malformed_events_apply_nothing(index: PrefixIndex) -> None:
    assert_invalid(lambda: index.apply("a", [stored(2, DOC[6:7]), KVEvent(3, "evicted", [])]),
                   "KV event 3 from 'a': kind must be one of stored, removed, cleared; "
                   "got 'evicted'")
    assert_invalid(lambda: index.apply("a", [KVEvent(0, "cleared", [])]),
                   "KV event from 'a': seq must be >= 1, got 0")
    assert_invalid(lambda: index.apply("a", [stored(2, [b"short"])]),
                   "block hash for 'a' must be 32 bytes, got 5")
    assert_invalid(lambda: index.insert("c", [bytes(31)]),
                   "block hash for 'c' must be 32 bytes, got 31")
    assert index.last_seq("a") == 1
    assert index.match("a", DOC) == 6
    index.check_integrity()
