"""The byte layout of one KV block in the store (version 2).

A stored block is a fixed 96-byte header followed by the payload. All integers are
little-endian::

    offset size  field
    0      4     magic            b"KVCB"
    4      2     version          1
    6      2     dtype            1 = bfloat16, 2 = float16, 3 = float32
    8      2     num_layers
    10     2     num_kv_heads
    12     2     head_dim
    14     2     block_size       tokens in the block
    16     16    fingerprint      ASCII hex: weights, architecture, dtype, block size, layout
    32     32    block_hash       the chained prefix digest the block is stored under
    64     8     payload_bytes
    72     8     checksum         XXH3-64 of the payload
    80     16    reserved         zero

    payload: (num_layers, 2 [K, V], block_size, num_kv_heads, head_dim) in ``dtype``

A reader refuses a block whose header disagrees with its own model (``fingerprint``,
shapes, dtype), whose hash is not the one it asked for, or whose checksum fails: such a
block is recomputed, never used. The payload may live in pieces (a block read straight into
each layer's slice of a paged cache): the checksum runs over them in order, as over one
buffer. Version 1 (a CRC32) is refused by version; XXH3 checks a block at memory speed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

FORMAT_VERSION = 2
MAGIC = b"KVCB"
HEADER = struct.Struct("<4sHHHHHH16s32sQQ16x")
HEADER_BYTES = HEADER.size
DTYPE_CODES = {"bfloat16": 1, "float16": 2, "float32": 3}

assert HEADER_BYTES == 96
_FIELDS = ("magic", "version", "dtype", "num_layers", "num_kv_heads", "head_dim",
           "block_size", "fingerprint", "block_hash", "payload_bytes")


def checksum(payload: Iterable[memoryview]) -> int:
    """XXH3-64 of the payload's pieces, in order (equal to that of their concatenation)."""
    digest = payload_digest()
    for piece in payload:
        digest.update(piece)
    return int(digest.intdigest())


def payload_digest() -> xxhash.xxh3_64:
    """A running :func:`checksum`: ``update`` it piece by piece, then ``intdigest()``."""
    return xxhash.xxh3_64()


@dataclass(frozen=True)
class BlockLayout:
    """What every block of one engine looks like; equal layouts can share blocks."""

    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    fingerprint: str

    @property
    def payload_bytes(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return (self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
                * itemsize)

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes

    def pack_header(self, block_hash: bytes, payload: Sequence[memoryview]) -> bytes:
        """The header of a block whose payload is ``payload``'s pieces, in order."""
        return HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE_CODES[self.dtype], self.num_layers,
                           self.num_kv_heads, self.head_dim, self.block_size,
                           self.fingerprint.encode(), block_hash,
                           sum(piece.nbytes for piece in payload), checksum(payload))

    def check(self, record: memoryview, block_hash: bytes) -> str | None:
        """Why ``record`` (header and payload in one buffer) may not be used for
        ``block_hash`` (``None`` when it may)."""
        if record.nbytes != self.record_bytes:
            return f"size {record.nbytes}, expected {self.record_bytes}"
        return self.check_parts(record[:HEADER_BYTES], [record[HEADER_BYTES:]], block_hash)

    def check_parts(self, header: memoryview, payload: Sequence[memoryview],
                    block_hash: bytes) -> str | None:
        """:meth:`check` for a block read as a header and the payload's pieces."""
        problem = self.check_header(header, block_hash)
        if problem is not None:
            return problem
        held = sum(piece.nbytes for piece in payload)
        if held != self.payload_bytes:
            return f"payload pieces hold {held} bytes"
        if checksum(payload) != stored_checksum(header):
            return "payload checksum mismatch"
        return None

    def check_header(self, header: memoryview, block_hash: bytes) -> str | None:
        """The first header field that disagrees with this layout and ``block_hash``."""
        fields = HEADER.unpack_from(header)
        expected = (MAGIC, FORMAT_VERSION, DTYPE_CODES[self.dtype], self.num_layers,
                    self.num_kv_heads, self.head_dim, self.block_size,
                    self.fingerprint.encode(), block_hash, self.payload_bytes)
        for name, got, want in zip(_FIELDS, fields[:10], expected, strict=True):
            if got != want:
                return f"{name} is {got!r}, expected {want!r}"
        return None


def stored_checksum(header: memoryview) -> int:
    """The payload checksum a record's header carries."""
    return int(HEADER.unpack_from(header)[10])
