"""``kvcake bench reuse``'s guard on the first token: reuse may not change the answer, beyond
a bf16 near-tie between the cold run's best tokens; its engines hold its longest prompt in
whichever dtype the CPU gets."""

from __future__ import annotations

import pytest

from kvcake.bench.reuse import (
    _check_first_tokens,
    _engine_config,
    _First,
    _kv_bytes_per_token,
    plan_for,
)
from kvcake.engine import config as engine_config
from kvcake.model import resolve_model

COLD = _First(1.0, 520, 0, {520: -4.28, 53: -4.40, 55: -4.90})


def first(token_id: int) -> _First:
    return _First(0.05, token_id, 1023, {})


@pytest.mark.parametrize("token_id", [520, 53])
def test_the_cold_token_or_a_near_tie_passes(token_id: int) -> None:
    _check_first_tokens(1024, COLD, first(token_id), first(token_id))


@pytest.mark.parametrize(("store", "local"), [(55, 55), (7, 7), (520, 53)])
def test_a_token_beyond_the_tie_or_store_and_local_apart_stop_the_run(store: int,
                                                                      local: int) -> None:
    with pytest.raises(RuntimeError, match="reused KV changed the first token at 1024"):
        _check_first_tokens(1024, COLD, first(store), first(local))


@pytest.mark.parametrize(("dtype", "itemsize"), [("bfloat16", 2), ("float32", 4)])
def test_the_engines_hold_the_longest_prompt_in_the_cpus_dtype(
        monkeypatch: pytest.MonkeyPatch, dtype: str, itemsize: int) -> None:
    """``auto`` picks float32 on a CPU without native bf16, which doubles the KV of a token:
    the pool must still hold the 8,000-token prompt and its first token."""
    monkeypatch.setattr(engine_config, "resolve_dtype", lambda wanted, device: dtype)
    plan = plan_for(quick=False)
    config = _engine_config("127.0.0.1:1", plan, _kv_bytes_per_token())
    per_block = config.block_size * resolve_model(config.model).config.kv_bytes_per_token(
        itemsize)
    held = config.kv_cache_bytes // per_block * config.block_size
    assert config.dtype == dtype
    assert min(held, config.max_model_len) > max(plan.lengths)
