"""vLLM-CPU instances share prompt KV through kvcake's store: real vLLM processes (the vLLM
venv, ``make vllm``), a real master and node, SmolLM2. A second instance loads what the
first saved and answers with the same tokens (a longer prompt that starts with one of them
too: it loads that prompt's partial last block); a corrupted block and a store that dies under
it make it recompute, never answer wrong; a bad connector setting stops vLLM at start with
one clear line."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from kvcake.bench.vllm_bench import stored_keys, wait_stored
from kvcake.bench.vllm_instance import VllmInstance, kvcake_transfer
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store.compat import DistributedStore
from vllm_venv import BLOCK, VLLM_PYTHON, needs_vllm, prompt

pytestmark = needs_vllm

PROMPTS = P1, P2, P3, P4 = (prompt(1, 600), prompt(2, 400), prompt(3, 300),
                            prompt(4, 300))
NEXT_TURN = P1 + prompt(5, 100)  # P1's 4 blocks, then its 88-token tail in a full block
P2_ON = P2 + prompt(6, 300)  # P2's 3 blocks, then blocks the store lacks (removed below)
# the partial last ones too; the next turn adds its block 4 and its own partial block
STORED_BLOCKS = sum(-(-len(p) // BLOCK) for p in PROMPTS) + 2


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[str, str, ServerProcess, ServerProcess]]:
    master, endpoint = start_master()
    node = start_node(endpoint, "512MiB")
    try:
        yield endpoint, master.endpoints["metrics"], master, node
    finally:
        node.stop()
        master.stop()


def _metric(metrics: str, name: str) -> int:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(next((line.split()[1] for line in text.splitlines()
                     if line.startswith(f"{name} ")), "0"))


_READS = 'kvcake_store_requests_total{op="GetReplicas"}'


def _instance(master: str, policy: str, layered: bool = False) -> VllmInstance:
    """In float32: in bfloat16 on a CPU with AMX, the second instance (which computes P1 in
    other chunks than the cold run did) answered another fourth token."""
    return VllmInstance(VLLM_PYTHON, kvcake_transfer(master, policy),
                        {"KVCAKE_VLLM_LAYERED_LOAD": str(layered).lower(),
                         "KVCAKE_VLLM_DRIVER_DTYPE": "float32"})


@contextmanager
def _client(master: str) -> Iterator[DistributedStore]:
    client = DistributedStore()
    assert client.setup(master_server_addr=master) == 0
    try:
        yield client
    finally:
        client.close()


def _corrupt(master: str, key: str, whole: bool = False) -> None:
    """Flip one byte of the stored block's payload, or (``whole``) its second half (its
    header stays right)."""
    with _client(master) as client:
        record = bytearray(client.get(key))
        for i in range(len(record) // 2 if whole else len(record) - 1, len(record)):
            record[i] ^= 0xFF
        assert client.remove(key, force=True) == 0
        assert client.put(key, bytes(record)) == 0


@pytest.mark.timeout(900)  # two vLLM processes start (~40 s each) and prefill 1,600 tokens
def test_a_second_instance_loads_the_first_ones_prompts_and_recomputes_bad_blocks(
        store: tuple[str, str, ServerProcess, ServerProcess]) -> None:
    master, metrics, master_process, node = store
    first = _instance(master, "recompute")
    try:
        assert first.ready(), first.stop()
        next_turn = first.generate(NEXT_TURN)[0]  # before P1: computed whole
        cold = [first.generate(p)[0] for p in PROMPTS]
        p2_on = first.generate(P2_ON)[0]
        keys = first.ask({"keys": P2})["keys"]
        next_keys = first.ask({"keys": NEXT_TURN})["keys"]
        on_keys = first.ask({"keys": P2_ON})["keys"][len(keys):]
    finally:
        first.stop()
    wait_stored(metrics, STORED_BLOCKS + len(on_keys) + 1)
    assert len(keys) == len(P2) // BLOCK
    _corrupt(master, keys[0])
    with _client(master) as client:  # the next turn's block 4 is not stored, P2_ON's own
        assert client.remove(next_keys[len(P1) // BLOCK], force=True) == 0  # blocks neither
        assert [client.remove(key, force=True) for key in on_keys] == [0] * len(on_keys)

    second = _instance(master, "recompute", layered=True)  # loads beside the forward pass
    try:
        assert second.ready(), second.stop()
        reads = _metric(metrics, _READS)
        second.generate(P1[:2 * BLOCK + 44])  # its own cache holds P1's first 2 blocks now
        assert second.generate(P1)[0] == cold[0]  # the next 2 load from the store, in place
        assert _metric(metrics, _READS) > reads  # its blocks came from the store
        # its own cache holds P1's 4 blocks; the store, P1's partial last block: the next
        # turn loads those 88 tokens into its block 4 and computes the rest
        answer = second.ask({"prompt": NEXT_TURN, "max_tokens": 4})
        assert (answer["tokens"], answer["cached"]) == (next_turn, len(P1))
        assert second.generate(P2)[0] == cold[1]  # its first block fails its checksum
        # computed again, that block was stored again; bad once more, it is loaded with
        # P2's others for P2_ON, whose own blocks, computed over it in that step, are
        # stored only once computed again: then every block of P2_ON loads right
        _corrupt(master, keys[0], whole=True)
        assert second.ask({"reset": True})["reset"]
        assert second.generate(P2_ON)[0] == p2_on
        assert second.ask({"reset": True})["reset"]
        answer = second.ask({"prompt": P2_ON, "max_tokens": 4})  # all from the store
        assert (answer["tokens"], answer["cached"]) == (p2_on, len(P2_ON) - 1)
        node.kill()  # the pool is gone
        assert second.generate(P3)[0] == cold[2]
        master_process.kill()  # and the store with it
        assert second.generate(P4)[0] == cold[3]
    finally:
        errors = second.stop()
    assert "payload checksum mismatch" in errors, errors[-3000:]
    assert "Recovered from KV load failure" in errors, errors[-3000:]  # vLLM recomputed
    assert "store lookup failed, computing instead" in errors, errors[-3000:]
    assert "did not wait for every layer" not in errors, errors[-3000:]  # loads were layered


@pytest.mark.timeout(300)
def test_a_full_store_refuses_every_save_and_the_instance_serves_on() -> None:
    master, endpoint = start_master()
    node = start_node(endpoint, "1MiB")  # smaller than one block record: every put fails
    instance = _instance(endpoint, "recompute")
    try:
        assert instance.ready(), instance.stop()
        first = [instance.generate(p)[0] for p in (P3, P4)]
        assert [instance.generate(p)[0] for p in (P3, P4)] == first  # its own cache, intact
        assert all(len(tokens) == 4 for tokens in first)
        assert stored_keys(master.endpoints["metrics"]) == 0
    finally:
        errors = instance.stop()
        node.stop()
        master.stop()
    # none stored; the second asks hit vLLM's own cache, whose blocks are not offered again,
    # but for each prompt's partial last block (vLLM caches full blocks only)
    blocks = sum(-(-len(p) // BLOCK) + 1 for p in (P3, P4))
    assert f"0 saved, 0 dropped, {blocks} failed blocks" in errors, errors[-3000:]


@pytest.mark.timeout(300)  # vLLM loads its model before it builds the connector
def test_a_load_failure_policy_other_than_recompute_stops_vllm_at_start() -> None:
    instance = _instance("127.0.0.1:9", "fail")
    assert not instance.ready()
    errors = instance.stop()
    assert instance.process.returncode != 0
    assert 'needs "kv_load_failure_policy": "recompute"' in errors, errors[-2000:]
