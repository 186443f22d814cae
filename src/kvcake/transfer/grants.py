"""Grants: a segment owner's signed permission to READ or WRITE a range of its segment.

With a cluster token, a transfer server serves READ and WRITE frames only inside grants.
Each segment has its own random 32-byte grant key, made when it is registered and known only
to its owner and to whoever the owner hands it to: a storage node sends it to the master
when it mounts the segment (the master signs the replica ranges it allocates); a decode
instance keeps it and signs the KV blocks it reserved for a prefill. Clients hold the
cluster token but never a grant key, so they cannot forge a grant; the owner checks a grant
with no round trip to anyone. A grant covers ``count`` ranges of ``length`` bytes, ``stride``
apart (one range for a store replica; one per layer's K and V for a KV-block run)::

    offset          offset+stride   offset+2*stride          (count = 3)
    [==length==]....[==length==]....[==length==]....

    mac = HMAC-SHA256(segment key, segment | offset | length | stride | count | mode | expiry)

A client sends a grant as one GRANT frame ahead of the READ/WRITE frames it covers, on the
same connection (pipelined: no round trip). The server remembers the last
``MAX_GRANTS_PER_CONNECTION`` grants of each connection, least recently presented dropped
first; the client keeps the same bounded list, by the same rule, of what it sent, so it
resends a grant exactly when the server may have dropped it. A grant that fails its check is
not remembered; the frames that needed it are refused with ``ACCESS_DENIED``, which names
why. A grant bounds where and until when, not which object: within its lifetime the range
may be reused by another object, which the master's leases prevent for reads and its put
timeout bounds for writes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntFlag

import msgspec

from kvcake.common.errors import AccessDeniedError

GRANT_KEY_BYTES = 32
MAX_GRANTS_PER_CONNECTION = 1024
MAX_GRANT_BYTES = 1024  # a GRANT frame's payload
CLOCK_SKEW_S = 5.0  # expiries are wall-clock times of the signer; owners may run a bit ahead
_FIELDS = struct.Struct("<QQQIBQ")


class GrantMode(IntFlag):
    READ = 1
    WRITE = 2


class Grant(msgspec.Struct, frozen=True, array_like=True):
    """``count`` ranges ``[offset + i*stride, +length)`` of ``segment``, for ``mode``, until
    ``expires_ms`` (Unix time, milliseconds); ``mac`` by the segment's key."""

    segment: str
    offset: int
    length: int
    stride: int
    count: int
    mode: int
    expires_ms: int
    mac: bytes = b""

    def covers(self, offset: int, length: int, mode: GrantMode) -> bool:
        if not self.mode & mode or length > self.length or offset < self.offset:
            return False
        index, start = divmod(offset - self.offset, self.stride or self.length or 1)
        return index < self.count and start + length <= self.length


def new_grant_key() -> bytes:
    return secrets.token_bytes(GRANT_KEY_BYTES)


@functools.lru_cache(maxsize=256)
def _keyed(key: bytes) -> hmac.HMAC:
    """The key's HMAC state, prepared once (copies skip the key schedule: ~2x faster)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(key: bytes, grant: Grant) -> bytes:
    """Over every field but ``mac``; the name is length-prefixed so no two grants collide."""
    fields = _FIELDS.pack(grant.offset, grant.length, grant.stride, grant.count, grant.mode,
                          grant.expires_ms)
    name = grant.segment.encode()
    state = _keyed(key).copy()
    state.update(struct.pack("<H", len(name)) + name + fields)
    return state.digest()


def sign_grant(key: bytes, segment: str, offset: int, length: int, mode: GrantMode,
               expires_s: float, stride: int = 0, count: int = 1) -> bytes:
    """The encoded grant a client presents (opaque to it), valid until ``expires_s``."""
    assert length > 0 and count >= 1 and (count == 1 or stride >= length)
    grant = Grant(segment, offset, length, stride, count, int(mode), int(expires_s * 1000))
    return msgspec.msgpack.encode(msgspec.structs.replace(grant, mac=_mac(key, grant)))


def open_grant(blob: bytes | memoryview, key_of: dict[str, bytes], now_s: float) -> Grant:
    """Decode and check a presented grant; :class:`AccessDeniedError` says what is wrong."""
    try:
        grant = msgspec.msgpack.decode(blob, type=Grant)
    except msgspec.DecodeError as exc:
        raise AccessDeniedError(f"malformed grant: {exc}") from None
    key = key_of.get(grant.segment)
    if key is None:
        raise AccessDeniedError(f"grant for segment {grant.segment!r}, which is not here")
    if not hmac.compare_digest(grant.mac, _mac(key, grant)):
        raise AccessDeniedError(f"grant for segment {grant.segment!r} has a bad signature")
    if grant.expires_ms / 1000 + CLOCK_SKEW_S < now_s:
        raise AccessDeniedError(f"grant for segment {grant.segment!r} expired "
                                f"{now_s - grant.expires_ms / 1000:.1f}s ago")
    return grant


class GrantTable:
    """One server connection's presented grants (bounded; see the module doc)."""

    def __init__(self, capacity: int = MAX_GRANTS_PER_CONNECTION) -> None:
        self._capacity = capacity
        self._grants: OrderedDict[bytes, Grant] = OrderedDict()  # by mac
        self.last_refusal = ""

    def __len__(self) -> int:
        return len(self._grants)

    def present(self, blob: bytes | memoryview, key_of: dict[str, bytes], now_s: float) -> None:
        try:
            grant = open_grant(blob, key_of, now_s)
        except AccessDeniedError as exc:
            self.last_refusal = str(exc.args[0])
            return
        self._grants[grant.mac] = grant
        self._grants.move_to_end(grant.mac)
        while len(self._grants) > self._capacity:
            self._grants.popitem(last=False)

    def check(self, segment: str, offset: int, length: int, mode: GrantMode,
              now_s: float) -> None:
        """Raise :class:`AccessDeniedError` unless a live grant covers the range."""
        for grant in reversed(self._grants.values()):  # the newest is the likeliest
            if grant.segment == segment and grant.covers(offset, length, mode) \
                    and grant.expires_ms / 1000 + CLOCK_SKEW_S >= now_s:
                return
        why = f" (last grant refused: {self.last_refusal})" if self.last_refusal else ""
        raise AccessDeniedError(f"{mode.name} of [{offset}, {offset + length}) in segment "
                                f"{segment!r}: no live grant of its owner covers it{why}")


@dataclass
class PresentedGrants:
    """The client's mirror of a connection's :class:`GrantTable`: what it must (re)send."""

    capacity: int = MAX_GRANTS_PER_CONNECTION

    def __post_init__(self) -> None:
        self._sent: OrderedDict[bytes, None] = OrderedDict()

    def needs_sending(self, blob: bytes) -> bool:
        """True (and noted as sent) unless the server still holds ``blob``."""
        if blob in self._sent:
            return False
        self._sent[blob] = None
        while len(self._sent) > self.capacity:
            self._sent.popitem(last=False)
        return True
