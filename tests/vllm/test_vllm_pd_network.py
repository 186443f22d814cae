"""``kvcake up --engine vllm`` with every transfer over TCP, as between hosts: the prefill
instance sends each layer of a prompt's blocks to the decode instance as vLLM writes it
(``save_kv_layer``), and the answer still equals a single vLLM's greedy answer."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from vllm_cluster import LONG, vllm_cluster
from vllm_venv import needs_vllm

pytestmark = [needs_vllm, pytest.mark.timeout(900)]


def _greedy(base_url: str, prompt: str) -> str:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0,
                       timeout=120.0) as client:
        reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12,
                                          temperature=0)
    return reply.choices[0].text


def test_over_the_network_each_layer_goes_out_as_it_is_written(tmp_path: Path) -> None:
    with vllm_cluster(tmp_path, env={"KVCAKE_TRANSFER_TRANSPORT": "tcp"}) as cluster:
        prompts = ["The capital of France is", LONG]
        answers = [_greedy(f"http://{cluster.api}", prompt) for prompt in prompts]
        single = cluster.vllm_url("prefill-0")  # its own server: no P/D
        assert answers == [_greedy(single, prompt) for prompt in prompts]
        cluster.cluster.stop()
        text = (cluster.logs / "prefill-0.log").read_text(errors="replace")
    match = re.search(r"kvcake P/D: (\d+) requests' KV written into decode instances "
                      r"\((\d+) layer by layer\)", text)
    assert match, text[-3000:]
    sent, layered = int(match.group(1)), int(match.group(2))
    assert sent >= len(prompts) and layered == sent
