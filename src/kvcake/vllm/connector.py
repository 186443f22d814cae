"""kvcake's store as vLLM's KV cache pool: a KV connector (vLLM's ``KVConnectorBase_V1``).

::

    vLLM EngineCore (scheduler)              vLLM Worker (model runner)
    KvcakeConnector, role SCHEDULER          KvcakeConnector, role WORKER
      get_num_new_matched_tokens:              start_load_kv: the plan's loads, store ->
        batch_is_exist on the prompt's           paged cache, each block checked (header,
        block keys -> leading hits               checksum); a bad one is a load error and
        update_state_after_alloc                 vLLM recomputes from it
        build_connector_meta -> StepPlan  -->  wait_for_save: the plan's saves, paged cache
        request_finished                         -> staging ring -> store, off the step
                     \\____________ kvcake master + nodes (the pool) ____________/

Start vLLM with::

    --kv-transfer-config '{"kv_connector": "KvcakeConnector",
        "kv_connector_module_path": "kvcake.vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"master": "127.0.0.1:50051"}}'

Keys are ``<fingerprint>/<tenant>/<vLLM block hash hex>``. vLLM's block hashes chain from a
fixed seed (sha256 of pickled token ids unless ``PYTHONHASHSEED`` is set), so they agree
across processes and hosts; the fingerprint (:func:`vllm_fingerprint`) names everything else
that makes a block's bytes valid: the model's files, dtypes, block size, hash scheme, vLLM's
version and the CPU's KV layout. Values are kvcake's versioned block records
(:mod:`kvcake.engine.kv.format`): a header and a checksum around every layer's bytes of the
block, which stay opaque (vLLM-CPU's layout inside a block depends on the ISA).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger, setup_package_logging
from kvcake.engine.kv.connector import ConnectorStats, StoreConnector, connect_store
from kvcake.engine.kv.format import DTYPE_CODES, BlockLayout
from kvcake.model import directory_digest
from kvcake.vllm.config import VllmConnectorConfig, connector_config
from kvcake.vllm.plan import StepPlan, StorePlan
from kvcake.wire.kv import store_keys

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = get_logger(__name__)
setup_package_logging()  # vLLM configures only its own loggers

_LOOKUP_TIMEOUT_S = 5.0  # a dead store costs one lookup this long, then a recompute
_LAYOUT_FLAGS = ("amx_bf16", "avx512f", "avx512_bf16")  # pick vLLM-CPU's KV kernels
_STAT_FIELDS = tuple(field.name for field in dataclasses.fields(ConnectorStats))


class KvcakeConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's plan, from the scheduler to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KvcakeConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Block counts since the last report (``ConnectorStats``' fields), summed across
    workers; vLLM logs them and hands them to its metrics."""

    def reset(self) -> None:
        self.data: dict[str, int] = {}

    def aggregate(self, other: KVConnectorStats) -> KvcakeConnectorStats:
        for name, count in other.data.items():
            self.data[name] = self.data.get(name, 0) + count
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvcakeConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """Both halves of the connector; vLLM makes one per role and process."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        if transfer.kv_load_failure_policy != "recompute":
            raise InvalidParamsError(
                'kvcake\'s vLLM connector needs "kv_load_failure_policy": "recompute" in '
                "--kv-transfer-config: a block that fails to load is then recomputed, and "
                "never fails its request")
        self.settings: VllmConnectorConfig = connector_config(
            transfer.kv_connector_extra_config or {})
        self.block_size: int = vllm_config.cache_config.block_size
        self.prefix = f"{vllm_fingerprint(vllm_config)}/{self.settings.tenant}"
        self._vllm_config = vllm_config
        self.plan = StorePlan(self.block_size)
        self._load_errors: set[int] = set()
        self._worker: StoreConnector | None = None
        self._reported = ConnectorStats()
        segment = self.settings.segment_size if role == KVConnectorRole.WORKER else 0
        self.store, self.transfer = connect_store(self.settings.master, segment,
                                                  tenant=self.settings.tenant)
        log.info("kvcake connector (%s) on store %s, keys %s/…", role.name,
                 self.settings.master, self.prefix)

    # -- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        first, stop = self.plan.lookup(request.request_id, request.block_hashes,
                                       request.num_prompt_tokens, num_computed_tokens)
        if stop <= first:
            return 0, False
        hashes = list(request.block_hashes[first:stop])
        return self.plan.matched_tokens(num_computed_tokens, first, self._hits(hashes)), False

    def _hits(self, block_hashes: list[bytes]) -> int:
        """Leading blocks the store holds (0 when it cannot say)."""
        try:
            codes = self.transfer.io.run(
                self.store.batch_is_exist(store_keys(self.prefix, block_hashes)),
                _LOOKUP_TIMEOUT_S)
        except (KvcakeError, concurrent.futures.TimeoutError) as exc:
            log.warning("store lookup failed, computing instead: %r", exc)
            return 0
        return next((i for i, code in enumerate(codes) if code != 1), len(codes))

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        self.plan.allocated(request.request_id, request.num_computed_tokens,
                            num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KvcakeConnectorMetadata:
        manager = self._kv_cache_manager
        requests = self._requests_by_id(scheduler_output)
        plan = self.plan.step(dict(scheduler_output.num_scheduled_tokens),
                              lambda rid: requests[rid],
                              lambda rid: manager.get_block_ids(rid)[0])
        return KvcakeConnectorMetadata(plan)

    @staticmethod
    def _requests_by_id(scheduler_output: Any) -> dict[str, int]:
        """Each scheduled request's computed tokens before this step."""
        computed = {new.req_id: new.num_computed_tokens
                    for new in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        return computed

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, None]:
        self.plan.finished(request.request_id)
        return False, None  # saves are staged during the step: the blocks are free to go

    # -- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = list(kv_caches.values())
        layout = self._block_layout(layers)
        staging = max(2, self.settings.staging_bytes // layout.record_bytes)
        self._worker = StoreConnector(self.store, self.transfer, layout, layers, staging)

    def _block_layout(self, layers: list[torch.Tensor]) -> BlockLayout:
        model = self._vllm_config.model_config
        heads = model.get_num_kv_heads(self._vllm_config.parallel_config)
        dtype = str(layers[0].dtype).removeprefix("torch.")
        layout = BlockLayout(dtype, len(layers), heads, model.get_head_size(), self.block_size,
                             self.prefix.split("/")[0])
        block_bytes = len(layers) * layers[0][0].numel() * layers[0].element_size()
        if dtype not in DTYPE_CODES or block_bytes != layout.payload_bytes:
            raise InvalidParamsError(
                f"kvcake's vLLM connector needs block-major {sorted(DTYPE_CODES)} KV caches "
                f"(vLLM-CPU's); got {len(layers)} layers of {tuple(layers[0].shape)} "
                f"{dtype}")
        return layout

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None, "register_kv_caches comes first"
        for run in self._metadata_plan().loads:
            valid = self._worker.load(self.prefix, list(run.block_ids), list(run.block_hashes))
            self._load_errors.update(run.block_ids[valid:])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # wait_for_save stages whole blocks once every layer is written

    def wait_for_save(self) -> None:
        if self._worker is None or not self.has_connector_metadata():
            return
        for run in self._metadata_plan().saves:
            self._worker.save(self.prefix, list(run.block_ids), list(run.block_hashes))

    def _metadata_plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvcakeConnectorMetadata)
        return meta.plan

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KvcakeConnectorStats | None:
        if self._worker is None:
            return None
        now = dataclasses.replace(self._worker.stats)
        delta = {name: getattr(now, name) - getattr(self._reported, name)
                 for name in _STAT_FIELDS}
        self._reported = now
        return KvcakeConnectorStats(data=delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KvcakeConnectorStats:
        return KvcakeConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            log.info("kvcake connector: %s blocks", ", ".join(
                f"{getattr(self._worker.stats, name)} {name.removesuffix('_blocks')}"
                for name in _STAT_FIELDS if name.endswith("_blocks")))
        else:
            self.transfer.io.run(self.store.close(), 10.0)
            self.transfer.close()


def vllm_fingerprint(vllm_config: VllmConfig) -> str:
    """Everything besides the prompt that makes a stored block's bytes valid."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    path = Path(model.model)
    files = directory_digest(path) if path.is_dir() else f"{model.model}@{model.revision}"
    text = "|".join(map(str, (
        "vllm", vllm.__version__, files, model.dtype, cache.cache_dtype, cache.block_size,
        getattr(cache, "prefix_caching_hash_algo", ""), os.environ.get("PYTHONHASHSEED", ""),
        platform.machine(), ",".join(_cpu_flags()))))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = {flag for line in text.splitlines() if line.startswith("flags")
             for flag in line.partition(":")[2].split()}
    return sorted(flags & set(_LAYOUT_FLAGS))
