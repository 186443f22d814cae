"""kvcake's store as vLLM's KV cache pool: a KV connector (vLLM's ``KVConnectorBase_V1``).

::

    vLLM EngineCore (scheduler)              vLLM Worker (model runner)
    KvcakeConnector, role SCHEDULER          KvcakeConnector, role WORKER
      get_num_new_matched_tokens:              start_load_kv: the plan's loads, store ->
        batch_is_exist on the prompt's           paged cache (layered_load: layer by layer
        block keys -> leading hits, then         on a helper thread, wait_for_layer_load
        an earlier prompt's partial block        waiting for each); each block checked
        where they stop
        update_state_after_alloc
                                                 (header, checksum): a bad one is a load
                                                 error and vLLM recomputes from it
        build_connector_meta -> StepPlan  -->  wait_for_save: the plan's saves, paged cache
        request_finished                         -> staging ring -> store, off the step
                     \\____________ kvcake master + nodes (the pool) ____________/

Start vLLM with::

    --kv-transfer-config '{"kv_connector": "KvcakeConnector",
        "kv_connector_module_path": "kvcake.vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"master": "127.0.0.1:50051"}}'

Keys are ``<fingerprint>/<tenant>/<block hash hex>``, the block hash kvcake's own: SHA-256
chained over the prompt's token ids, block by block, salted with ``<fingerprint>/<tenant>``
(:func:`kvcake.common.hashing.prefix_block_hashes`), and a key of its own kind for the
partial last block of a prompt longer than a block, so that a hit leaves one token to
compute (:func:`kvcake.vllm.plan.prompt_block_hashes`) and a longer prompt that starts with
this one loads its tail too (:func:`kvcake.vllm.plan.tail_candidates`). The Conductor
hashes a prompt's full blocks the same way, so it sees which leading blocks the store holds
for a vLLM instance as for one of kvcake's, and the keys never depend on vLLM's own hash
seed (``PYTHONHASHSEED``, its hash algorithm). The fingerprint (:func:`vllm_fingerprint`)
names everything else that makes a block's bytes valid: the model's files, dtypes, block
size, vLLM's version and the CPU's KV layout. Values are kvcake's versioned block records
(:mod:`kvcake.engine.kv.format`): a header and a checksum around every layer's bytes of the
block, which stay opaque (vLLM-CPU's layout inside a block depends on the ISA).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvcake.common.codec import encode
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger, setup_package_logging
from kvcake.common.rpc import RpcClient
from kvcake.engine.kv.connector import (
    ConnectorStats,
    PendingLoad,
    StoreConnector,
    connect_store,
)
from kvcake.engine.kv.format import DTYPE_CODES, BlockLayout
from kvcake.engine.kv.transfer import KVSender
from kvcake.model import directory_digest
from kvcake.transfer.segment import Segment, instance_registrant
from kvcake.vllm.config import VllmConnectorConfig, connector_config, staging_slots
from kvcake.vllm.control import ControlServer
from kvcake.vllm.pd import Arrival, DecodeWait, PdPlan, PrefillTarget, Send, pd_params
from kvcake.vllm.plan import StepPlan, StorePlan, prompt_block_hashes
from kvcake.wire.kv import KVRegion, store_keys
from kvcake.wire.vllm import KvArrived

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = get_logger(__name__)
setup_package_logging()  # vLLM configures only its own loggers

_LOOKUP_TIMEOUT_S = 5.0  # a dead store costs one lookup this long, then a recompute
_LAYOUT_FLAGS = ("amx_bf16", "avx512f", "avx512_bf16")  # pick vLLM-CPU's KV kernels
_STAT_FIELDS = tuple(field.name for field in dataclasses.fields(ConnectorStats))
_SEND_TIMEOUT_S = 30.0  # a prefill's last writes into a decode instance, and its notice
_IDLE_WAIT_S = 0.01  # an idle step waiting for prefills: how long new requests may wait


class KvcakeConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's plan, from the scheduler to the workers: the store's loads and saves,
    a prefill's writes into decode instances, decode requests whose KV came."""

    def __init__(self, plan: StepPlan, sends: list[Send] | None = None,
                 arrivals: list[Arrival] | None = None, gone: list[bytes] | None = None) -> None:
        self.plan = plan
        self.sends = sends or []
        self.arrivals = arrivals or []
        self.gone = gone or []  # blocks the store no longer holds: saved again when computed


