"""Log-probabilities of the prompt's own tokens (``prompt_logprobs``, and ``echo`` in the API).

The hidden state at position ``p`` predicts token ``p + 1``, so a chunk of positions
``[start, end)`` scores prompt tokens ``start + 1 .. end`` (those inside the prompt)::

    prompt      t0   t1   t2   t3   t4          chunk = positions 0..2
    logits at   p0   p1   p2                    -> scores t1, t2, t3  (t0 has none)

Only requests that ask pay for this: their chunks' every row goes through the LM head,
in slices of ``ROWS_PER_SLICE`` so a long prompt never holds a (prompt_len, vocab) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcake.wire.output import TopLogprobs

ROWS_PER_SLICE = 256


@dataclass(frozen=True)
class PromptLogprobs:
    """Scores of prompt tokens ``first .. first + len(logprobs) - 1`` (``first`` >= 1)."""

    first: int
    logprobs: list[float]
    top_logprobs: list[TopLogprobs]


def score_tokens(logits: torch.Tensor, targets: torch.Tensor,
                 num_top: int) -> tuple[list[float], list[TopLogprobs]]:
    """Per row of ``logits`` (rows, vocab): the log-probability of ``targets[row]`` and the
    ``num_top`` most likely tokens, all under ``log_softmax`` of the raw logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (rows,)
    if num_top == 0:
        return chosen.tolist(), [[] for _ in range(logits.shape[0])]
    values, ids = logprobs.topk(num_top, dim=-1)  # (rows, num_top) each
    tops = [list(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)]
    return chosen.tolist(), tops
