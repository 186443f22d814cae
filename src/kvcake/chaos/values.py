"""Self-checking values: every byte a chaos put writes can be proven exact by a later get.

::

    0        8          12                   44                         length
    ├────────┼──────────┼────────────────────┼──────────────────────────┤
    │ magic  │ body len │ blake2b(key ‖ body)│ body (seeded random)     │
    │ KVCHAOS1 u32 LE   │ 32 bytes           │                          │
    └────────┴──────────┴────────────────────┴──────────────────────────┘

The digest covers the key, so bytes of another object (a stale or reused allocation) fail
the check just as torn or shifted bytes do.
"""

from __future__ import annotations

import hashlib
import random
import struct

MAGIC = b"KVCHAOS1"
_HEADER = struct.Struct("<8sI32s")
HEADER_LEN = _HEADER.size
MIN_VALUE_LEN = HEADER_LEN + 1


def _digest(key: str, body: bytes | memoryview) -> bytes:
    digest = hashlib.blake2b(key.encode(), digest_size=32)
    digest.update(body)
    return digest.digest()


def make_value(key: str, length: int, rng: random.Random) -> bytes:
    """A value of exactly ``length`` bytes for ``key`` (``length`` >= MIN_VALUE_LEN)."""
    assert length >= MIN_VALUE_LEN, length
    body = rng.randbytes(length - HEADER_LEN)
    return _HEADER.pack(MAGIC, len(body), _digest(key, body)) + body


def value_digest(value: bytes | memoryview) -> bytes:
    """The digest a value carries in its header (what the ledger keeps instead of bytes)."""
    return bytes(memoryview(value)[12:HEADER_LEN])


def is_exact(key: str, value: bytes | memoryview, expected_digest: bytes | None) -> bool:
    """True when ``value`` is a well-formed chaos value of ``key`` and, if known, the very
    one written (its digest equals ``expected_digest``)."""
    view = memoryview(value)
    if view.nbytes < MIN_VALUE_LEN:
        return False
    magic, body_len, digest = _HEADER.unpack_from(view)
    assert isinstance(digest, bytes)
    if magic != MAGIC or body_len != view.nbytes - HEADER_LEN:
        return False
    if expected_digest is not None and digest != expected_digest:
        return False
    return bool(digest == _digest(key, view[HEADER_LEN:]))
