"""A vLLM instance's KV events into the Conductor's hashes: vLLM's own publisher
(``ZmqEventPublisher``, in the vLLM venv) publishes; the feed joins late, finds the gap,
has it replayed and ends with exactly the publisher's cache."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import msgspec

from kvcake.common.feed import EventFeed
from kvcake.common.hashing import prefix_block_hashes
from kvcake.conductor.indexer import ConductorView, MooncakeIndexer, Query, Registration
from kvcake.vllm.launch import vllm_env
from kvcake.wire.kv_events import CacheView
from vllm_venv import BLOCK, VLLM_PYTHON, needs_vllm, prompt

SALT = b"fp/default"

# prompts of 3, 2 and 2 blocks; B shares A's first block; A's last block is evicted; then
# C is stored after the feed connects
PUBLISHER = textwrap.dedent("""
    import sys, time
    from vllm.distributed.kv_events import (
        BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher)
    import json
    endpoint, replay, blocks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    pub = ZmqEventPublisher(0, endpoint=endpoint, replay_endpoint=replay)
    def stored(hashes, parent, tokens):
        return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                           block_size=BLOCK_SIZE, lora_id=None, medium="GPU", lora_name=None)
    def send(event):
        pub.publish(KVEventBatch(ts=time.time(), events=[event]))
    a, b, c = blocks
    send(stored([b"a0", b"a1", b"a2"], None, a))
    send(stored([b"b1"], b"a0", b[128:]))
    send(BlockRemoved(block_hashes=[b"a2"], medium="GPU"))
    print("published", flush=True)
    sys.stdin.readline()  # the feed is connected
    send(stored([b"c0", b"c1"], None, c))
    sys.stdin.readline()
    pub.shutdown()
""").replace("BLOCK_SIZE", str(BLOCK))


@needs_vllm
def test_a_late_feed_replays_the_gap_and_matches_the_instances_cache(tmp_path: Path) -> None:
    a, b, c = prompt(1, 3 * BLOCK), prompt(1, BLOCK) + prompt(2, BLOCK), prompt(3, 2 * BLOCK)
    endpoint, replay = f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay"  # vLLM binds
    publisher = subprocess.Popen(
        [str(VLLM_PYTHON), "-c", PUBLISHER, endpoint, replay,
         msgspec.json.encode([a, b, c]).decode()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=vllm_env())
    assert publisher.stdin is not None and publisher.stdout is not None
    try:
        assert publisher.stdout.readline().strip() == "published"
        view = CacheView(SALT)
        feed = EventFeed(endpoint, replay, view.apply)

        async def follow() -> None:
            task = asyncio.create_task(feed.run())
            # C goes out at once: it arrives live (and shows the gap before it) or, sent
            # before the subscription joined, comes from the replay a quiet feed asks for
            publisher.stdin.write("\n")  # type: ignore[union-attr]
            publisher.stdin.flush()  # type: ignore[union-attr]
            while feed.last_seq != 3:
                await asyncio.sleep(0.05)
            task.cancel()

        asyncio.run(asyncio.wait_for(follow(), 60))
        want = prefix_block_hashes(a, BLOCK, SALT)[:2] + \
            prefix_block_hashes(b, BLOCK, SALT)[1:] + prefix_block_hashes(c, BLOCK, SALT)
        assert sorted(view.hashes()) == sorted(want)
        assert feed.num_replays >= 1  # batches 0-2 came from the replay buffer
        kinds = [kind for kind, _ in view.take_changes()]
        assert kinds == ["stored"] * 3 + ["stored", "removed"] + ["stored"] * 2
    finally:
        publisher.stdin.write("\n")
        publisher.stdin.close()
        publisher.wait(30)
        publisher.stdout.close()


def test_unknown_parents_and_bad_batches_are_skipped() -> None:
    view = CacheView(SALT)
    view.apply(b"\xc1not msgpack")
    orphan = {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": 6,
              "token_ids": list(range(BLOCK)), "block_size": BLOCK}
    view.apply(msgspec.msgpack.encode([0.0, [orphan]]))
    assert view.hashes() == [] and view.num_orphans == 1
    root = dict(orphan, parent_block_hash=None, block_hashes=[6])
    view.apply(msgspec.msgpack.encode([0.0, [root, orphan, {"type": "AllBlocksCleared"}]]))
    assert view.hashes() == []
    assert [kind for kind, _ in view.take_changes()] == ["stored", "stored", "cleared"]


@needs_vllm
def test_a_vllm_publisher_registered_through_mooncakes_api_is_queried(tmp_path: Path) -> None:
    """Mooncake's ``/register`` with a vLLM publisher kvcake does not run: the indexer
    subscribes (the publisher binds its ipc:// endpoints), heals the gap from the replay
    socket, and ``/query`` reports the publisher's cached prefix."""
    a, b, c = prompt(1, 3 * BLOCK), prompt(1, BLOCK) + prompt(2, BLOCK), prompt(3, 2 * BLOCK)
    endpoint, replay = f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay"
    publisher = subprocess.Popen(
        [str(VLLM_PYTHON), "-c", PUBLISHER, endpoint, replay,
         msgspec.json.encode([a, b, c]).decode()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=vllm_env())
    assert publisher.stdin is not None and publisher.stdout is not None
    view = ConductorView("smollm2", 16, lambda tenant: "", lambda: [], lambda hashes: {},
                         _no_store, lambda instance_id: frozenset())
    indexer = MooncakeIndexer(view)

    async def register_and_query() -> dict[str, Any]:
        reply = indexer.register(Registration(endpoint, "vLLM", "ext-model", "ext-1", BLOCK,
                                              replay_endpoint=replay))
        assert reply == {"status": "registered successfully", "instance_id": "ext-1"}
        publisher.stdin.write("\n")  # type: ignore[union-attr]  # C, maybe before it joined
        publisher.stdin.flush()  # type: ignore[union-attr]
        entry = next(iter(indexer.registered.values()))
        while entry.feed.last_seq != 3:
            await asyncio.sleep(0.05)
        answers = {name: await indexer.query(Query("ext-model", BLOCK, tokens))
                   for name, tokens in (("a", a), ("b", b), ("c", c))}
        await indexer.close()
        return answers

    try:
        assert publisher.stdout.readline().strip() == "published"
        answers = asyncio.run(asyncio.wait_for(register_and_query(), 60))
    finally:
        publisher.stdin.write("\n")
        publisher.stdin.close()
        publisher.wait(30)
        publisher.stdout.close()
    matched = {name: reply["instances"]["ext-1"]["longest_matched"]
               for name, reply in answers.items()}
    assert matched == {"a": 2 * BLOCK, "b": 2 * BLOCK, "c": 2 * BLOCK}  # a's third: evicted


async def _no_store(namespace: str, hashes: tuple[bytes, ...]) -> int:
    return 0
