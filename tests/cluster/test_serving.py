"""End to end on loopback: a real cluster (store master and node, conductor, prefill and decode
workers with SmolLM2) queried with the official ``openai`` SDK; failures of instances end
requests cleanly; no KV block stays held afterwards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kvcake.cluster import Cluster, ClusterSpec
from kvcake.cluster.up import wait_healthy
from kvcake.common.sockets import free_port
from kvcake.ops import ServerProcess, kvcake_command

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG_PROMPT = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(60))


def _spec(tmp: Path, **fields: object) -> ClusterSpec:
    base: dict[str, object] = {"port": 0, "kv_cache_size": "64MiB", "store_size": "128MiB",
                               "log_dir": str(tmp)}
    base.update(fields)
    return ClusterSpec(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(_spec(tmp_path_factory.mktemp("cluster")))
    cluster.start()
    yield cluster
    cluster.stop()


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.api_endpoint}/v1", api_key="none",
                         max_retries=0, timeout=120)


def _metrics(cluster: Cluster) -> str:
    with urllib.request.urlopen(f"http://{cluster.api_endpoint}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return text


def _gauges(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}{{instance="([^"]+)"}} (\S+)$', text, re.M)}


def _wait_all_blocks_free(cluster: Cluster, timeout_s: float = 20.0) -> dict[str, float]:
    """Every instance reports all its KV blocks free (none held, none reserved)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = _metrics(cluster)
        free, total = (_gauges(text, "kvcake_instance_free_kv_blocks"),
                       _gauges(text, "kvcake_instance_kv_blocks"))
        if (total and free == total) or time.monotonic() > deadline:
            assert free == total, f"blocks still held: free {free}, total {total}"
            return free
        time.sleep(0.2)


def test_chat_equals_the_offline_engines_greedy_answer(cluster: Cluster) -> None:
    from kvcake.engine.llm import LLM
    from kvcake.wire.sampling import SamplingParams

    reply = _client(cluster).chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    llm = LLM(model="smollm2", threads=1, kv_cache_bytes=16 << 20)
    try:
        offline = llm.chat([QUESTION], SamplingParams(max_tokens=24, temperature=0))
    finally:
        llm.close()
    assert reply.choices[0].message.content == offline[0].outputs[0].text
    assert "Paris" in (reply.choices[0].message.content or "")


def test_streamed_chat_and_completions_match_unstreamed(cluster: Cluster) -> None:
    client = _client(cluster)
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION,  # type: ignore[arg-type]
                                           max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION,  # type: ignore[arg-type]
                                            max_tokens=16, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    completion = client.completions.create(model="smollm2", prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    streamed = client.completions.create(model="smollm2", prompt="The capital of France is",
                                         max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_a_repeated_long_prompt_reuses_its_kv(cluster: Cluster) -> None:
    client = _client(cluster)
    first = client.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=4,
                                      temperature=0)
    second = client.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=4,
                                       temperature=0)
    assert first.choices[0].text == second.choices[0].text
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= second.usage.prompt_tokens - 16  # all but the last partial block


def test_kv_pushed_out_of_memory_comes_back_from_the_stores_disk(tmp_path: Path) -> None:
    """Later prompts push the first one's KV out of the instance's cache and the store's
    memory; it is still served as cached, from the store's disk tier (without one, a
    memory this small keeps none of it)."""
    cluster = Cluster(_spec(tmp_path, kv_cache_size="32MiB", store_size="32MiB",
                            store_disk_size="256MiB"))
    cluster.start()
    try:
        client = _client(cluster)
        prompts = [f"List {k}: " + " ".join(f"Item {i} of list {k} weighs {i * k + 3} grams."
                                             for i in range(36)) for k in range(6)]
        answers = [client.completions.create(model="smollm2", prompt=p, max_tokens=2,
                                             temperature=0) for p in prompts]
        again = client.completions.create(model="smollm2", prompt=prompts[0], max_tokens=2,
                                          temperature=0)
        assert again.choices[0].text == answers[0].choices[0].text
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        cached = again.usage.prompt_tokens_details.cached_tokens or 0
        assert cached >= again.usage.prompt_tokens - 16, cached  # all but the last block
    finally:
        cluster.stop()


