"""Mooncake's Conductor indexer API, answered by kvcake's Conductor, so tools written against
Mooncake's indexer work unchanged.

=====================  =====================================================================
``POST /query``        ``{model, block_size, token_ids, tenant_id?, instance_id?, ...}``:
                       each instance's longest cached prefix of ``token_ids``, by tier
``POST /query_by_hash`` the same for a prompt given as block hashes: kvcake's 32-byte digests
                       in hex, or their last 8 bytes as a big-endian integer (``low64_be``)
``POST /register``     index a vLLM instance that kvcake does not run, from its KV events
                       (``endpoint``: its ZMQ publisher, ``replay_endpoint``: its replay)
``POST /unregister``   stop indexing it
``GET /services``      the registrations
=====================  =====================================================================

Bodies and replies are JSON, or msgpack when sent as ``application/msgpack`` (Mooncake's
current wire); an unknown field is refused by name. Every reply to a query has Mooncake's
shape; counts are tokens, tiers are cumulative (``gpu <= cpu <= disk == longest_matched``)::

    {"instances": {"decode-1": {"longest_matched": 512, "gpu": 256, "dp": {"0": 256},
                                "cpu": 512, "disk": 512,
                                "rank_matches": {"0": {"gpu": 256, "cpu": 512, "disk": 512}}}}}

``gpu`` is the instance's own cache (the Conductor's prefix index: for a CPU instance, its
memory); the walk then continues into the KV store (``cpu``; the store's disk tier is part of
the same lookup, so ``disk`` equals ``cpu``). Registered instances are indexed from their
events alone, and only their own tier counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from kvcake.common.errors import InvalidParamsError
from kvcake.common.feed import EventFeed
from kvcake.common.hashing import prefix_block_hashes
from kvcake.common.log import get_logger
from kvcake.wire.kv_events import CacheView

log = get_logger(__name__)
T = TypeVar("T")
DEFAULT_TENANT = "default"
Hash = int | str
_ZMQ_SCHEMES = ("tcp://", "ipc://")


class Query(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    block_size: int
    token_ids: list[int] | bytes
    tenant_id: str = DEFAULT_TENANT
    lora_name: str = ""
    lora_id: int | None = None
    cache_salt: str | None = None
    instance_id: str | None = None


class HashQuery(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    seq_hashes: list[Hash] = []
    block_hash: list[Hash] = []  # Mooncake's older name
    block_size: int = 0
    tenant_id: str = DEFAULT_TENANT
    lora_name: str = ""
    lora_id: int | None = None
    cache_salt: str | None = None
    instance_id: str | None = None


class HashProfile(msgspec.Struct, forbid_unknown_fields=True):
    strategy: str = "vllm_v1"
    algorithm: str = "sha256_cbor"
    python_hash_seed: str = "random"
    index_projection: str = "low64_be"


class Registration(msgspec.Struct, forbid_unknown_fields=True):
    endpoint: str
    type: str
    modelname: str
    instance_id: str
    block_size: int
    dp_rank: int = 0
    hash_profile: HashProfile | None = None
    replay_endpoint: str = ""
    lora_name: str = ""
    tenant_id: str = DEFAULT_TENANT
    cache_group: int | None = None
    additionalsalt: str = ""


class Unregistration(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: str
    dp_rank: int = 0
    tenant_id: str = DEFAULT_TENANT


def decode_body(body: bytes, kind: type[T], msgpack: bool) -> T:
    """A request body as ``kind``; a malformed one is refused with what was wrong."""
    try:
        if msgpack:
            return msgspec.msgpack.decode(body, type=kind)
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidParamsError(f"{kind.__name__.lower()}: {exc}") from None


def _tokens(token_ids: list[int] | bytes) -> list[int]:
    """Token ids as a list, or as little-endian int32 bytes (Mooncake's preferred form)."""
    if isinstance(token_ids, list):
        return token_ids
    if len(token_ids) % 4:
        raise InvalidParamsError(f"token_ids as bytes must be little-endian int32s; got "
                                 f"{len(token_ids)} bytes")
    return [int.from_bytes(token_ids[i:i + 4], "little", signed=True)
            for i in range(0, len(token_ids), 4)]


def low64(digest: bytes) -> int:
    """A digest's ``low64_be`` projection: its last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")


def _tiers(block_size: int, own: int, shared: int) -> dict[str, Any]:
    gpu, cpu = own * block_size, max(own, shared) * block_size
    ranks = {"gpu": gpu, "cpu": cpu, "disk": cpu}
    return {"longest_matched": cpu, "gpu": gpu, "dp": {"0": gpu}, "cpu": cpu, "disk": cpu,
            "rank_matches": {"0": ranks}}


@dataclass
class _Registered:
    registration: Registration
    view: CacheView
    feed: EventFeed
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        r = self.registration
        return f"{r.instance_id}|{r.tenant_id}|{r.dp_rank}"


@dataclass
class ConductorView:
    """What the indexer reads of the Conductor: its served name, block size and salt, each
    instance's leading cached blocks, and the store's leading hits."""

    model_name: str
    block_size: int
    salt: Callable[[str], str]  # tenant -> the Conductor's hashing salt ("" while unknown)
    instance_ids: Callable[[], list[str]]
    matches: Callable[[Sequence[bytes]], dict[str, int]]
    store_hits: Callable[[str, tuple[bytes, ...]], Awaitable[int]]
    blocks_of: Callable[[str], frozenset[bytes]]


@dataclass
class MooncakeIndexer:
    """The indexer API's answers, over a :class:`ConductorView`."""

    conductor: ConductorView
    registered: dict[str, _Registered] = field(default_factory=dict)

    # -- queries -----------------------------------------------------------------------

    async def query(self, query: Query) -> dict[str, Any]:
        tokens = _tokens(query.token_ids)
        if query.block_size < 1:
            raise InvalidParamsError(f"block_size must be >= 1, got {query.block_size}")
        instances: dict[str, Any] = {}
        if self._ours(query.model, query.block_size, query.cache_salt, query.lora_name):
            salt = self.conductor.salt(query.tenant_id)
            hashes = prefix_block_hashes(tokens, query.block_size, salt.encode())
            instances.update(await self._own(salt, hashes, query.instance_id))
        for entry in self._registered_for(query.model, query.tenant_id, query.block_size,
                                          query.instance_id):
            hashes = prefix_block_hashes(tokens, query.block_size, entry.view.salt)
            held = set(entry.view.hashes())
            own = next((i for i, h in enumerate(hashes) if h not in held), len(hashes))
            instances[entry.registration.instance_id] = _tiers(query.block_size, own, 0)
        return {"instances": instances}

    async def query_by_hash(self, query: HashQuery) -> dict[str, Any]:
        given = query.seq_hashes or query.block_hash
        if not given:
            raise InvalidParamsError("query_by_hash needs seq_hashes (or block_hash)")
        block_size = query.block_size or self.conductor.block_size
        instances: dict[str, Any] = {}
        if not self._ours(query.model, block_size, query.cache_salt, query.lora_name):
            return {"instances": instances}
        digests = [h for h in given if isinstance(h, str)]
        if digests and len(digests) == len(given):  # full digests: the store can answer too
            hashes = [_digest(h) for h in digests]
            instances.update(await self._own(self.conductor.salt(query.tenant_id), hashes,
                                             query.instance_id))
            return {"instances": instances}
        wanted = [h if isinstance(h, int) else low64(_digest(h)) for h in given]
        for instance_id in self.conductor.instance_ids():
            if query.instance_id not in (None, instance_id):
                continue
            held = {low64(d) for d in self.conductor.blocks_of(instance_id)}
            own = next((i for i, h in enumerate(wanted) if h not in held), len(wanted))
            instances[instance_id] = _tiers(block_size, own, 0)
        return {"instances": instances}

    def _ours(self, model: str, block_size: int, cache_salt: str | None, lora: str) -> bool:
        """Whether the Conductor's own instances can hold blocks of this query."""
        return model == self.conductor.model_name and block_size == \
            self.conductor.block_size and not cache_salt and not lora

    async def _own(self, salt: str, hashes: Sequence[bytes], only: str | None
                   ) -> dict[str, Any]:
        if not salt:  # no instance registered yet: nothing is cached anywhere
            return {}
        shared = await self.conductor.store_hits(salt, tuple(hashes))
        size = self.conductor.block_size
        return {instance_id: _tiers(size, own, shared)
                for instance_id, own in self.conductor.matches(hashes).items()
                if only in (None, instance_id)}

    def _registered_for(self, model: str, tenant: str, block_size: int,
                        only: str | None) -> list[_Registered]:
        return [e for e in self.registered.values()
                if e.registration.modelname == model and e.registration.tenant_id == tenant
                and e.registration.block_size == block_size
                and only in (None, e.registration.instance_id)]

    # -- registrations -----------------------------------------------------------------

    def register(self, registration: Registration) -> dict[str, Any]:
        r = registration
        if r.type.lower() != "vllm":
            raise InvalidParamsError(f"type {r.type!r}: kvcake indexes vLLM publishers "
                                     f"(\"vLLM\"); its store's contents are indexed already")
        if r.block_size < 1 or r.dp_rank < 0 or not r.endpoint.startswith(_ZMQ_SCHEMES):
            raise InvalidParamsError("registration needs a tcp:// or ipc:// endpoint, "
                                     "block_size >= 1 and dp_rank >= 0")
        salt = f"{r.modelname}/{r.tenant_id}/{r.lora_name}/{r.additionalsalt}".encode()
        entry = _Registered(r, view := CacheView(salt), EventFeed(
            r.endpoint, r.replay_endpoint, view.apply))
        old = self.registered.get(entry.key)
        if old is not None:
            if old.registration == r:
                return {"status": "registered successfully", "instance_id": r.instance_id}
            raise InvalidParamsError(f"invalid_registration: {entry.key} is registered with "
                                     f"other settings; unregister it first")
        if any(e.registration.endpoint == r.endpoint for e in self.registered.values()):
            raise InvalidParamsError(f"invalid_registration: endpoint {r.endpoint} is "
                                     f"registered already")
        entry.task = asyncio.get_running_loop().create_task(entry.feed.run())
        self.registered[entry.key] = entry
        log.info("indexing vLLM instance %s from %s", r.instance_id, r.endpoint)
        return {"status": "registered successfully", "instance_id": r.instance_id}

    def unregister(self, request: Unregistration) -> dict[str, Any]:
        key = f"{request.instance_id}|{request.tenant_id}|{request.dp_rank}"
        entry = self.registered.pop(key, None)
        if entry is None:
            raise KeyError(f"service not found: {key}")
        if entry.task is not None:
            entry.task.cancel()
        return {"status": "unregistered successfully", "removed_instances": [key]}

    def services(self) -> dict[str, Any]:
        rows = [msgspec.to_builtins(e.registration) for e in self.registered.values()]
        return {"count": len(rows), "services": rows}

    async def close(self) -> None:
        tasks = [e.task for e in self.registered.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.registered.clear()


def _digest(text: str) -> bytes:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        raise InvalidParamsError(f"block hash {text[:80]!r} is neither an integer nor "
                                 f"hex") from None
    if len(digest) != 32:
        raise InvalidParamsError(f"block hash {text[:80]!r}: kvcake's digests are 32 bytes")
    return digest
