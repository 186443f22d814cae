"""A Mooncake-style store's state: the asyncio client on its engine's loop thread, the
hostname it is known by, registered buffers and the local buffer; and how calls into it
become Mooncake's int results. Calls run their plans in the caller's thread
(:mod:`kvcake.store.blocking`); set-up and close run on the loop. A client collected without
``close()`` is closed then, as Mooncake's destructor does: its segment leaves the pool and
its threads end, instead of serving as a replica target for ever."""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.config import load_config
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.common.rpc import RpcClient
from kvcake.store.client import AsyncStore
from kvcake.store.compat.buffers import BufferRegistry, LocalBuffer
from kvcake.store.compat.options import (
    MAX_PORT,
    MIN_PORT,
    PROTOCOLS,
    SetupOptions,
    bind_host,
    split_hostname,
)
from kvcake.store.config import StoreConfig
from kvcake.store.steps import Plan
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.wire import store as m

log = get_logger(__name__)
T = TypeVar("T")
_PORT_TRIES = 20  # as Mooncake's MC_STORE_CLIENT_SETUP_RETRIES
_MAX_SCRATCH_BYTES = 64 << 20  # pre-touched receive buffer of get (the rest is a budget)
NOT_SET_UP = ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS


class StoreBase:
    """Lifecycle and plumbing shared by the API's method groups."""

    def __init__(self) -> None:
        self._engine: TransferEngine | None = None
        self._io: LoopThread | None = None
        self._store: AsyncStore | None = None
        self._hostname = ""
        self._buffers = BufferRegistry()
        self._local = LocalBuffer(0)
        self._release: weakref.finalize[..., StoreBase] | None = None  # closes what setup started

    # ----- lifecycle
    def _connect(self, options: SetupOptions, engine: TransferEngine | None = None) -> int:
        """Start (or use) a transfer engine and join the master as ``options`` say; 0 or
        the code it failed with (nothing is left running then)."""
        if self._store is not None:
            return int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        owned = engine is None
        try:
            engine, hostname = _engine_for(options, engine)
        except KvcakeError as exc:
            log.error("store setup failed: %s", exc)
            return int(exc.code)
        except OSError as exc:  # the host is no address of this machine
            log.error("store setup failed: cannot listen on %s: %s", options.local_hostname,
                      exc)
            return int(ErrorCode.INVALID_PARAMS)
        try:
            store = AsyncStore(_store_config(options, hostname), engine.config, engine,
                               min(options.local_buffer_size, _MAX_SCRATCH_BYTES))
            engine.io.run(store.setup())  # the store runs on the engine's own loop thread
            engine.io.run(store.attach_segments())  # no first read waits for a handover
        except KvcakeError as exc:
            log.error("store setup failed: %s", exc)
            if owned:
                engine.close()
            return int(exc.code)
        self._engine, self._io, self._store = engine, engine.io, store
        self._release = weakref.finalize(self, _release, store, engine.io,
                                         engine if owned else None)
        self._release.atexit = False  # at exit the process's end says enough
        self._hostname = hostname
        self._local = LocalBuffer(options.local_buffer_size)
        return 0

    def close(self) -> int:
        if self._release is not None:
            self._release()  # at most once, whether called here or at collection
        self._store = self._io = self._engine = self._release = None
        return 0

    def get_hostname(self) -> str:
        """The ``host:port`` this client (and its segment) is known by."""
        return self._hostname

    def health_check(self) -> int:
        """0 healthy, 1 not set up (or closed), 2 the master does not answer."""
        if self._store is None:
            return 1
        try:
            self._block(self.native.ops.stats())
        except KvcakeError:
            return 2
        return 0

    # ----- plumbing
    def _check_setup(self) -> None:
        if self._store is None:
            raise KvcakeError("store is not set up", NOT_SET_UP)

    def _block(self, plan: Plan[T]) -> T:
        """Run a store plan in this thread (:mod:`kvcake.store.blocking`)."""
        if self._store is None:
            plan.close()
            raise KvcakeError("store is not set up", NOT_SET_UP)
        return self._store.blocking.run(plan)

    @property
    def native(self) -> AsyncStore:
        """The asyncio client underneath (for callers that also want its richer API)."""
        if self._store is None:
            raise KvcakeError("store is not set up", NOT_SET_UP)
        return self._store


