"""The store's channels: the master's RPC (one tagged union of requests, and their replies),
and a node's control channel (its disk tier).

Every per-key operation takes a list of keys, so a single op is a batch of one and a batch
is one round trip. Per-key outcomes are Mooncake error codes (0 = ok); a whole request that
cannot be served comes back as an error frame instead.

Every list a request carries has a maximum, checked while the call is decoded (before the
master looks at one element); a longer list gets ``INVALID_PARAMS`` and the master serves on:

==============================  ==================================  ====================
list                            messages                            maximum
==============================  ==================================  ====================
``keys``, ``sizes``             PutStart, PutEnd, PutRevoke,        ``MAX_KEYS_PER_CALL``
                                GetReplicas, Exist, Remove,
                                QueryReplicas, ReplicaClear
``config.group_ids``            PutStart                            ``MAX_KEYS_PER_CALL``
``config.preferred_segments``   PutStart                            ``MAX_SEGMENT_IDS``
``segment_ids``                 DescribeSegments                    ``MAX_SEGMENT_IDS``
``pattern`` (characters)        RemoveByRegex                       ``MAX_PATTERN_CHARS``
==============================  ==================================  ====================

A reply's lists follow its request's (one entry per key or segment id); a key's replica
handles are at most ``MAX_HANDLES``. ``Stats.tenants`` alone is the master's to size.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvcake.transfer.segment import SegmentDescriptor

MAX_KEYS_PER_CALL = 16384  # keys (and sizes) in one call: 4096-byte keys fill MAX_CALL_BYTES
MAX_SEGMENT_IDS = 4096  # segment ids one DescribeSegments asks about
MAX_HANDLES = 1024  # replica handles of one key in a reply (replica_num is at most 16)
MAX_PATTERN_CHARS = 4096  # a remove_by_regex pattern
Keys = Annotated[list[str], msgspec.Meta(max_length=MAX_KEYS_PER_CALL)]
Sizes = Annotated[list[int], msgspec.Meta(max_length=MAX_KEYS_PER_CALL)]
Codes = Sizes


SOFT_PIN_PRESERVE, SOFT_PIN_ENABLE, SOFT_PIN_DISABLE = 0, 1, 2  # Mooncake's SoftPinAction


class ReplicateConfig(msgspec.Struct):
    """How to store a put (Mooncake's ``ReplicateConfig``, as it travels; the Python API's
    richer class is :class:`kvcake.store.ReplicateConfig`).

    replica_num: copies on segments of distinct names (best effort when fewer have room).
    with_soft_pin: evicted only when nothing unpinned is left, for ``soft_pin_ttl_s``
        (0: the master's default); the same as ``soft_pin_action`` ENABLE.
    with_hard_pin: never evicted (still removable).
    preferred_segment: put the first replica on this segment when it has room.
    soft_pin_action: what an upsert does to the soft pin of the object it replaces:
        ``SOFT_PIN_PRESERVE`` keeps it, ``SOFT_PIN_ENABLE`` sets it, ``SOFT_PIN_DISABLE``
        clears it (a ttl with anything but ENABLE is refused).
    preferred_segments: segments to place replicas on first, in this order.
    prefer_same_host: place replicas on segments of the writer's host first (Mooncake's
        ``prefer_alloc_in_same_node``).
    group_ids: one group id per key of the call (``""``: no group), or empty for none;
        objects of one group share placement, leases and eviction.
    """

    replica_num: int = 1
    with_soft_pin: bool = False
    soft_pin_ttl_s: float = 0.0
    with_hard_pin: bool = False
    preferred_segment: str = ""
    soft_pin_action: int = SOFT_PIN_PRESERVE
    preferred_segments: Annotated[list[str], msgspec.Meta(max_length=MAX_SEGMENT_IDS)] = \
        msgspec.field(default_factory=list)
    prefer_same_host: bool = False
    group_ids: Keys = msgspec.field(default_factory=list)

    @property
    def soft_pinned(self) -> bool:
        return self.with_soft_pin or self.soft_pin_action == SOFT_PIN_ENABLE


class ReplicaHandle(msgspec.Struct, frozen=True, array_like=True):
    segment_id: int
    offset: int
    grant: bytes = b""  # the node's grant for this replica's bytes, when it runs with a token


# ----- requests
class RegisterClient(msgspec.Struct, tag=True, frozen=True):
    client_id: str
    host_id: str
    tenant: str = "default"  # the namespace and quota of every key this client uses
    tenant_token: str = ""  # needed when the master has a token for the tenant


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    client_id: str


class MountSegment(msgspec.Struct, tag=True, frozen=True):
    client_id: str
    descriptor: SegmentDescriptor
    disk_capacity: int = 0
    control_endpoint: str = ""  # the node's RPC server for disk-tier tasks
    grant_key: bytes = b""  # the segment's grant key (kvcake.store.grants), with a token


class UnmountSegment(msgspec.Struct, tag=True, frozen=True):
    client_id: str
    segment_id: int


class PutStart(msgspec.Struct, tag=True, frozen=True):
    """At most ``MAX_KEYS_PER_CALL`` keys, one size each (so for every keyed call below).
    ``upsert``: replace a key that exists (its value, not its group) instead of keeping it.
    ``pipeline_end``: the writer would send ``PutEnd`` without waiting for its reply, if the
    master allows it (:mod:`kvcake.store.master.ends`)."""

    client_id: str
    keys: Keys
    sizes: Sizes
    config: ReplicateConfig = msgspec.field(default_factory=ReplicateConfig)
    upsert: bool = False
    pipeline_end: bool = False


class PutEnd(msgspec.Struct, tag=True, frozen=True):
    client_id: str
    keys: Keys


class PutRevoke(msgspec.Struct, tag=True, frozen=True):
    client_id: str
    keys: Keys


# Reads and removals act in the caller's tenant. Reads without a client_id read the default
# tenant; removals need a registered client (without one: ILLEGAL_CLIENT).
class GetReplicas(msgspec.Struct, tag=True, frozen=True):
    keys: Keys
    client_id: str = ""


class Exist(msgspec.Struct, tag=True, frozen=True):
    keys: Keys
    client_id: str = ""


class Touch(msgspec.Struct, tag=True, frozen=True):
    """Keys a client found in the master's location table (:mod:`kvcake.store.locations`)
    and read (``read``) or only checked: leased as that get or exist would have leased them
    (a read also counts as a use for eviction). Answered with a 0 per key."""

    keys: Keys
    client_id: str
    read: bool = True


class ArenaGrant(msgspec.Struct, tag=True, frozen=True):
    """A client of the master's host asks for space to put into without asking (its last
    arena's rest is freed; :mod:`kvcake.store.commits`). Answered with an ArenaReply."""

    client_id: str


