"""The global pool replay reproduces the traces README's LRU table exactly, with the store's
own eviction code; scripted rows pin the matching and eviction rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import TraceRecord, load_trace
from kvcake.sim.cache import PoolCache, replay_pool

# capacity (blocks) -> (blocks, tokens), from the packaged trace's README
README_TABLE = {0: (0.366, 0.374), 100_000: (0.364, 0.371), 50_000: (0.355, 0.362),
                30_000: (0.326, 0.332), 10_000: (0.211, 0.215), 1_000: (0.044, 0.045)}


@pytest.mark.parametrize("capacity", sorted(README_TABLE))
def test_the_conversation_trace_table_is_reproduced(capacity: int) -> None:
    replay = replay_pool(load_trace(), capacity)
    assert (round(replay.hit_ratio_blocks, 3), round(replay.hit_ratio_tokens, 3)) == \
        README_TABLE[capacity]
    assert (replay.num_requests, replay.num_blocks) == (12_031, 288_500)


def _row(length: int, *ids: int) -> TraceRecord:
    return TraceRecord(0, length, 1, ids)


def test_only_the_leading_run_counts_and_lru_evicts_the_oldest() -> None:
    rows = [_row(1536, 1, 2, 3), _row(1100, 1, 2, 4), _row(600, 5, 2)]
    # row 2 matches 1 and 2 (then touches them: order 3 1 2 4); row 3 matches nothing (5 is
    # new, so the 2 behind it does not count); inserting 5 evicts 3, the least recently used
    replay = replay_pool(rows, capacity=4)
    assert (replay.num_hit_blocks, replay.num_blocks, replay.num_evictions) == (2, 8, 1)
    assert (replay.num_hit_tokens, replay.num_tokens) == (1024, 1536 + 1100 + 600)
    pool = PoolCache(4)
    for row in rows:
        pool.admit(row.hash_ids)
    assert list(pool.policy) == ["1", "4", "5", "2"]


def test_fifo_does_not_reorder_on_a_hit() -> None:
    lru, fifo = PoolCache(2, "lru"), PoolCache(2, "fifo")
    for pool in (lru, fifo):
        pool.admit([1, 2])
        pool.admit([1])      # a hit: lru moves 1 to the end, fifo does not
        pool.admit([3])      # one eviction each
    assert [k for k in lru.policy] == ["1", "3"]
    assert [k for k in fifo.policy] == ["2", "3"]


def test_bad_input_is_named() -> None:
    with pytest.raises(InvalidParamsError, match="capacity must be >= 0"):
        PoolCache(-1)
    with pytest.raises(InvalidParamsError, match="unknown eviction policy 'mru'"):
        PoolCache(10, "mru")


def test_the_command_prints_the_table_and_json() -> None:
    result = subprocess.run([sys.executable, "-m", "kvcake.cli", "sim", "cache", "--capacity",
                             "10000", "--json"], capture_output=True, text=True, timeout=120,
                            check=True)
    summary = json.loads(result.stdout)
    assert round(summary["hit_ratio_blocks"], 3) == 0.211
    assert round(summary["hit_ratio_tokens"], 3) == 0.215
    bad = subprocess.run([sys.executable, "-m", "kvcake.cli", "sim", "cache", "--capacity",
                          "lots"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--capacity takes block counts" in bad.stderr