def _release(store: AsyncStore, io: LoopThread, engine: TransferEngine | None) -> None:
    """Close a client's store, then the transfer engine it started (``None``: one it was
    given). A collection can run this on the loop's own thread, where blocking on the loop
    would deadlock: it then hands the work to a short-lived thread."""
    if io.in_loop_thread():
        threading.Thread(target=_release, args=(store, io, engine), daemon=True,
                         name="kvcake-store-release").start()
        return
    io.run(store.close())
    if engine is not None:
        engine.close()


def _engine_for(options: SetupOptions, engine: TransferEngine | None
                ) -> tuple[TransferEngine, str]:
    """The engine to use, and the hostname the client is known by."""
    host, port = split_hostname(options.local_hostname)
    if engine is not None:
        return engine, options.known_as or (options.local_hostname if port else engine.endpoint)
    if port is not None or options.known_as:  # a name, as in Mooncake: any free port serves
        return (TransferEngine(_transfer_config(options, host, 0)),
                options.known_as or options.local_hostname)
    for port in random.sample(range(MIN_PORT, MAX_PORT + 1), _PORT_TRIES):
        try:
            return TransferEngine(_transfer_config(options, host, port)), f"{host}:{port}"
        except OSError as exc:
            log.debug("port %d is taken (%s); trying another", port, exc)
    raise KvcakeError(f"no free port in {MIN_PORT}..{MAX_PORT} after {_PORT_TRIES} tries",
                      ErrorCode.INTERNAL_ERROR)


def _transfer_config(options: SetupOptions, host: str, port: int) -> TransferConfig:
    return load_config(TransferConfig, "transfer", {
        "host": bind_host(host), "port": port, "transport": PROTOCOLS[options.protocol]})


def _store_config(options: SetupOptions, hostname: str) -> StoreConfig:
    disk = {"disk_dir": options.ssd_offload_path} if options.ssd_offload_path else {}
    return load_config(StoreConfig, "store", {
        "master": options.master_server_addr, "segment_size": options.global_segment_size,
        "segment_name": hostname, "tenant": options.tenant_id or None,
        "tenant_token": options.tenant_token or None, **disk})


def ask_node(address: str, timeout_s: float = 5.0) -> m.NodeInfoReply:
    """What the ``kvcake node`` whose control endpoint is ``address`` joined."""
    thread = LoopThread("kvcake-node-info")
    try:
        return thread.run(_ask_node(address, timeout_s))
    finally:
        thread.stop()


async def _ask_node(address: str, timeout_s: float) -> m.NodeInfoReply:
    client = RpcClient(address, timeout_s)
    try:
        return codec.decode(await client.call(codec.encode(m.NodeInfo())), m.NodeInfoReply)
    finally:
        client.close()


# ----- results, Mooncake's way
def code_of(action: Callable[[], Any]) -> int:
    """0 (or the int ``action`` answers) on success, the error's code otherwise."""
    try:
        result = action()
    except KvcakeError as exc:
        log.debug("store call failed: %s", exc)
        return int(exc.code)
    return int(result) if isinstance(result, int) else 0


def codes_of(action: Callable[[], Sequence[int]], count: int) -> list[int]:
    """One code per key; a call that fails as a whole gives every key its code."""
    try:
        return [int(c) for c in action()]
    except KvcakeError as exc:
        log.debug("store batch call failed: %s", exc)
        return [int(exc.code)] * count


def first_error(codes: Sequence[int]) -> int:
    return next((c for c in codes if c < 0), 0)


def read_code(code: int) -> int:
    """Mooncake answers a read into too small a buffer with ``INVALID_PARAMS``."""
    return int(ErrorCode.INVALID_PARAMS) if code == ErrorCode.BUFFER_OVERFLOW else code


def check_same_node(config: Any) -> None:
    """Mooncake's single-buffer puts refuse ``prefer_alloc_in_same_node``."""
    if getattr(config, "prefer_alloc_in_same_node", False):
        raise InvalidParamsError("prefer_alloc_in_same_node is only supported by "
                                 "batch_put_from_multi_buffers")