class ArenaRelease(msgspec.Struct, tag=True, frozen=True):
    """A client closing gives its arena back (it writes there no more). A CodesReply."""

    client_id: str


class Remove(msgspec.Struct, tag=True, frozen=True):
    keys: Keys
    force: bool = False
    client_id: str = ""


class RemoveAll(msgspec.Struct, tag=True, frozen=True):
    force: bool = False
    client_id: str = ""


class RemoveByRegex(msgspec.Struct, tag=True, frozen=True):
    """Remove the caller's tenant's keys that ``pattern`` (Python ``re``) matches anywhere."""

    pattern: Annotated[str, msgspec.Meta(max_length=MAX_PATTERN_CHARS)]
    force: bool = False
    client_id: str = ""


class QueryReplicas(msgspec.Struct, tag=True, frozen=True):
    """Every replica of each key, any tier and state (leases the complete ones, as a get)."""

    keys: Keys
    client_id: str = ""


class ReplicaClear(msgspec.Struct, tag=True, frozen=True):
    """Drop the caller's own objects whose lease has run out: all their replicas, or only
    those on segments named ``segment_name``; answered with the keys cleared."""

    keys: Keys
    segment_name: str = ""
    client_id: str = ""


class DescribeSegments(msgspec.Struct, tag=True, frozen=True):
    """At most ``MAX_SEGMENT_IDS`` ids; ``every``: instead, every mounted segment (the
    first ``MAX_SEGMENT_IDS``), for a client that maps them before its first read."""

    segment_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_SEGMENT_IDS)]
    every: bool = False


class GetStats(msgspec.Struct, tag=True, frozen=True):
    pass


class CheckIntegrity(msgspec.Struct, tag=True, frozen=True):
    """Admin: run the master's own consistency checks; answered with an IntegrityReply."""


MasterRequest = (
    RegisterClient | Heartbeat | MountSegment | UnmountSegment | PutStart | PutEnd | PutRevoke
    | GetReplicas | Exist | Touch | ArenaGrant | ArenaRelease | Remove | RemoveAll
    | RemoveByRegex | QueryReplicas | ReplicaClear | DescribeSegments | GetStats
    | CheckIntegrity
)


# ----- replies
class RegisterReply(msgspec.Struct, frozen=True):
    master_id: int  # changes when the master restarts: clients then remount
    lease_ttl_s: float
    client_ttl_s: float
    locations: str = ""  # the master's location table (kvcake.store.locations), if any
    host_id: str = ""  # the master's host: only clients of that host read the table
    arena_bytes: int = 0  # the most a client of that host is granted to put into (commits)


class HeartbeatReply(msgspec.Struct, frozen=True):
    known: bool  # False: the master forgot this client (restart, or declared it dead)


