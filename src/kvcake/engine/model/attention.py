"""Attention kernels by name: ``sdpa`` (PyTorch's fused kernels) and ``eager`` (HF's math);
``paged`` is ``sdpa`` where its kernels are missing (with them, prompt chunks and decodes go
to :mod:`kvcake.engine.model.kernels`).

Both take grouped-query inputs and a boolean mask (``True`` = may attend)::

    q: (batch, num_heads, q_len, head_dim)    k, v: (batch, num_kv_heads, kv_len, head_dim)
    mask: (batch or 1, 1, q_len, kv_len) or None with causal=True (q_len == kv_len)

``eager`` repeats K/V per head, multiplies in the activation dtype and takes the softmax in
float32, exactly as HF transformers' eager implementation, so bf16 greedy decoding agrees
with it token for token. ``sdpa`` is faster; its bf16 results differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf

from kvcake.common.errors import InvalidParamsError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float],
                       torch.Tensor]
# float32 decodes of one or two rows: the fused kernel parallelises badly over them, and
# plain matmuls over the grouped heads are faster. In bf16/fp16 the fused kernel is 2-6x
# faster than those matmuls at any context length (it was measured on a Xeon with AMX).
_SMALL_DECODE = 2


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float) -> torch.Tensor:
    if q.shape[2] == 1 and q.shape[0] <= _SMALL_DECODE and q.dtype == torch.float32:
        return _grouped_math(q, k, v, mask, scale)
    return nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=True)


def _grouped_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    # single-query decode: heads of one group share a K/V head, so no repeat is needed
    batch, heads, _, dim = q.shape
    groups = k.shape[1]
    grouped = q.view(batch, groups, heads // groups, dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
    weights = scores.softmax(-1).to(q.dtype)
    return torch.matmul(weights, v).view(batch, heads, 1, dim)


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    repeats = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeats, dim=1)
    v = v.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"paged": sdpa, "sdpa": sdpa, "eager": eager}


def attention_backend(name: str) -> AttentionFn:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise InvalidParamsError(f"attention backend {name!r} is unknown "
                                 f"(known: {', '.join(ATTENTION_BACKENDS)})") from None
