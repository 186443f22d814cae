"""``kvcake up --engine vllm`` with every transfer over TCP, as between hosts: the prefill
instance sends a prompt's blocks to the decode instance a group of layers at a time as vLLM
writes them (``save_kv_layer``), each byte once, and the answer still equals a single
vLLM's greedy answer."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from kvcake.model import resolve_model
from kvcake.vllm.config import VllmServerConfig
from vllm_cluster import LONG, vllm_cluster
from vllm_venv import needs_vllm

pytestmark = [needs_vllm, pytest.mark.timeout(900)]
FLOAT32 = 4  # the clusters' dtype (vllm_cluster.ENV)


def _greedy(base_url: str, prompt: str) -> str:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0,
                       timeout=120.0) as client:
        reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12,
                                          temperature=0)
    return reply.choices[0].text


def _closing_line(log: Path, pattern: str) -> re.Match[str]:
    text = log.read_text(errors="replace")
    match = re.search(pattern, text)
    assert match, text[-3000:]
    return match


def test_over_the_network_each_layer_goes_out_as_it_is_written(tmp_path: Path) -> None:
    with vllm_cluster(tmp_path, env={"KVCAKE_TRANSFER_TRANSPORT": "tcp"}) as cluster:
        prompts = ["The capital of France is", LONG]
        answers = [_greedy(f"http://{cluster.api}", prompt) for prompt in prompts]
        single = cluster.vllm_url("prefill-0")  # its own server: no P/D
        assert answers == [_greedy(single, prompt) for prompt in prompts]
        cluster.cluster.stop()
    written = _closing_line(tmp_path / "prefill-0.log",
                            r"kvcake P/D: (\d+) requests' KV written into decode instances "
                            r"\((\d+) layer by layer\), ([\d.]+) MiB")
    sent, layered = int(written.group(1)), int(written.group(2))
    assert sent >= len(prompts) and layered == sent
    received = _closing_line(tmp_path / "decode-1.log",
                             r"kvcake P/D: \d+ requests' KV received from prefill instances "
                             r"\((\d+) blocks\)")
    block_bytes = VllmServerConfig().block_size * resolve_model("smollm2").config \
        .kv_bytes_per_token(FLOAT32)
    # every layer of every block written once: no layer sent twice, none left out
    assert float(written.group(3)) == pytest.approx(
        int(received.group(1)) * block_bytes / 2**20, abs=0.06)
