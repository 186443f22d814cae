"""The role-agnostic engine loop: requests in, one scheduler step at a time, tokens out.

:class:`EngineCore` knows token ids only (no text). The offline :class:`~kvcake.engine.llm.LLM`
and the serving processes wrap it: they tokenize, detokenize, apply stop strings and call
:meth:`EngineCore.abort` when one matches.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import torch

from kvcake.common.config import EngineConfig
from kvcake.common.errors import InvalidParamsError
from kvcake.engine.connector import StoreConnector, connect_store
from kvcake.engine.kv_cache import KVCacheManager
from kvcake.engine.kv_format import BlockLayout
from kvcake.engine.model import LlamaModel
from kvcake.engine.request import Request, RequestStatus
from kvcake.engine.runner import ModelRunner
from kvcake.engine.sampling import SamplingParams
from kvcake.engine.scheduler import KVConnector, Scheduler
from kvcake.engine.weights import ModelFiles, load_weights, resolve_model

log = logging.getLogger(__name__)

KV_LAYOUT_VERSION = 1
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request.

    new_token_ids: tokens drawn this step (empty for a chunk that did not sample).
    finish_reason: ``stop``, ``length`` or ``abort`` once finished, else ``None``.
    num_cached_tokens: prompt tokens whose KV was reused (local cache or store).
    num_store_tokens: the part of those loaded from the store.
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_store_tokens: int
    first_token_s: float | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCore:
    """Model, KV cache, scheduler and (optionally) the store connector, driven by ``step``."""

    def __init__(self, config: EngineConfig, files: ModelFiles | None = None,
                 connector: KVConnector | None = None) -> None:
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
                           max_positions=self.max_model_len, attention=config.attention)
        del weights
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.fingerprint = kv_fingerprint(self.files, config)
        self.store: StoreConnector | None = None
        if connector is None and config.store_master:
            connector = self.store = self._connect_store()
        self.scheduler = Scheduler(
            KVCacheManager(num_blocks, config.block_size), config.max_num_seqs,
            config.max_num_batched_tokens, self.max_model_len, connector,
            self.model_config.eos_token_ids)
        log.info("engine: %s %s, %d KV blocks of %d tokens, max_model_len %d",
                 config.model, config.dtype, num_blocks, config.block_size, self.max_model_len)

    def _connect_store(self) -> StoreConnector:
        c, cfg = self.model_config, self.config
        layout = BlockLayout(cfg.dtype, c.num_layers, c.num_kv_heads, c.head_dim,
                             cfg.block_size, self.fingerprint)
        store, engine = connect_store(cfg.store_master, cfg.store_segment_size)
        return StoreConnector(store, engine, layout, self.runner.kv_cache)

    def close(self) -> None:
        """Finish pending saves and leave the store (the model itself needs no closing)."""
        if self.store is not None:
            self.store.close()
            self.store = None

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
        """Queue a request; bad ids or lengths raise ``InvalidParamsError``."""
        if request_id in self.scheduler.requests:
            raise InvalidParamsError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids)
        request = Request(request_id, list(prompt_token_ids), params, self.salt(tenant))
        self.scheduler.add(request)
        return request

    def _check_prompt(self, tokens: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if not tokens:
            raise InvalidParamsError("the prompt is empty")
        if len(tokens) >= self.max_model_len:
            raise InvalidParamsError(f"prompt of {len(tokens)} tokens does not fit "
                                     f"max_model_len {self.max_model_len}")
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParamsError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> RequestOutput | None:
        request = self.scheduler.finish(request_id, status)
        return None if request is None else _output(request, 0)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, update; outputs for requests that progressed."""
        output = self.scheduler.schedule()
        if not output.chunks:
            return []
        sampled = self.runner.execute(output)
        now = time.monotonic()
        outputs = []
        for request in self.scheduler.update(output, sampled):
            if request.first_token_s is None:
                request.first_token_s = now - request.arrival_s
            outputs.append(_output(request, 1))
        return outputs


def _output(request: Request, num_new: int) -> RequestOutput:
    finished = request.status.finished
    return RequestOutput(
        request.request_id, request.output_token_ids[len(request.output_token_ids) - num_new:],
        request.output_logprobs[len(request.output_logprobs) - num_new:],
        request.status.value if finished else None, request.num_prompt_tokens,
        request.num_cached_tokens, request.num_store_tokens, request.first_token_s)


def kv_fingerprint(files: ModelFiles, config: EngineConfig) -> str:
    """Names everything that makes a KV block valid: weights, architecture, dtype, layout."""
    text = "|".join((files.weights_digest, files.config.fingerprint(), config.dtype,
                     str(config.block_size), f"layout-v{KV_LAYOUT_VERSION}"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
