"""The role-agnostic engine loop: requests in, one scheduler step at a time, tokens out.

:class:`EngineCore` knows token ids only (no text). The offline :class:`~kvcake.engine.llm.LLM`
and the serving processes wrap it: they tokenize, detokenize, apply stop strings and call
:meth:`EngineCore.abort` when one matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import prefix_block_hashes
from kvcake.engine.config import EngineConfig
from kvcake.engine.kv.blocks import paged_layers
from kvcake.engine.kv.connector import StoreConnector, connect_store
from kvcake.engine.kv.format import BlockLayout
from kvcake.engine.kv.manager import KVCacheManager
from kvcake.engine.kv.transfer import kv_cache_in
from kvcake.engine.model.kernels import CpuKernels, load_cpu_kernels
from kvcake.engine.model.llama import LlamaModel, plain_rows
from kvcake.engine.model.weights import load_weights
from kvcake.engine.request import Request, RequestStatus
from kvcake.engine.runner import ModelRunner
from kvcake.engine.sampling import skip_draws
from kvcake.engine.scheduler import KVConnector, Scheduler, SchedulerOutput
from kvcake.model import ModelFiles, cache_root, resolve_model
from kvcake.transfer import Segment, TransferEngine
from kvcake.wire.kv import KVRegion
from kvcake.wire.output import TokenOutput, TopLogprobs
from kvcake.wire.sampling import SamplingParams, fit_context

log = logging.getLogger(__name__)

KV_LAYOUT_VERSION = 1
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class StepHook(Protocol):
    """Sees each step around the model run (the KV sender of a prefill instance)."""

    def before_execute(self, output: SchedulerOutput) -> None:
        """The blocks of ``output.preempted`` are free again: nothing may still read them."""

    def after_layer(self, layer: int) -> None:
        """Layer ``layer``'s K/V of this step's chunks are in their blocks; later layers
        are still computing."""

    def after_execute(self, output: SchedulerOutput) -> None:
        """The chunks' K/V are now in their blocks (block tables not yet released)."""


@dataclass(frozen=True)
class StepStats:
    """What the last step ran and how long it took (for the conductor's cost model)."""

    num_prefill_chunks: int
    num_prefill_tokens: int
    num_prefill_context_tokens: int  # tokens before each chunk, summed (cached or earlier)
    num_decodes: int
    num_decode_context_tokens: int
    seconds: float


@dataclass(frozen=True)
class EngineLoad:
    num_waiting: int
    num_running: int
    num_waiting_tokens: int
    num_running_tokens: int
    num_free_blocks: int
    num_blocks: int


