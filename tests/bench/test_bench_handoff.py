"""``kvcake bench handoff`` end to end on the packaged model, with short prompts: each mode
moves every block of each prompt to the decode-side process and the run checks them there
byte for byte; a block that did not land stops the run."""

from __future__ import annotations

import pytest

from kvcake.bench import handoff
from kvcake.bench.handoff import HandoffPlan, measure, ratios, summarise
from kvcake.common.errors import KvcakeError
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import DTYPES
from kvcake.model import resolve_model


def test_every_mode_hands_over_every_block_of_each_prompt() -> None:
    samples = measure(HandoffPlan((40, 70), 1))
    config = EngineConfig()
    per_token = resolve_model(config.model).config.kv_bytes_per_token(
        DTYPES[config.dtype].itemsize)
    assert {(s["transport"], s["mode"], s["prompt_len"]) for s in samples} == {
        (t, m, n) for t, m in handoff.MODES for n in (40, 70)}
    for sample in samples:  # whole blocks, the partial tail's too
        blocks = -(-sample["prompt_len"] // config.block_size)
        assert sample["mib"] * (1 << 20) == blocks * config.block_size * per_token
    assert len(summarise(samples)) == 6
    assert [r["prompt_len"] for r in ratios(samples)] == [40, 70]


def test_a_block_that_did_not_land_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode side's first block loses its first layer's K before the check."""
    check = handoff._check_landed

    def lose_a_block(prefill: handoff._Prefill, mapped: handoff._Prefill, tag: str) -> None:
        assert mapped.core.transfer is not None
        offset, length = prefill.target.block_ranges(0, 1)[0]
        lost = mapped.core.transfer.map_range(mapped.remote, offset, length)
        assert lost is not None
        lost.view[:] = bytes(length)
        check(prefill, mapped, tag)

    monkeypatch.setattr(handoff, "_check_landed", lose_a_block)
    with pytest.raises(KvcakeError, match="did not land as decode block 0"):
        measure(HandoffPlan((40,), 1))
