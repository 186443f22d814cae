"""``kvcake sim cache``: the prefix hit ratio of one global pool over a trace."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import load_trace
from kvcake.sim.cache import CacheReplay, replay_pool


def run_sim_cache(trace: str | None, capacities: Sequence[int], eviction: str, as_json: bool,
                  out: TextIO) -> int:
    records = load_trace(trace)
    if not records or not capacities:
        raise InvalidParamsError("nothing to replay: the trace has no rows or no capacity "
                                 "was given")
    replays = [replay_pool(records, capacity, eviction) for capacity in capacities]
    if as_json:
        for replay in replays:
            print(json.dumps(_summary(replay)), file=out)
        return 0
    print(f"{len(records):,} requests, {replays[0].num_blocks:,} block references; "
          f"eviction {eviction}", file=out)
    print(f"{'capacity (blocks)':>18}  {'blocks':>6}  {'tokens':>6}  {'evictions':>9}", file=out)
    for replay in replays:
        capacity = f"{replay.capacity:,}" if replay.capacity else "unbounded"
        print(f"{capacity:>18}  {replay.hit_ratio_blocks:6.3f}  {replay.hit_ratio_tokens:6.3f}  "
              f"{replay.num_evictions:>9,}", file=out)
    return 0


def _summary(replay: CacheReplay) -> dict[str, object]:
    return {"capacity": replay.capacity, "eviction": replay.eviction,
            "num_requests": replay.num_requests, "num_blocks": replay.num_blocks,
            "hit_ratio_blocks": replay.hit_ratio_blocks,
            "hit_ratio_tokens": replay.hit_ratio_tokens, "num_evictions": replay.num_evictions}