class MountReply(msgspec.Struct, frozen=True):
    segment_id: int


Handles = Annotated[list[Annotated[list[ReplicaHandle], msgspec.Meta(max_length=MAX_HANDLES)]],
                    msgspec.Meta(max_length=MAX_KEYS_PER_CALL)]


class ArenaReply(msgspec.Struct, frozen=True):
    """``code``: 0, else why there is no arena: ``UNAVAILABLE_IN_CURRENT_MODE`` (never for
    this client of this master), ``NO_AVAILABLE_HANDLE`` (no room now)."""

    code: int
    segment_id: int = 0
    offset: int = 0
    length: int = 0
    ring: str = ""  # the commit ring's path
    max_key_bytes: int = 0  # longer keys are refused: they ask (and are told why)


class PutStartReply(msgspec.Struct, frozen=True):
    codes: Codes  # 0: write to replicas; OBJECT_ALREADY_EXISTS: nothing to write
    replicas: Handles
    pipeline_end: bool = False  # the writer may send PutEnd and not wait for its reply


class GetReplicasReply(msgspec.Struct, frozen=True):
    lease_ttl_s: float
    codes: Codes
    sizes: Sizes
    replicas: Handles  # COMPLETE memory replicas only, best first
    waited_s: float = 0.0  # time the master held the request (disk promotion) before leasing
    # Which put of each key was found (0: none); unique across masters, so a reader can tell
    # that the object it read before is still the one stored.
    object_ids: Sizes = msgspec.field(default_factory=list)


class CodesReply(msgspec.Struct, frozen=True):
    codes: Codes  # for Exist: 1 present, 0 absent


class CountReply(msgspec.Struct, frozen=True):
    count: int


class KeysReply(msgspec.Struct, frozen=True):
    keys: Keys


class ReplicaInfo(msgspec.Struct, frozen=True, array_like=True):
    """One replica as :class:`QueryReplicas` describes it."""

    tier: str  # "memory" or "disk" (a node's own disk)
    state: str  # a ReplicaState value: "complete", "processing", ...
    segment: str  # the segment's name
    endpoint: str  # its owner's transfer endpoint
    offset: int  # in the segment (memory)
    size: int


class QueryReplicasReply(msgspec.Struct, frozen=True):
    codes: Codes
    sizes: Sizes
    replicas: Annotated[list[Annotated[list[ReplicaInfo], msgspec.Meta(max_length=MAX_HANDLES)]],
                        msgspec.Meta(max_length=MAX_KEYS_PER_CALL)]


class DescribeSegmentsReply(msgspec.Struct, frozen=True):
    descriptors: Annotated[list[SegmentDescriptor | None],
                           msgspec.Meta(max_length=MAX_SEGMENT_IDS)]


class IntegrityReply(msgspec.Struct, frozen=True):
    ok: bool
    problem: str = ""  # the failed check's text when not ok


class TenantStats(msgspec.Struct, frozen=True):
    tenant: str
    num_keys: int  # complete objects
    used_bytes: int  # memory-tier bytes of its replicas
    quota_bytes: int  # 0: unlimited
    evicted: int


class Stats(msgspec.Struct, frozen=True):
    num_segments: int
    num_clients: int
    num_keys: int
    num_replicas: int
    used_bytes: int
    total_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    evicted: int
    offloaded: int
    promoted: int
    disk_evicted: int = 0  # disk copies dropped to make room for newer ones
    tenants: list[TenantStats] = msgspec.field(default_factory=list)
    arena_bytes: int = 0  # allocated to clients' arenas, not yet put into (not in used_bytes)
    # allocated, no object's: memory of removed objects kept until their readers' leases end,
    # of failed puts until their writers are surely done (not in used_bytes)
    retired_bytes: int = 0


# ----- -> a storage node's control endpoint: the master's disk-tier tasks, each answered with
# a CodesReply of one code; NodeInfo from a process attaching to the node
class OffloadRequest(msgspec.Struct, tag=True, frozen=True):
    key: str
    offset: int
    size: int


class PromoteRequest(msgspec.Struct, tag=True, frozen=True):
    key: str
    offset: int
    size: int


class DropDiskRequest(msgspec.Struct, tag=True, frozen=True):
    key: str


class NodeInfo(msgspec.Struct, tag=True, frozen=True):
    """What a process on the node's host attaches with (Mooncake's ``setup_dummy``);
    answered with a :class:`NodeInfoReply`."""


class NodeInfoReply(msgspec.Struct, frozen=True):
    master: str  # the master endpoint it joined (``HOST:PORT`` or ``etcd://...``)
    tenant: str  # the tenant it registered as
    segment: str  # its segment's name
    transfer: str  # its transfer server's endpoint


NodeRequest = OffloadRequest | PromoteRequest | DropDiskRequest | NodeInfo
