"""Stable prefix block hashes: the identity of a KV block across processes and machines.

A block's key names the block *and everything before it*::

    digest[0]   = SHA-256( ROOT            || tokens[0:B]   as little-endian u32 || salt )
    digest[i]   = SHA-256( digest[i-1]     || tokens[iB:(i+1)B] as LE u32        || salt )

``ROOT`` is 32 zero bytes; ``salt`` separates models and tenants (the same tokens under another
model must never share KV). Full blocks chain; a prompt's partial last block gets a key of
its own kind (:func:`hash_partial_block`), which nothing chains onto and no full block's key
can equal.
Python's ``hash()`` is never used: it changes per process, which silently zeroes cross-instance
hit rates.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

from kvcake.common.errors import InvalidParamsError

ROOT_DIGEST = bytes(32)
DIGEST_SIZE = 32
_U32_MAX = 0xFFFFFFFF
_PARTIAL = b"kvcake/partial-block\0"  # opens a partial block's digest input, never a full one's


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        packed = array("I", tokens)
    except OverflowError:
        raise InvalidParamsError("token ids must be in 0..2**32-1") from None
    assert packed.itemsize == 4
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent: bytes, tokens: Sequence[int], salt: bytes = b"") -> bytes:
    """Digest of one block chained onto ``parent`` (``ROOT_DIGEST`` for the first block)."""
    if len(parent) != DIGEST_SIZE:
        raise InvalidParamsError(f"parent digest must be {DIGEST_SIZE} bytes, got {len(parent)}")
    digest = hashlib.sha256(parent)
    digest.update(_token_bytes(tokens))
    digest.update(salt)
    return digest.digest()


def prefix_block_hashes(
    tokens: Sequence[int], block_size: int, salt: bytes = b"", parent: bytes = ROOT_DIGEST
) -> list[bytes]:
    """Keys of every full ``block_size`` block of ``tokens``, each chained on the one before."""
    if block_size <= 0:
        raise InvalidParamsError(f"block_size must be > 0, got {block_size}")
    keys: list[bytes] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size], salt)
        keys.append(parent)
    return keys


def hash_partial_block(parent: bytes, tokens: Sequence[int], salt: bytes = b"") -> bytes:
    """Digest of a prompt's partial last block (fewer tokens than a block holds) after the
    full block ``parent``. Its input opens with a marker where a full block's opens with a
    digest (zeros, or SHA-256 output), and it counts its tokens."""
    if len(parent) != DIGEST_SIZE:
        raise InvalidParamsError(f"parent digest must be {DIGEST_SIZE} bytes, got {len(parent)}")
    digest = hashlib.sha256(_PARTIAL + parent + len(tokens).to_bytes(4, "little"))
    digest.update(_token_bytes(tokens))
    digest.update(salt)
    return digest.digest()