def _counter(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_next_turn_writes_only_what_the_decode_instance_lacks(cluster: Cluster) -> None:
    """The decode instance decoded the first turn, so its cache holds that prompt's blocks:
    the second turn's reservation takes them as they are (only the rest are written), and
    the answer equals the offline engine's."""
    client = _client(cluster)
    turn = "Turn two: which of these numbers is the largest square?"
    cached = "kvcake_conductor_decode_cached_blocks_total"
    client.completions.create(model="smollm2", prompt=LONG_PROMPT + " Turn one.",
                              max_tokens=4, temperature=0)
    before = _counter(_metrics(cluster), cached)
    second = client.completions.create(model="smollm2", prompt=f"{LONG_PROMPT} {turn}",
                                       max_tokens=8, temperature=0)
    held = _counter(_metrics(cluster), cached) - before
    assert held >= len(LONG_PROMPT) // 4 // 16  # far more than a block or two
    from kvcake.engine.llm import LLM
    from kvcake.wire.sampling import SamplingParams

    llm = LLM(model="smollm2", threads=1, kv_cache_bytes=64 << 20)  # room for the prompt
    try:
        alone = llm.generate([f"{LONG_PROMPT} {turn}"],
                             SamplingParams(max_tokens=8, temperature=0))
    finally:
        llm.close()
    assert second.choices[0].text == alone[0].outputs[0].text


def test_models_health_metrics_and_bad_input(cluster: Cluster) -> None:
    client = _client(cluster)
    assert [m.id for m in client.models.list()] == ["smollm2"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="smollm2", prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="smollm2", prompt=[5] * 9000, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    text = _metrics(cluster)
    assert "kvcake_api_ttft_seconds_count" in text
    assert 'kvcake_conductor_routed_total{policy="kvcache_centric",prefill="prefill-0",' \
        'decode="decode-1"}' in text
    assert "kvcake_conductor_kv_transfer_bytes_total" in text


def test_no_kv_block_stays_held(cluster: Cluster) -> None:
    client = _client(cluster)
    stream = client.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=200,
                                       temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            stream.close()  # the client goes away mid-stream: the request is aborted
            break
    free = _wait_all_blocks_free(cluster)
    assert set(free) == {"prefill-0", "decode-1"}


def _kill(cluster: Cluster, name: str) -> None:
    process = next(p for p in cluster.processes if p.name == name)
    os.kill(process.pid, signal.SIGKILL)


def test_decode_instance_killed_mid_stream_ends_the_stream(tmp_path: Path) -> None:
    cluster = Cluster(_spec(tmp_path, store_size="0"))
    cluster.start()
    try:
        client = _client(cluster)
        stream = client.completions.create(
            model="smollm2", prompt="Count with me: one, two,", max_tokens=1000,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="decode-1"):
            for i, _ in enumerate(stream):
                if i == 3:
                    _kill(cluster, "decode-1")
        assert time.monotonic() - started < 60
        with pytest.raises(openai.InternalServerError):  # no decode instance left: 503
            client.completions.create(model="smollm2", prompt="hi", max_tokens=2)
        assert next(p for p in cluster.processes if p.name == "prefill-0").alive()
    finally:
        cluster.stop()


def test_kvcake_up_serves_and_stops_its_children_on_ctrl_c(tmp_path: Path) -> None:
    command = kvcake_command("up", "--port", "0", "--prefill", "0", "--decode", "0",
                             "--both", "1", "--no-store", "--kv-cache-size", "32MiB")
    up = ServerProcess(command, r"serving http://(\S+)/v1", timeout_s=240, name="kvcake up")
    try:
        endpoint = up.match.group(1)
        reply = openai.OpenAI(base_url=f"http://{endpoint}/v1", api_key="x", max_retries=0) \
            .completions.create(model="smollm2", prompt="Hello", max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        children = _children(up.pid)
        assert len(children) == 2  # the conductor and one colocated worker
        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(60) == 0
        assert "kvcake up: stopped" in up.output()
        assert not any(_exists(pid) for pid in children)
    finally:
        up.stop()


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_cluster_refuses_a_bad_spec() -> None:
    from kvcake.common.errors import InvalidParamsError

    with pytest.raises(InvalidParamsError, match="prefill > 0 and decode > 0"):
        ClusterSpec(prefill=1, decode=0)
    with pytest.raises(InvalidParamsError, match="policy must be one of"):
        ClusterSpec(policy="fastest")
    result = subprocess.run([sys.executable, "-m", "kvcake.cli", "up", "--admission", "x"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "admission must be one of" in result.stderr


def test_prefill_killed_mid_prefill_frees_the_decode_reservation(tmp_path: Path) -> None:
    # room for a 2,000-token prompt in float32 KV too (46 KB a token)
    cluster = Cluster(_spec(tmp_path, store_size="0", kv_cache_size="160MiB"))
    cluster.start()
    try:
        client = _client(cluster)
        long_prompt = " ".join([LONG_PROMPT] * 2)  # seconds of prefill on one thread
        started = time.monotonic()
        killer = threading.Timer(0.5, _kill, (cluster, "prefill-0"))
        killer.start()
        with pytest.raises(openai.APIError, match="prefill-0"):
            client.completions.create(model="smollm2", prompt=long_prompt, max_tokens=4,
                                      extra_body={"ignore_eos": True})
        killer.join()
        assert time.monotonic() - started < 60
        free = _wait_all_blocks_free(cluster)
        assert "decode-1" in free  # its reservation was given back
    finally:
        cluster.stop()




def test_a_restarted_conductor_rebuilds_its_index_from_the_instances(tmp_path: Path) -> None:
    rpc_port = free_port()
    conductor_args = ("conductor", "--port", "0", "--rpc-port", str(rpc_port),
                      "--policy", "cache_aware")
    ready = r"OpenAI API on http://(\S+)/v1"
    conductor = ServerProcess(kvcake_command(*conductor_args), ready, 120, "conductor")
    workers = [ServerProcess(kvcake_command(
        "worker", "--role", role, "--conductor", f"127.0.0.1:{rpc_port}", "--instance-id",
        role, "--kv-cache-size", "64MiB", "--threads", "1"), "listening on", 120, role)
        for role in ("prefill", "decode")]
    try:
        endpoint = conductor.match.group(1)
        wait_healthy(endpoint, ["prefill", "decode"], workers)
        client = openai.OpenAI(base_url=f"http://{endpoint}/v1", api_key="x", max_retries=0)
        client.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=2)
        before = _indexed(endpoint)
        assert before["prefill"] >= 10
        conductor.kill()
        conductor = ServerProcess(kvcake_command(*conductor_args), ready, 120, "conductor")
        endpoint = conductor.match.group(1)
        wait_healthy(endpoint, ["prefill", "decode"], workers)
        assert _indexed(endpoint)["prefill"] == before["prefill"]
        again = openai.OpenAI(base_url=f"http://{endpoint}/v1", api_key="x", max_retries=0) \
            .completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=2)
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        cached = again.usage.prompt_tokens_details.cached_tokens or 0
        # the prefill instance's reuse, not the decode instance's (it got the whole prompt)
        assert 0 < cached < again.usage.prompt_tokens
    finally:
        for process in [*workers, conductor]:
            process.stop()


def _indexed(endpoint: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as reply:
        return _gauges(reply.read().decode(), "kvcake_conductor_indexed_blocks")


def _decoding(cluster: Cluster, timeout_s: float = 30.0) -> str:
    """The decode instance the Conductor sees running a request. Its gauge follows the
    instances' load reports, which may come after the stream's first tokens: wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = _gauges(_metrics(cluster), "kvcake_instance_running_requests")
        busy = sorted(k for k, v in running.items() if v and not k.startswith("prefill"))
        if busy:
            return busy[0]
        assert time.monotonic() < deadline, f"no decode instance runs the request: {running}"
        time.sleep(0.02)


def test_retry_continues_a_stream_on_another_decode_instance(tmp_path: Path) -> None:
    cluster = Cluster(_spec(tmp_path, store_size="0", decode=2, on_decode_failure="retry"))
    cluster.start()
    try:
        stream = _client(cluster).completions.create(
            model="smollm2", prompt="Count with me: one, two,", max_tokens=200, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        finish, usage = None, None
        for i, chunk in enumerate(stream):
            if i == 5:
                _kill(cluster, _decoding(cluster))
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        assert finish == "length"
        assert usage is not None and usage.completion_tokens == 200
    finally:
        cluster.stop()
