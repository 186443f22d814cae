"""``kvcake bench reuse``'s guard on the first token: reuse may not change the answer, beyond
a bf16 near-tie between the cold run's best tokens."""

from __future__ import annotations

import pytest

from kvcake.bench.reuse import _check_first_tokens, _First

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
