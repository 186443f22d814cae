"""Turns a scheduler step into tensors, runs the model and samples.

Flat batch layout (see :mod:`kvcake.engine.model.llama`): prompt chunks first, then decodes
(one generated token each). With the paged kernels the prompt chunks share one call and the
decodes another, both reading the cache in place; without them each chunk gathers its context
and the decodes run in padded groups. A prompt chunk of one token (the last token of a prompt
cached whole) runs as a prefill, so its logits come from the same kernel as a cold prefill's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from kvcake.engine.model.kernels import PagedDecodes, PagedPrefills
from kvcake.engine.model.llama import (
    AttentionBatch,
    DecodeGroup,
    LayerDone,
    LlamaModel,
    PrefillSpan,
)
from kvcake.engine.model.logprobs import ROWS_PER_SLICE, PromptLogprobs, score_tokens
from kvcake.engine.penalties import TokenHistory
from kvcake.engine.request import Request
from kvcake.engine.sampling import Sampler
from kvcake.engine.scheduler import RunnerOutput, SampledToken, ScheduledChunk, SchedulerOutput
from kvcake.wire.output import TopLogprobs


class ModelRunner:
    """The model, its paged KV cache and the sampler (``eos_token_ids`` for ``min_tokens``)."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int,
                 kv_cache: torch.Tensor | None = None, eos_token_ids: Iterable[int] = ()) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache = model.new_kv_cache(num_blocks * block_size) if kv_cache is None \
            else kv_cache
        kernels = model.kernels
        self.sampler = Sampler(greedy=None if kernels is None else kernels.greedy)
        self.device = model.device
        self.eos_token_ids = frozenset(eos_token_ids)

    def execute(self, output: SchedulerOutput, on_layer: LayerDone | None = None
                ) -> RunnerOutput:
        """Run one step: the token drawn for every chunk that samples, and the prompt
        tokens' scores for chunks of requests that asked for them (``on_layer``: see
        :meth:`LlamaModel.forward`)."""
        prefills = [c for c in output.chunks if not _decodes(c)]
        decodes = sorted((c for c in output.chunks if _decodes(c)), key=lambda c: c.start)
        ordered = prefills + decodes
        input_ids = torch.tensor(_flat_tokens(ordered), dtype=torch.long, device=self.device)
        batch = self._attention_batch(prefills, decodes)
        hidden = self.model.forward(input_ids, batch, self.kv_cache, on_layer)
        return RunnerOutput(self._sample(ordered, hidden), self._score_prompts(ordered, hidden))

    def copy_block(self, source: int, destination: int) -> None:
        """Copy one block's K/V, every layer, into another block."""
        size = self.block_size
        self.kv_cache[:, :, destination * size:(destination + 1) * size] = \
            self.kv_cache[:, :, source * size:(source + 1) * size]

    def _attention_batch(self, prefills: list[ScheduledChunk],
                         decodes: list[ScheduledChunk]) -> AttentionBatch:
        positions = [torch.arange(c.start, c.start + c.num_tokens, device=self.device)
                     for c in prefills]
        tables = [torch.tensor(c.request.block_ids, dtype=torch.long, device=self.device)
                  for c in prefills]
        slots = [self._slots(table, pos) for table, pos in zip(tables, positions, strict=True)]
        offset = sum(c.num_tokens for c in prefills)
        if self.model.reads_pages:
            pages = self._paged_prefills(prefills) if prefills else None
            if not decodes:
                return AttentionBatch(torch.cat(slots), torch.cat(positions), (), offset,
                                      paged_prefills=pages)
            paged, pos, own = self._paged_inputs(decodes, offset)
            return AttentionBatch(torch.cat([*slots, own]), torch.cat([*positions, pos]),
                                  (), offset, paged=paged, paged_prefills=pages)
        spans = tuple(self._prefill_spans(prefills, tables))
        groups = []
        start = offset
        for group in _length_groups(decodes):
            pos, chunk_slots, context_slots, mask = self._decode_inputs(group)
            positions.append(pos)
            slots.append(chunk_slots)
            groups.append(DecodeGroup(start, context_slots, mask))
            start += len(group)
        return AttentionBatch(torch.cat(slots), torch.cat(positions), spans, offset,
                              tuple(groups))

    def _prefill_spans(self, prefills: list[ScheduledChunk],
                       tables: list[torch.Tensor]) -> Iterator[PrefillSpan]:
        """Each chunk's place in the flat batch and, after a cached prefix, its context's
        slots (gathered for ``sdpa``)."""
        offset = 0
        for chunk, table in zip(prefills, tables, strict=True):
            if chunk.start:
                end = chunk.start + chunk.num_tokens
                context = self._slots(table, torch.arange(end, device=self.device))
                yield PrefillSpan.over_context(offset, chunk.num_tokens, context)
            else:
                yield PrefillSpan(offset, chunk.num_tokens, None)
            offset += chunk.num_tokens

    def _paged_prefills(self, prefills: list[ScheduledChunk]) -> PagedPrefills:
        """The kernel's block tables, first positions and lengths of the prompt chunks."""
        ends = [c.start + c.num_tokens for c in prefills]
        tables = torch.tensor(_block_tables(prefills, ends, self.block_size), dtype=torch.int32)
        return PagedPrefills(tables, torch.tensor([c.start for c in prefills], dtype=torch.int32),
                             torch.tensor([c.num_tokens for c in prefills], dtype=torch.int32),
                             self.block_size)

    def _paged_inputs(self, decodes: list[ScheduledChunk],
                      start: int) -> tuple[PagedDecodes, torch.Tensor, torch.Tensor]:
        """The kernel's block tables and lengths, the new tokens' positions and slots."""
        lengths = [c.start + 1 for c in decodes]
        size = self.block_size
        own = [c.request.block_ids[c.start // size] * size + c.start % size for c in decodes]
        tables = torch.tensor(_block_tables(decodes, lengths, size), dtype=torch.int32)
        paged = PagedDecodes(start, tables, torch.tensor(lengths, dtype=torch.int32), size)
        return (paged, torch.tensor([c.start for c in decodes], dtype=torch.long),
                torch.tensor(own, dtype=torch.long))

    def _decode_inputs(self, decodes: list[ScheduledChunk]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = [c.start + 1 for c in decodes]
        tables = _block_tables(decodes, lengths, self.block_size)
        table = torch.tensor(tables, dtype=torch.long, device=self.device)  # (n, width)
        context = max(lengths)
        cols = torch.arange(context, device=self.device)
        slots = self._slots(table, cols)  # (n, context)
        lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
        mask = (cols.unsqueeze(0) < lens.unsqueeze(1)).view(len(decodes), 1, 1, context)
        rows = torch.arange(len(decodes), device=self.device)
        own = slots[rows, lens - 1]
        return lens - 1, own, slots, mask

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each position given a block table (``(..., width)``)."""
        blocks = table[..., positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def _sample(self, ordered: Sequence[ScheduledChunk],
                hidden: torch.Tensor) -> dict[str, SampledToken]:
        rows: list[int] = []
        sampling: list[ScheduledChunk] = []
        end = 0
        for chunk in ordered:
            end += chunk.num_tokens
            if chunk.samples:
                rows.append(end - 1)
                sampling.append(chunk)
        if not rows:
            return {}
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = self.model.logits(hidden.index_select(0, index))
        params = [c.request.params for c in sampling]
        histories = ([self._history(c.request) for c in sampling]
                     if any(p.penalised for p in params) else None)
        result = self.sampler.sample(logits, params, [c.request.generator for c in sampling],
                                     histories)
        tops: list[TopLogprobs] = result.top_logprobs or [[] for _ in sampling]
        return {c.request.request_id: SampledToken(t, lp, top) for c, t, lp, top in
                zip(sampling, result.token_ids, result.logprobs, tops, strict=True)}

    def _history(self, request: Request) -> TokenHistory:
        stops = set(request.params.stop_token_ids)
        if not request.params.ignore_eos:
            stops |= self.eos_token_ids
        return TokenHistory(request.prompt_token_ids, request.output_token_ids,
                            frozenset(stops))

    def _score_prompts(self, ordered: Sequence[ScheduledChunk],
                       hidden: torch.Tensor) -> dict[str, PromptLogprobs]:
        """Scores of the prompt tokens each asking chunk predicts (see engine/model/logprobs.py)."""
        scores: dict[str, PromptLogprobs] = {}
        offset = 0
        for chunk in ordered:
            num_top = chunk.request.params.prompt_logprobs
            end = min(chunk.start + chunk.num_tokens, chunk.request.num_prompt_tokens - 1)
            if num_top is not None and end > chunk.start:
                rows = hidden[offset:offset + end - chunk.start]  # (end - start, hidden)
                scores[chunk.request.request_id] = self._score(chunk, rows, num_top)
            offset += chunk.num_tokens
        return scores

    def _score(self, chunk: ScheduledChunk, rows: torch.Tensor, num_top: int) -> PromptLogprobs:
        first = chunk.start + 1
        targets = chunk.request.prompt_token_ids[first:first + rows.shape[0]]
        logprobs: list[float] = []
        tops: list[TopLogprobs] = []
        for at in range(0, rows.shape[0], ROWS_PER_SLICE):
            ids = torch.tensor(targets[at:at + ROWS_PER_SLICE], dtype=torch.long,
                               device=self.device)
            chosen, top = score_tokens(self.model.logits(rows[at:at + ROWS_PER_SLICE]), ids,
                                       num_top)
            logprobs += chosen
            tops += top
        return PromptLogprobs(first, logprobs, tops)


GROUP_SLACK_TOKENS = 256  # padding a group may always add, however short its contexts


def _length_groups(decodes: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    """Decodes (sorted by context length) cut into groups whose longest context is at most
    twice the shortest (plus a little slack), so padding wastes at most about half::

        contexts  90 130 200 250 | 900 1400 | 3800      -> three attention calls
    """
    groups: list[list[ScheduledChunk]] = []
    for chunk in decodes:
        if groups and chunk.start + 1 <= max(2 * (groups[-1][0].start + 1),
                                             groups[-1][0].start + 1 + GROUP_SLACK_TOKENS):
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


def _block_tables(chunks: list[ScheduledChunk], lengths: list[int],
                  block_size: int) -> list[list[int]]:
    """Each chunk's block ids, as many as the longest context needs, padded with 0."""
    width = -(-max(lengths) // block_size)
    return [c.request.block_ids[:width] + [0] * (width - len(c.request.block_ids[:width]))
            for c in chunks]


def _decodes(chunk: ScheduledChunk) -> bool:
    """Whether ``chunk`` is one generated token (not a prompt's)."""
    return chunk.num_tokens == 1 and chunk.start >= chunk.request.num_prompt_tokens


def _flat_tokens(chunks: Sequence[ScheduledChunk]) -> list[int]:
    tokens: list[int] = []
    for chunk in chunks:
        tokens.extend(chunk.request.token_slice(chunk.start, chunk.start + chunk.num_tokens))
    return tokens
