import hashlib
import struct

import pytest

from kvcake.common import ROOT_DIGEST, InvalidParamsError, hash_block, prefix_block_hashes
from kvcake.common.hashing import hash_partial_block


def test_digests_are_pinned() -> None:
    # Pinned bytes: changing them silently would orphan every stored KV block.
    first = hash_block(ROOT_DIGEST, [1, 2, 3, 4], b"smollm2")
    assert first.hex() == "274753fa2924f63b6a06a91d1a941619efec7f4093f326562a489c6201e3c007"
    second = prefix_block_hashes(list(range(32)), 16, b"kvcake")[1]
    assert second.hex() == "5e73efd35ac8f3cc6b5d21149b3b85fd5d94cb421fdcd95af90bd8164be5ed6d"


def test_layout_is_parent_then_le_u32_tokens_then_salt() -> None:
    parent = bytes(range(32))
    expected = hashlib.sha256(parent + struct.pack("<3I", 7, 0x01020304, 2**32 - 1) + b"t").digest()
    assert hash_block(parent, [7, 0x01020304, 2**32 - 1], b"t") == expected


def test_chain_covers_full_blocks_only_and_names_the_whole_prefix() -> None:
    tokens = list(range(10))
    keys = prefix_block_hashes(tokens, block_size=4)
    assert len(keys) == 2  # the partial tail block (8, 9) gets no key
    assert keys[0] == hash_block(ROOT_DIGEST, [0, 1, 2, 3])
    assert keys[1] == hash_block(keys[0], [4, 5, 6, 7])
    other = prefix_block_hashes([9, 1, 2, 3, 4, 5, 6, 7], block_size=4)
    assert other[1] != keys[1]  # same block, different prefix, different key


def test_salt_separates_models() -> None:
    assert prefix_block_hashes([1] * 8, 4, b"a") != prefix_block_hashes([1] * 8, 4, b"b")


@pytest.mark.parametrize("tokens", [[-1], [2**32]])
def test_rejects_token_ids_outside_u32(tokens: list[int]) -> None:
    with pytest.raises(InvalidParamsError, match="token ids"):
        hash_block(ROOT_DIGEST, tokens)


def test_rejects_bad_block_size_and_parent() -> None:
    with pytest.raises(InvalidParamsError, match="block_size"):
        prefix_block_hashes([1, 2], 0)
    with pytest.raises(InvalidParamsError, match="parent digest"):
        hash_block(b"short", [1])


def test_a_partial_block_s_key_is_marker_parent_count_tokens_salt() -> None:
    parent = prefix_block_hashes(list(range(8)), 4, b"m")[1]
    expected = hashlib.sha256(b"kvcake/partial-block\0" + parent + struct.pack("<I2I", 2, 8, 9)
                              + b"m").digest()
    assert hash_partial_block(parent, [8, 9], b"m") == expected


def test_a_partial_key_never_equals_a_full_or_another_partial_block_s() -> None:
    parent = hash_block(ROOT_DIGEST, [1, 2, 3, 4])
    partial = hash_partial_block(parent, [5, 6, 7, 8])  # as many tokens as a full block
    assert partial != hash_block(parent, [5, 6, 7, 8])
    assert partial != hash_partial_block(parent, [5, 6, 7])
    assert partial != hash_partial_block(parent, [5, 6, 7, 8], b"other model")
    with pytest.raises(InvalidParamsError, match="parent digest must be 32 bytes"):
        hash_partial_block(b"short", [1])