class EngineCore:
    """Model, KV cache, scheduler and (optionally) the store connector, driven by ``step``.

    With a ``transfer`` engine the KV cache lives in a registered segment (``kv_region``
    says where) that peers write into: a decode instance :meth:`reserve`-s blocks, a prefill
    instance fills them, and :meth:`commit` joins the request to the running batch.
    """

    def __init__(self, config: EngineConfig, files: ModelFiles | None = None,
                 connector: KVConnector | None = None,
                 transfer: TransferEngine | None = None) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.files = files or resolve_model(config.model, config.cache_dir or None)
        self.model_config = self.files.config
        self.dtype = DTYPES[config.dtype]
        num_blocks = self._num_blocks()
        self.max_model_len = self._max_model_len(num_blocks)
        weights = load_weights(self.files, self.dtype, config.device)
        model = LlamaModel(self.model_config, weights, self.dtype, config.device,
                           max_positions=self.max_model_len, attention=config.attention,
                           kernels=self._cpu_kernels(),
                           plain_prefill=config.plain_prefill_weights and  # steps that use it
                           config.max_num_batched_tokens >= plain_rows(torch.get_num_threads()))
        del weights
        self.fingerprint = kv_fingerprint(self.files, config)
        self.transfer = transfer
        self.kv_segment: Segment | None = None
        self.kv_region: KVRegion | None = None
        kv_cache = None if transfer is None else self._shared_kv_cache(transfer, num_blocks)
        self.runner = ModelRunner(model, num_blocks, config.block_size, kv_cache,
                                  self.model_config.eos_token_ids)
        self.store: StoreConnector | None = None
        if connector is None and config.store_master:
            connector = self.store = self._connect_store()
        self.kv_events: list[tuple[str, bytes]] = []  # ("stored" | "removed", hash), in order
        self.scheduler = Scheduler(
            KVCacheManager(num_blocks, config.block_size, self._on_cache, self._on_evict,
                           self.runner.copy_block),
            config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, connector,
            self.model_config.eos_token_ids)
        self.step_hook: StepHook | None = None
        self.last_step: StepStats | None = None
        # by request id: the reserved blocks, and how many of them lead cached already
        self._reserved: dict[str, tuple[list[int], int]] = {}
        log.info("engine: %s %s, %d KV blocks of %d tokens, max_model_len %d",
                 config.model, config.dtype, num_blocks, config.block_size, self.max_model_len)

    def _cpu_kernels(self) -> CpuKernels | None:
        """kvcake's compiled kernels on a CPU, except for ``eager`` (HF's exact math)."""
        if self.config.attention == "eager" or self.config.device != "cpu":
            return None
        c = self.model_config
        return load_cpu_kernels(self.dtype, c.head_dim, c.num_heads // c.num_kv_heads,
                                 cache_root(self.config.cache_dir))

    def _shared_kv_cache(self, transfer: TransferEngine, num_blocks: int) -> torch.Tensor:
        c = self.model_config
        num_slots = num_blocks * self.config.block_size
        shape = (c.num_layers, 2, num_slots, c.num_kv_heads, c.head_dim)
        slot_bytes = c.num_kv_heads * c.head_dim * self.dtype.itemsize
        segment = transfer.register_segment(f"kv-{os.getpid()}",
                                            c.num_layers * 2 * num_slots * slot_bytes)
        self.kv_segment = segment
        self.kv_region = KVRegion(transfer.local_descriptor(segment.name), self.fingerprint,
                                  c.num_layers, num_slots, slot_bytes, self.config.block_size)
        return kv_cache_in(segment.view, shape, self.dtype)

    def _on_cache(self, block_hash: bytes) -> None:
        self.kv_events.append(("stored", block_hash))

    def _on_evict(self, block_hash: bytes) -> None:
        self.kv_events.append(("removed", block_hash))

    def _connect_store(self) -> StoreConnector:
        c, cfg = self.model_config, self.config
        layout = BlockLayout(cfg.dtype, c.num_layers, c.num_kv_heads, c.head_dim,
                             cfg.block_size, self.fingerprint)
        host = self.transfer.config.host if self.transfer is not None else None
        store, engine = connect_store(cfg.store_master, cfg.store_segment_size, host, cfg.tenant)
        return StoreConnector(store, engine, layout,
                              paged_layers(self.runner.kv_cache, cfg.block_size),
                              self._save_slots())

    def _save_slots(self) -> int:
        """256, or every block one step can complete and one more, if that is more: a ring
        with fewer slots drops saves even while the store keeps up (as
        :func:`kvcake.vllm.config.staging_slots` sizes vLLM's)."""
        return max(256, self.config.max_num_batched_tokens // self.config.block_size + 1)

    def close(self) -> None:
        """Finish pending saves and leave the store (the model itself needs no closing)."""
        if self.store is not None:
            self.store.close()
            self.store = None
        self.kv_segment = None  # the transfer engine that registered it unregisters it

    def _max_model_len(self, num_blocks: int) -> int:
        """The model's limit, the configured one, and what the whole KV pool can hold."""
        limit = self.model_config.max_position_embeddings
        return min(self.config.max_model_len or limit, limit, num_blocks * self.config.block_size)

    def _num_blocks(self) -> int:
        per_block = self.config.block_size * self.model_config.kv_bytes_per_token(
            self.dtype.itemsize)
        num_blocks = self.config.kv_cache_bytes // per_block
        if num_blocks < 2:
            raise InvalidParamsError(f"kv_cache_bytes {self.config.kv_cache_bytes} holds "
                                     f"fewer than 2 blocks of {per_block} bytes")
        return num_blocks

    def salt(self, tenant: str | None = None) -> bytes:
        """Prefix-hash salt: blocks of another model, layout or tenant never match."""
        return f"{self.fingerprint}/{tenant or self.config.tenant}".encode()

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, tenant: str | None = None) -> Request:
        """Queue a request; bad ids or lengths raise ``InvalidParamsError``.

        ``max_tokens`` None generates up to ``max_model_len``; a larger ``max_tokens`` stops
        there (the API refuses it beforehand, see :func:`fit_context`).
        """
        if request_id in self.scheduler.requests:
            raise InvalidParamsError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids)
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        if params.max_tokens is None:
            params = fit_context(params, len(prompt_token_ids), self.max_model_len)
        request = Request(request_id, list(prompt_token_ids), params, self.salt(tenant))
        self.scheduler.add(request)
        return request

    def _check_prompt(self, tokens: list[int]) -> None:
        if not tokens:
            raise InvalidParamsError("the prompt is empty")
        if len(tokens) >= self.max_model_len:
            raise InvalidParamsError(f"prompt of {len(tokens)} tokens does not fit "
                                     f"max_model_len {self.max_model_len}")
        self._check_token_ids("token id", tokens)

    def _check_token_ids(self, what: str, tokens: Sequence[int]) -> None:
        """Every id indexes the model's vocabulary (a stop id past it broke the sampler)."""
        vocab = self.model_config.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParamsError(f"{what} {bad} is outside the vocabulary (0..{vocab - 1})")

    def abort(self, request_id: str) -> TokenOutput | None:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> TokenOutput | None:
        request = self.scheduler.finish(request_id, status)
        return None if request is None else _output(request, 0)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[TokenOutput]:
        """Schedule, run the model once, update; outputs for requests that progressed."""
        start = time.perf_counter()
        output = self.scheduler.schedule()
        if not output.chunks:
            return []
        hook = self.step_hook
        if hook is not None:
            hook.before_execute(output)
        result = self.runner.execute(output, None if hook is None else hook.after_layer)
        if hook is not None:
            hook.after_execute(output)
        now = time.monotonic()
        outputs = []
        for request in self.scheduler.update(output, result):
            if request.first_token_s is None:
                request.first_token_s = now - request.arrival_s
            outputs.append(_output(request, 1))
        self.last_step = _step_stats(output, time.perf_counter() - start)
        return outputs

    # -- disaggregation: the decode side ----------------------------------------------

    def reserve(self, request_id: str, num_prompt_tokens: int,
                prompt_token_ids: Sequence[int] = (), tenant: str | None = None
                ) -> list[int] | None:
        """Hold blocks for a prompt's K/V that a prefill instance will write; ``None`` when
        the pool cannot hold them now, or ``max_num_seqs`` requests already run or hold a
        reservation (a decode batch that grew without bound would slow every token).
        Given the prompt's tokens, its leading blocks that this cache holds are taken as
        they are (:meth:`num_reserved_cached` says how many): the prefill writes the rest.
        Released by :meth:`commit` or :meth:`release`."""
        if request_id in self._reserved or request_id in self.scheduler.requests:
            raise InvalidParamsError(f"request id {request_id!r} is already in use")
        if not 0 < num_prompt_tokens < self.max_model_len:
            raise InvalidParamsError(f"prompt of {num_prompt_tokens} tokens does not fit "
                                     f"max_model_len {self.max_model_len}")
        if prompt_token_ids and len(prompt_token_ids) != num_prompt_tokens:
            raise InvalidParamsError(f"{len(prompt_token_ids)} prompt tokens given for a "
                                     f"prompt of {num_prompt_tokens}")
        count = -(-num_prompt_tokens // self.config.block_size)
        busy = len(self.scheduler.running) + len(self.scheduler.waiting) + len(self._reserved)
        if busy >= self.config.max_num_seqs:
            return None
        reserved = self.scheduler.kv.reserve(count, self._reusable(prompt_token_ids, tenant))
        if reserved is None:
            return None
        self._reserved[request_id] = reserved
        return list(reserved[0])

    def _reusable(self, prompt_token_ids: Sequence[int], tenant: str | None) -> list[bytes]:
        """Hashes of the prompt's blocks a decode instance may take from its cache: all
        full ones but the last token's (the prefill computes that one, as on any hit)."""
        block_size = self.config.block_size
        usable = max(0, len(prompt_token_ids) - 1) // block_size * block_size
        return prefix_block_hashes(prompt_token_ids[:usable], block_size, self.salt(tenant))

    def num_reserved_cached(self, request_id: str) -> int:
        """Leading blocks of ``request_id``'s reservation that held its KV already."""
        return self._reserved.get(request_id, ([], 0))[1]

    def release(self, request_id: str) -> bool:
        """Give reserved blocks back (the prefill failed or the request ended early)."""
        reserved = self._reserved.pop(request_id, None)
        if reserved is None:
            return False
        self.scheduler.kv.release(reversed(reserved[0]))
        return True

    def commit(self, request_id: str, prompt_token_ids: list[int], first_token: int,
               first_logprob: float, params: SamplingParams,
               tenant: str | None = None,
               first_top_logprobs: TopLogprobs | None = None) -> Request:
        """The reserved blocks now hold the prompt's K/V: decode from ``first_token`` on."""
        if request_id not in self._reserved:
            raise InvalidParamsError(f"request {request_id!r} has no reserved blocks")
        block_ids = self._reserved[request_id][0]
        self._check_prompt(prompt_token_ids)
        self._check_token_ids("first token", [first_token])  # before the seat is taken
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        if len(block_ids) != -(-len(prompt_token_ids) // self.config.block_size):
            raise InvalidParamsError(f"request {request_id!r}: {len(prompt_token_ids)} prompt "
                                     f"tokens for {len(block_ids)} reserved blocks")
        del self._reserved[request_id]
        request = Request(request_id, list(prompt_token_ids), params, self.salt(tenant))
        if request.generator is not None and not params.greedy:  # the prefill drew one
            skip_draws(request.generator, 1, self.model_config.vocab_size)
        request.output_token_ids.append(first_token)
        request.output_logprobs.append(first_logprob)
        request.output_top_logprobs.append(first_top_logprobs or [])
        request.num_computed_tokens = request.num_cached_tokens = len(prompt_token_ids)
        request.extend_block_hashes(self.config.block_size)
        self.scheduler.kv.adopt(request, block_ids)
        self.scheduler.add_running(request)
        return request

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def load(self) -> EngineLoad:
        s = self.scheduler
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting)
        return EngineLoad(len(s.waiting), len(s.running), waiting_tokens,
                          sum(r.num_tokens for r in s.running), s.kv.num_free_blocks,
                          s.kv.num_blocks)

    def check_integrity(self) -> None:
        """Every block is owned by exactly the requests and reservations that hold it."""
        held = [r.block_ids for r in self.scheduler.running]
        held += [block_ids for block_ids, _ in self._reserved.values()]
        self.scheduler.kv.check_integrity(held)

    def drain_kv_events(self) -> list[tuple[str, bytes]]:
        events, self.kv_events = self.kv_events, []
        return events


def _step_stats(output: SchedulerOutput, seconds: float) -> StepStats:
    prefills = [c for c in output.chunks if c.num_tokens > 1]
    decodes = [c for c in output.chunks if c.num_tokens == 1]
    return StepStats(len(prefills), sum(c.num_tokens for c in prefills),
                     sum(c.start for c in prefills), len(decodes),
                     sum(c.start + 1 for c in decodes), seconds)


def _output(request: Request, num_new: int) -> TokenOutput:
    finished = request.status.finished
    first = len(request.output_token_ids) - num_new
    scored = num_new and not first and request.params.prompt_logprobs is not None
    return TokenOutput(
        request.request_id, request.output_token_ids[first:], request.output_logprobs[first:],
        request.status.value if finished else None, request.num_prompt_tokens,
        request.num_cached_tokens, request.num_store_tokens,
        request.output_top_logprobs[first:],
        list(request.prompt_logprobs) if scored else None,
        list(request.prompt_top_logprobs) if scored else None, request.first_token_s)


def kv_fingerprint(files: ModelFiles, config: EngineConfig) -> str:
    """Names everything that makes a KV block valid: weights, architecture, dtype, layout."""
    text = "|".join((files.weights_digest, files.config.fingerprint(), config.dtype,
                     str(config.block_size), f"layout-v{KV_LAYOUT_VERSION}"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
