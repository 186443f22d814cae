"""A Llama-family decoder in plain PyTorch whose attention reads K/V from paged blocks.

The forward pass takes a *flat* batch: every scheduled token of every request, prefill
chunks first, then single-token decodes. Linear layers run once over all of them; attention
reads each request's context from its blocks.

::

    tokens   | chunk A (prefill, 5) | chunk B (prefill, 3) | d1 | d2 | d3 |   (num_tokens,)
    attention:  A's 5 queries over A's context, B likewise, in one call of the paged prefill
                kernel; d1..d3 in one call of the paged decode kernel (without the kernels:
                sdpa per chunk, over its context gathered, and decodes in padded groups)

Weights use HF names and layout, so HF checkpoints load without renaming; q/k/v and
gate/up are fused into one matrix each at load time (one matmul instead of three or two).
On a CPU the linear layers' weights are then reordered once into oneDNN's blocked layout:
in bf16, decode steps at batch 1-32 took 1.16-1.31x less time than over plain weights, and
prefill-sized matmuls 1.26-1.32x (SmolLM2, 2 cores with AMX); in float32 only short steps
gain: with 2 threads on an AVX2 EPYC, 1.2-1.9x less at 8-128 rows, but plain weights were
1.10x faster at 1,024-4,096 rows (:func:`plain_rows`). So a float32 model may keep its plain
weights too (``plain_prefill``, twice the linear layers' memory) for its longer steps.
``eager`` attention keeps plain weights only: it stands for HF's exact math throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as nnf

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.model.attention import attention_backend
from kvcake.engine.model.kernels import CpuKernels, PagedDecodes, PagedPrefills
from kvcake.engine.model.rope import rope_tables
from kvcake.model import ModelConfig

LayerDone = Callable[[int], None]


@dataclass(frozen=True)
class PrefillSpan:
    """One request's prefill chunk inside the flat batch.

    start, length: its tokens are ``[start, start + length)`` of the flat batch.
    context_slots: cache slots of the request's whole context (cached prefix + this chunk),
        ``(context_len,)``; ``None`` when the chunk is the entire context (no prefix), so the
        chunk's own K/V are used without a gather.
    mask: which context positions each query sees, ``(length, context_len)`` (with
        ``context_slots``; plain causal otherwise).
    """

    start: int
    length: int
    context_slots: torch.Tensor | None
    mask: torch.Tensor | None = None

    @classmethod
    def over_context(cls, start: int, length: int, context_slots: torch.Tensor) -> PrefillSpan:
        """A chunk whose queries are the last ``length`` of ``context_slots``."""
        mask = _bottom_right_causal(length, context_slots.shape[0], context_slots.device)
        return cls(start, length, context_slots, mask)


@dataclass(frozen=True)
class AttentionBatch:
    """Everything attention needs for one step, built once and shared by every layer.

    slot_mapping: cache slot each new token's K/V is written to, ``(num_tokens,)``.
    positions: absolute position of each token, ``(num_tokens,)``.
    prefills: the prefill chunks, in flat order, before all decodes.
    decode_start: flat index of the first decode token (== num_tokens when none).
    decodes: the decode tokens in groups of similar context length, each padded only to its
        own longest context (one long request does not slow every other's attention).
    paged: every decode token for the paged kernel instead (``decodes`` is then empty).
    paged_prefills: every prompt chunk for the paged kernel instead (``prefills`` is then
        empty).
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    prefills: tuple[PrefillSpan, ...]
    decode_start: int
    decodes: tuple[DecodeGroup, ...] = ()
    paged: PagedDecodes | None = None
    paged_prefills: PagedPrefills | None = None


@dataclass(frozen=True)
class DecodeGroup:
    """Single-token decodes at flat indices ``start .. start + len(slots)``.

    slots: context slots of each, padded, ``(num_decodes, max_context)``.
    mask: which of those slots are real, ``(num_decodes, 1, 1, max_context)``.
    """

    start: int
    slots: torch.Tensor
    mask: torch.Tensor


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LlamaModel:
    """Weights plus the forward pass; the KV cache is owned by the caller.

    ``kv_cache`` has shape ``(num_layers, 2, num_slots, num_kv_heads, head_dim)`` where
    ``num_slots = num_blocks * block_size`` and slot ``b * block_size + i`` is token ``i`` of
    block ``b``. With ``kernels`` (:mod:`kvcake.engine.model.kernels`) the element-wise steps
    run fused, and with ``paged`` attention too, prompt chunks and decode tokens come as one
    :class:`PagedPrefills` and one :class:`PagedDecodes` that read the cache in place
    (``reads_pages``).
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor],
                 dtype: torch.dtype, device: str = "cpu", max_positions: int = 0,
                 attention: str = "sdpa", kernels: CpuKernels | None = None,
                 plain_prefill: bool = False) -> None:
        self.config = config
        self.attend = attention_backend(attention)
        self.kernels = kernels
        self.reads_pages = kernels is not None and attention == "paged"
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = _take(weights, "model.embed_tokens.weight", dtype, self.device)
        self.norm = _take(weights, "model.norm.weight", dtype, self.device)
        head = weights.get("lm_head.weight")
        untied = head is not None and not config.tie_word_embeddings
        self.lm_head = _cast(head, dtype, self.device) if untied and head is not None \
            else self.embed
        self.layers = [self._load_layer(weights, i) for i in range(config.num_layers)]
        self.plain_layers: list[_Layer] = []  # the same layers over plain weights, or none
        self.plain_rows = plain_rows(torch.get_num_threads())  # steps from here use them
        if _packs(self.device, dtype, attention):
            if plain_prefill and dtype == torch.float32:
                self.plain_layers = [replace(layer) for layer in self.layers]
            self.lm_head = _pack(self.lm_head)
            for layer in self.layers:
                layer.qkv, layer.o_proj = _pack(layer.qkv), _pack(layer.o_proj)
                layer.gate_up, layer.down = _pack(layer.gate_up), _pack(layer.down)
        cos, sin = rope_tables(config, self.device, max_positions)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim

    def _load_layer(self, weights: Mapping[str, torch.Tensor], i: int) -> _Layer:
        p = f"model.layers.{i}."

        def w(name: str) -> torch.Tensor:
            return _take(weights, p + name, self.dtype, self.device)

        qkv = torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"),
                         w("self_attn.v_proj.weight")])
        bias = None
        if self.config.attention_bias:
            bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"),
                              w("self_attn.v_proj.bias")])
        gate_up = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])
        return _Layer(w("input_layernorm.weight"), qkv, bias, w("self_attn.o_proj.weight"),
                      w("post_attention_layernorm.weight"), gate_up, w("mlp.down_proj.weight"))

    def new_kv_cache(self, num_slots: int) -> torch.Tensor:
        """A zeroed (so pre-touched) cache of ``num_slots`` token slots."""
        c = self.config
        shape = (c.num_layers, 2, num_slots, c.num_kv_heads, c.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache: torch.Tensor,
                on_layer: LayerDone | None = None) -> torch.Tensor:
        """Hidden states after the final norm, ``(num_tokens, hidden)``; writes new K/V.
        ``on_layer(i)`` runs as soon as layer ``i``'s K/V are in the cache, while the rest
        of the step still computes (a prefill instance starts sending them then)."""
        cos = self.cos.index_select(0, batch.positions)  # (num_tokens, head_dim)
        sin = self.sin.index_select(0, batch.positions)
        x = nnf.embedding(input_ids, self.embed)  # (num_tokens, hidden)
        layers = self._layers_for(input_ids.shape[0])
        if self.kernels is not None:
            return self._fused_forward(x, layers, batch, kv_cache, cos, sin, self.kernels,
                                       on_layer)
        for i, layer in enumerate(layers):
            h = _rms_norm(x, layer.input_norm, self.config.rms_norm_eps)
            x = x + self._attention(h, layer, batch, kv_cache[i], cos, sin)
            if on_layer is not None:
                on_layer(i)
            h = _rms_norm(x, layer.post_norm, self.config.rms_norm_eps)
            x = x + self._mlp(h, layer)
        return _rms_norm(x, self.norm, self.config.rms_norm_eps)

    def _layers_for(self, num_tokens: int) -> list[_Layer]:
        """The layers over plain weights for a step of ``plain_rows`` tokens or more where
        they are kept, else the packed ones."""
        return self.plain_layers if self.plain_layers and num_tokens >= self.plain_rows \
            else self.layers

    def _fused_forward(self, x: torch.Tensor, layers: list[_Layer], batch: AttentionBatch,
                       kv_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kernels: CpuKernels, on_layer: LayerDone | None) -> torch.Tensor:
        """The same layers with each residual add folded into the next norm (``x`` is
        updated in place)."""
        eps = self.config.rms_norm_eps
        delta: torch.Tensor | None = None
        for i, layer in enumerate(layers):
            h = kernels.add_rms_norm(x, delta, layer.input_norm, eps)
            attended = self._attention(h, layer, batch, kv_cache[i], cos, sin)
            if on_layer is not None:
                on_layer(i)
            h = kernels.add_rms_norm(x, attended, layer.post_norm, eps)
            delta = _linear(kernels.silu_mul(_linear(h, layer.gate_up)), layer.down)
        return kernels.add_rms_norm(x, delta, self.norm, eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(n, vocab)`` float32 logits of the given hidden rows."""
        return _linear(hidden, self.lm_head).float()

    def _mlp(self, h: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate, up = _linear(h, layer.gate_up).chunk(2, dim=-1)
        return _linear(nnf.silu(gate) * up, layer.down)

    def _attention(self, h: torch.Tensor, layer: _Layer, batch: AttentionBatch,
                   cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.config
        qkv = _linear(h, layer.qkv, layer.qkv_bias)
        q, k, v = torch.split(qkv, [self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.kernels is not None:
            q, k = self.kernels.rope(qkv, cos, sin, c.num_heads, c.num_kv_heads)
        else:
            q = _rope(q.view(-1, c.num_heads, c.head_dim), cos, sin)
            k = _rope(k.view(-1, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        cache[0].index_copy_(0, batch.slot_mapping, k)
        cache[1].index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)  # (num_tokens, num_heads, head_dim)
        if batch.paged_prefills is not None:
            self._paged_kernels().paged_prefill(q, cache[0], cache[1], batch.paged_prefills,
                                                self.scale, out)
        for span in batch.prefills:
            out[span.start:span.start + span.length] = self._prefill_attention(q, k, v, span,
                                                                                cache)
        for group in batch.decodes:
            end = group.start + group.slots.shape[0]
            out[group.start:end] = self._decode_attention(q[group.start:end], group, cache)
        if batch.paged is not None:
            self._paged_attention(q, batch.paged, cache, out)
        return _linear(out.view(-1, self.q_size), layer.o_proj)

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           span: PrefillSpan, cache: torch.Tensor) -> torch.Tensor:
        end = span.start + span.length
        if span.context_slots is None:
            ks, vs = k[span.start:end], v[span.start:end]
            mask = None
        else:
            ks = cache[0].index_select(0, span.context_slots)  # (context, kv_heads, head_dim)
            vs = cache[1].index_select(0, span.context_slots)
            mask = span.mask
        out = self.attend(_heads_first(q[span.start:end]), _heads_first(ks), _heads_first(vs),
                          mask, self.scale)
        return out[0].transpose(0, 1)

    def _decode_attention(self, q: torch.Tensor, group: DecodeGroup,
                          cache: torch.Tensor) -> torch.Tensor:
        n, context = group.slots.shape
        flat = group.slots.view(-1)
        ks = cache[0].index_select(0, flat).view(n, context, *cache.shape[2:])
        vs = cache[1].index_select(0, flat).view(n, context, *cache.shape[2:])
        out = self.attend(q.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2),
                          group.mask, self.scale)
        return out.squeeze(2)  # (num_decodes, num_heads, head_dim)

    def _paged_attention(self, q: torch.Tensor, paged: PagedDecodes, cache: torch.Tensor,
                         out: torch.Tensor) -> None:
        end = paged.start + paged.count
        self._paged_kernels().paged_decode(q[paged.start:end].contiguous(), cache[0],
                                           cache[1], paged, self.scale, out[paged.start:end])

    def _paged_kernels(self) -> CpuKernels:
        if self.kernels is None:
            raise InvalidParamsError("paged attention needs a model built with kernels")
        return self.kernels


PACK_ROWS = 32


def plain_rows(threads: int) -> int:
    """Where plain float32 matmuls overtake oneDNN's packed ones: on SmolLM2's shapes on a
    2-vCPU EPYC, from about 384 rows with 2 threads (the plain one scales worse across
    threads at fewer rows) and from about 64 with one."""
    return 384 if threads > 1 else 64


def _packs(device: torch.device, dtype: torch.dtype, attention: str) -> bool:
    return (device.type == "cpu" and attention != "eager" and onednn_packs(dtype))


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack ``dtype`` weights on this CPU: float32 wherever oneDNN runs;
    its bf16 and fp16 paths need AVX-512 (or AVX-NE-CONVERT, or AMX), so on an AVX2-only
    CPU a bf16 model keeps plain weights."""
    if not torch._C._has_mkldnn or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) in oneDNN's blocked layout, chosen for about 32 rows a call (it
    measured as good as a layout for 1 or 8 rows at batch 1 and 8, and better above)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    return packed


def _linear(x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.is_mkldnn:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return nnf.linear(x, weight, bias)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # (tokens, heads, head_dim) -> (1, heads, tokens, head_dim): the 4-D form fused kernels want
    return x.transpose(0, 1).unsqueeze(0)


def _bottom_right_causal(length: int, context: int, device: torch.device) -> torch.Tensor:
    """Query ``i`` (absolute ``context - length + i``) sees keys ``0..context - length + i``."""
    rows = torch.arange(length, device=device).unsqueeze(1) + (context - length)
    return torch.arange(context, device=device).unsqueeze(0) <= rows


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # float32 statistics, then back to the activation dtype before the weight (as HF does)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (num_tokens, heads, head_dim); rotate-half layout (HF's)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _take(weights: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    tensor = weights.get(name)
    if tensor is None:
        raise InvalidParamsError(f"weights lack {name!r}")
    return _cast(tensor, dtype, device)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype).contiguous()
