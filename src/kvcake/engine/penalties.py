"""vLLM's logit penalties and ``min_tokens``, applied per row before sampling.

For a row's logits ``x`` (one request), with ``count[t]`` how often token ``t`` is in the
output so far and ``seen`` the tokens of prompt and output::

    repetition:  x[t] = x[t] / r  if x[t] > 0 else x[t] * r      for t in seen   (r = 1: off)
    frequency:   x[t] -= f * count[t]                                             (f = 0: off)
    presence:    x[t] -= p * (count[t] > 0)                                       (p = 0: off)
    min_tokens:  x[t] = -inf for t in stop_token_ids while len(output) < min_tokens

Log-probabilities are still reported under the raw logits (vLLM's default): penalties change
what is drawn, not what the model said.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvcake.wire.sampling import SamplingParams


@dataclass(frozen=True)
class TokenHistory:
    """What one row's penalties look at; ``stop_token_ids`` are the tokens ``min_tokens``
    holds back (EOS unless ignored, and the request's own stop tokens)."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    stop_token_ids: frozenset[int] = frozenset()


def penalise(logits: torch.Tensor, params: Sequence[SamplingParams],
             histories: Sequence[TokenHistory]) -> torch.Tensor:
    """``logits`` (num_seqs, vocab) with each row's penalties applied; the input is untouched
    (it is returned as is when no row has any)."""
    rows = [row for row, p in enumerate(params) if p.penalised]
    if not rows:
        return logits
    out = logits.clone()
    for row in rows:
        _penalise_row(out[row], params[row], histories[row])
    return out


def _penalise_row(x: torch.Tensor, params: SamplingParams, history: TokenHistory) -> None:
    """Applies the penalties to one row ``x`` (vocab,) in place."""
    vocab = x.shape[0]
    if params.repetition_penalty != 1.0:
        seen = _ids(set(history.prompt_token_ids) | set(history.output_token_ids), x.device)
        values = x[seen]
        r = params.repetition_penalty
        x[seen] = torch.where(values > 0, values / r, values * r)
    if (params.frequency_penalty or params.presence_penalty) and history.output_token_ids:
        counts = torch.bincount(_ids(history.output_token_ids, x.device), minlength=vocab)
        x -= params.frequency_penalty * counts.to(x.dtype)
        x -= params.presence_penalty * (counts > 0).to(x.dtype)
    if len(history.output_token_ids) < params.min_tokens and history.stop_token_ids:
        x[_ids(history.stop_token_ids, x.device)] = -math.inf


def _ids(ids: Sequence[int] | set[int] | frozenset[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(sorted(ids) if isinstance(ids, set | frozenset) else list(ids),
                        dtype=torch.long, device=device)