@dataclasses.dataclass
class KvcakeHandshake(KVConnectorHandshakeMetadata):  # type: ignore[misc]
    """From the worker to the scheduler side, once: the KV cache's region and its grant
    key (the scheduler side signs the prefill's WRITE grants)."""

    region: KVRegion | None
    grant_key: bytes


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
        self._hashes: dict[str, tuple[bytes, ...]] = {}  # by request id, while it lives
        self._local_tokens: dict[str, int] = {}  # local cache hits, from lookup to allocation
        self._gone: set[bytes] = set()  # looked up and missing: the workers forget them
        self._load_errors: set[int] = set()
        self._loading: list[tuple[list[int], PendingLoad]] = []  # this step's, under way
        self._layer_index: dict[str, int] = {}  # by vLLM's attention layer name
        self._waited: set[int] = set()  # layers the forward pass waited for this step
        self._layered = self.settings.layered_load  # off for good once a pass did not wait
        self._worker: StoreConnector | None = None
        self._reported: dict[str, int] = {}
        segment = self.settings.segment_size if role == KVConnectorRole.WORKER else 0
        self.store, self.transfer = connect_store(self.settings.master, segment,
                                                  tenant=self.settings.tenant)
        self.pd = PdPlan(self.block_size)
        self.control: ControlServer | None = None
        if role == KVConnectorRole.SCHEDULER and self.settings.control:
            self.control = ControlServer(self.transfer.io, self.pd, self.prefix.split("/")[0],
                                         vllm_config.cache_config.num_gpu_blocks or 0)
        self._kv_segment: Segment | None = None
        self._region: KVRegion | None = None
        self._sender: KVSender | None = None
        self._layers_sent: dict[str, int] = {}  # this step's, by request: its first n layers
        self._send_errors: dict[str, KvcakeError] = {}  # this step's layered sends that failed
        self._given_up: set[str] = set()  # prefills whose writes failed, until they finish
        self._notices: dict[str, RpcClient] = {}
        log.info("kvcake connector (%s) on store %s, keys %s/…", role.name,
                 self.settings.master, self.prefix)

    # -- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        # vLLM sets request.num_computed_tokens only after update_state_after_alloc: that
        # call reads the local cache's tokens from here
        self._local_tokens[request.request_id] = num_computed_tokens
        part = pd_params(request.kv_transfer_params) if self.control is not None else None
        if isinstance(part, DecodeWait) and not self.pd.waited(request.request_id):
            # the prompt's KV comes from a prefill instance
            missing = request.num_prompt_tokens - num_computed_tokens
            if missing <= 0:
                return 0, False
            self.control.wait(request.request_id, part.key)  # type: ignore[union-attr]
            return missing, True
        if isinstance(part, PrefillTarget):
            self.pd.prefill(request.request_id, part, request.num_prompt_tokens)
        keys = self._block_hashes(request)
        first, stop = self.plan.lookup(request.request_id, keys, request.num_prompt_tokens,
                                       num_computed_tokens)
        if stop <= first:
            return 0, False
        found = self._exist(list(keys[first:stop]))
        if found is None:
            return 0, False
        hits = next((i for i, held in enumerate(found) if not held), len(found))
        tail = self._tail(request, first + hits) if first + hits < stop else 0
        return self.plan.matched_tokens(request.num_prompt_tokens, num_computed_tokens, first,
                                        hits, tail), False

    def _block_hashes(self, request: Any) -> tuple[bytes, ...]:
        """The hashes of the prompt's blocks (the full ones as the Conductor makes them, then
        the partial last one); none for a prompt given as embeddings. Made once per
        request."""
        known = self._hashes.get(request.request_id)
        if known is None:
            tokens = request.prompt_token_ids or ()
            known = tuple(prompt_block_hashes(tokens, self.block_size, self.prefix.encode()))
            self._hashes[request.request_id] = known
        return known

    def _tail(self, request: Any, block: int) -> int:
        """Tokens of the longest partial record an earlier prompt left at ``block``, where
        this one's chain of blocks stopped (0: none); the plan loads it."""
        candidates = self.plan.tail_lookup(request.request_id, request.prompt_token_ids or (),
                                           block, self.prefix.encode())
        found = self._exist([key for _, key in candidates]) if candidates else None
        for (count, key), held in zip(candidates, found or (), strict=False):
            if held:
                self.plan.tail_hit(request.request_id, block, key)
                return count
        return 0

    def _exist(self, block_hashes: list[bytes]) -> list[bool] | None:
        """Which blocks the store holds (``None`` when it cannot say)."""
        try:
            codes = self.transfer.io.run(
                self.store.batch_is_exist(store_keys(self.prefix, block_hashes)),
                _LOOKUP_TIMEOUT_S)
        except (KvcakeError, concurrent.futures.TimeoutError) as exc:
            log.warning("store lookup failed, computing instead: %r", exc)
            return None
        self._gone |= {h for h, code in zip(block_hashes, codes, strict=True) if code == 0}
        return [code == 1 for code in codes]

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        local = self._local_tokens.pop(request.request_id, request.num_computed_tokens)
        if self.control is not None and self.pd.waits(request.request_id):
            block_ids = self._kv_cache_manager.get_block_ids(request.request_id)[0]
            self.control.allocated(request.request_id, block_ids, local)
            return
        self.plan.allocated(request.request_id, local, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KvcakeConnectorMetadata:
        manager = self._kv_cache_manager
        requests = self._requests_by_id(scheduler_output)
        scheduled = dict(scheduler_output.num_scheduled_tokens)
        plan = self.plan.step(scheduled, lambda rid: requests[rid],
                              lambda rid: manager.get_block_ids(rid)[0])
        gone, self._gone = list(self._gone), set()
        if self.control is None:
            return KvcakeConnectorMetadata(plan, gone=gone)
        if not scheduled:
            self.control.idle(_IDLE_WAIT_S)
        sends = [send for rid, count in scheduled.items()
                 if (send := self.pd.sends(rid, requests[rid] + count,
                                           manager.get_block_ids(rid)[0])) is not None]
        return KvcakeConnectorMetadata(plan, sends, self.control.take_arrivals(), gone)

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
        self._hashes.pop(request.request_id, None)
        self._local_tokens.pop(request.request_id, None)
        if self.control is not None:
            self.control.finished(request.request_id)
        return False, None  # saves are staged during the step: the blocks are free to go

    def has_pending_push_work(self) -> bool:
        return self.control is not None and self.control.pending()

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        if self.control is None:
            return
        handshake = next(iter(metadata.values()), None)
        if isinstance(handshake, KvcakeHandshake):
            self.control.region = handshake.region
            self.control.grant_key = handshake.grant_key
        self.control.start(self.settings.control, self.settings.control_file)

    # -- worker side -------------------------------------------------------------------

    def get_mem_pool_context(self) -> contextlib.AbstractContextManager[None] | None:
        """With P/D, vLLM allocates its KV cache inside a registered segment."""
        if self.role != KVConnectorRole.WORKER or not self.settings.control:
            return None
        return self._kv_cache_in_segment()

    @contextlib.contextmanager
    def _kv_cache_in_segment(self) -> Iterator[None]:
        """vLLM allocates the whole KV cache as one zeroed int8 buffer, and only that, in
        this context; that buffer is made a segment's memory (a fresh memfd is zeros)."""
        real = torch.zeros

        def zeros(*size: Any, dtype: Any = None, device: Any = None, **kw: Any) -> Any:
            if self._kv_segment is not None or dtype is not torch.int8 or len(size) != 1 \
                    or not isinstance(size[0], int) or torch.device(device or "cpu").type \
                    != "cpu":
                return real(*size, dtype=dtype, device=device, **kw)
            name = f"kv-{self.settings.instance_id or os.getpid()}"
            self._kv_segment = self.transfer.register_segment(name, size[0])
            return torch.frombuffer(self._kv_segment.view, dtype=torch.int8)[:size[0]]

        torch.zeros = zeros
        try:
            yield
        finally:
            torch.zeros = real

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = list(kv_caches.values())  # a record's layers, in this order
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        layout = self._block_layout(layers)
        staging = staging_slots(self.settings.staging_bytes, layout.record_bytes,
                                self._vllm_config.scheduler_config.max_num_batched_tokens,
                                self.block_size)
        self._worker = StoreConnector(self.store, self.transfer, layout, layers, staging)
        if self._kv_segment is not None:
            self._region = self._kv_region(layers, self._kv_segment)
            if self.settings.instance_id:  # the Conductor publishes it as the instance's
                self.transfer.bind(self._kv_segment.name,
                                   instance_registrant(self.settings.instance_id))
            self._sender = KVSender(self.transfer, self._region, self._kv_segment.view)

    def _kv_region(self, layers: list[torch.Tensor], segment: Segment) -> KVRegion:
        base = torch.frombuffer(segment.view, dtype=torch.int8).data_ptr()
        first = layers[0]
        layer_bytes = first[0].numel() * first.element_size()
        layer_stride = layers[1].data_ptr() - first.data_ptr() if len(layers) > 1 else 0
        evenly = all(layer.data_ptr() - base == i * layer_stride
                     for i, layer in enumerate(layers))
        if not evenly or not first[0].is_contiguous() or layer_bytes % self.block_size:
            raise InvalidParamsError(
                "kvcake's P/D needs vLLM's KV cache as evenly spaced layers of contiguous "
                f"blocks; got layers of {tuple(first.shape)} strides {first.stride()}")
        return KVRegion(self.transfer.local_descriptor(segment.name), self.prefix.split("/")[0],
                        len(layers), first.shape[0] * self.block_size,
                        layer_bytes // self.block_size, self.block_size,
                        block_stride=first.stride(0) * first.element_size(),
                        layer_stride=layer_stride or layer_bytes * first.shape[0])

    def get_handshake_metadata(self) -> KvcakeHandshake | None:
        if self._kv_segment is None:
            return None
        return KvcakeHandshake(self._region, self.transfer.grant_key(self._kv_segment.name))

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

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """A step begins (its forward pass comes next; ``start_load_kv`` may come after
        it): no layered send of an earlier step stays on record, even one that failed
        before its ``wait_for_save``."""
        super().bind_connector_metadata(connector_metadata)
        self._layers_sent.clear()
        self._send_errors.clear()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None, "register_kv_caches comes first"
        self._waited.clear()
        for run in self._metadata_plan().loads:
            ids, hashes = list(run.block_ids), list(run.block_hashes)
            if self._layered:
                self._loading.append((ids, self._worker.start_load(self.prefix, ids, hashes)))
            else:
                self._load_errors.update(ids[self._worker.load(self.prefix, ids, hashes):])

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None:  # an attention layer without a KV cache of its own
            return
        self._waited.add(layer)
        for _, pending in self._loading:
            pending.wait(layer)

    def _finish_loads(self) -> None:
        """The step's layered loads, landed; a block that did not is a load error (vLLM
        then drops the step's token for its request and recomputes). So is every block of
        a step whose forward pass did not wait for each layer: it may have read a layer
        before it landed, and later steps load whole blocks before the forward pass."""
        if not self._loading:
            return
        assert self._worker is not None, "only the worker side loads"
        loading, self._loading = self._loading, []
        unwaited = len(self._waited) < len(self._layer_index)
        for ids, pending in loading:
            valid = self._worker.finish_load(pending)
            self._load_errors.update(ids if unwaited else ids[valid:])
        if unwaited:
            log.warning("vLLM's forward pass did not wait for every layer's KV (%d of %d): "
                        "the step's loaded blocks are recomputed, and from now on blocks "
                        "load whole before each step", len(self._waited),
                        len(self._layer_index))
            self._layered = False

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """A layer of the step is written: a prefill's finished blocks bound for a decode
        instance across the network go out now, that layer of them, while the later layers
        compute. The store's copies, and same-host writes (copies in this thread, which
        would overlap nothing), wait for :meth:`wait_for_save`."""
        layer = self._layer_index.get(layer_name)
        if layer is None or self._sender is None or not self.has_connector_metadata():
            return
        for send in self._metadata().sends:
            if send.src and send.request_id not in self._send_errors \
                    and send.request_id not in self._given_up:
                self._send_layer(self._sender, send, layer)

    def _send_layer(self, sender: KVSender, send: Send, layer: int) -> None:
        """Send the group of layers ``layer`` ends (:meth:`KVSender.layer_group`)."""
        request_id = send.request_id
        try:
            self._open(sender, send)
            self._layers_sent[request_id] = sender.send_layers(
                request_id, list(send.src), self._layers_sent.get(request_id, 0), layer,
                sender.layer_group(request_id, len(send.src)))
        except KvcakeError as exc:
            self._send_errors[request_id] = exc  # reported by wait_for_save

    def wait_for_save(self) -> None:
        self._finish_loads()
        if self._worker is None or not self.has_connector_metadata():
            return
        # a request whose blocks did not all load computed the rest of its step over what
        # was there: vLLM computes it again, and only that is saved (the plan's scheduler
        # side learns it from the step's invalid blocks) or sent
        misread = self._misread()
        self._worker.forget(store_keys(self.prefix, self._metadata().gone))
        for run in self._metadata_plan().saves:
            if run.request_id not in misread:
                self._worker.save(self.prefix, list(run.block_ids), list(run.block_hashes))
        for request_id in misread:
            self._send_errors.setdefault(request_id, KvcakeError(
                f"request {request_id}: its prompt's KV did not load from the store"))
        for send in self._metadata().sends:
            self._send(send)
        self._layers_sent.clear()
        self._send_errors.clear()

    def _misread(self) -> set[str]:
        """The requests of this step with a block that did not load."""
        return {run.request_id for run in self._metadata_plan().loads
                if not self._load_errors.isdisjoint(run.block_ids)}

    def _send(self, send: Send) -> None:
        """Write a prefill's finished blocks into the decode instance's (what
        :meth:`save_kv_layer` has not); after the last, wait for every write and tell the
        decode instance whether they all landed. Once a write failed the decode instance is
        told at once, and the request's later blocks are not written at all (it computes
        them itself)."""
        sender = self._sender
        if sender is None:
            raise InvalidParamsError("this vLLM instance has no P/D control (its connector's "
                                     "control setting is empty): it cannot prefill for "
                                     "another")
        if send.request_id in self._given_up:
            return
        ok = True
        try:
            error = self._send_errors.get(send.request_id)
            if error is not None:
                raise error
            self._open(sender, send)
            if send.src:
                self._send_rest(sender, send)
            if send.last:
                sender.wait(send.request_id, _SEND_TIMEOUT_S)
        except KvcakeError as exc:
            log.warning("writing %s into %s failed: %r", send.key,
                        send.target.descriptor.name, exc)
            sender.cancel(send.request_id)
            self._given_up.add(send.request_id)
            ok = False
        if send.last or not ok:
            self._notify(send.target.control, KvArrived(send.key, ok))

    def _open(self, sender: KVSender, send: Send) -> None:
        if not sender.is_sending(send.request_id):
            sender.open(send.request_id, sender.target(send.target, list(send.all_dst),
                                                       list(send.grants)))

    def _send_rest(self, sender: KVSender, send: Send) -> None:
        """The step's blocks of ``send``, every layer :meth:`save_kv_layer` did not send
        (all of them where it sent none); then they count as sent."""
        sent = self._layers_sent.pop(send.request_id, 0)
        if not sent:
            sender.send(send.request_id, list(send.src))
            return
        if sent < sender.local.num_layers:
            sender.send(send.request_id, list(send.src), range(sent, sender.local.num_layers))
        sender.advance(send.request_id, len(send.src))

    def _notify(self, control: str, notice: KvArrived) -> None:
        """Tell the decode instance, without holding up this step: its answer may take a
        while (its control server shares a process with a busy engine)."""
        if not control:
            return
        future = asyncio.run_coroutine_threadsafe(self._send_notice(control, notice),
                                                  self.transfer.io.loop)
        future.add_done_callback(lambda done: done.exception())  # logged in _send_notice

    async def _send_notice(self, control: str, notice: KvArrived) -> None:
        client = self._notices.get(control)
        if client is None:
            client = self._notices[control] = RpcClient(control, _SEND_TIMEOUT_S)
        try:
            await client.call(encode(notice))
        except KvcakeError as exc:
            log.warning("could not tell %s that %s was written: %r", control, notice.key, exc)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                               set[str] | None]:
        if self._sender is not None:
            for request_id in finished_req_ids:
                self._sender.cancel(request_id)  # an aborted prefill's writes end here
            self._given_up.difference_update(finished_req_ids)
        if not self.has_connector_metadata():
            return None, None
        arrivals = self._metadata().arrivals
        for arrival in arrivals:
            if not arrival.ok and not arrival.ended:  # vLLM computes these blocks itself
                self._load_errors.update(arrival.block_ids)
        return None, {arrival.request_id for arrival in arrivals} or None

    def _metadata_plan(self) -> StepPlan:
        return self._metadata().plan

    def _metadata(self) -> KvcakeConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvcakeConnectorMetadata)
        return meta

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KvcakeConnectorStats | None:
        if self._worker is None:
            return None
        now = self._totals()
        delta = {name: count - self._reported.get(name, 0) for name, count in now.items()}
        self._reported = now
        return KvcakeConnectorStats(data=delta)

    def _totals(self) -> dict[str, int]:
        """The worker side's counts so far: the store's blocks, and the prefills' writes
        into decode instances (requests, bytes, microseconds with a write in flight)."""
        assert self._worker is not None
        totals = {name: getattr(self._worker.stats, name) for name in _STAT_FIELDS}
        if self._sender is not None:
            totals.update(pd_sent=self._sender.num_sent,
                          pd_sent_by_layer=self._sender.num_sent_by_layer,
                          pd_sent_bytes=self._sender.num_bytes_sent,
                          pd_writing_us=round(self._sender.writing_s * 1e6))
        return totals

    def update_connector_output(self, connector_output: Any) -> None:
        """Scheduler side: blocks that did not load are saved once vLLM has computed them
        again; the workers' counts of P/D writes reach the control server, whose
        ``Describe`` the sidecar reads."""
        invalid = connector_output.invalid_block_ids
        if invalid:
            manager = self._kv_cache_manager
            self.plan.loads_failed(invalid, lambda rid: manager.get_block_ids(rid)[0])
        stats = connector_output.kv_connector_stats
        if self.control is not None and isinstance(stats, KvcakeConnectorStats):
            self.control.count({name: count for name, count in stats.data.items()
                                if name.startswith("pd_")})

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KvcakeConnectorStats:
        return KvcakeConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.stop()
        for client in list(self._notices.values()):
            self.transfer.io.call(client.close)
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
