"""End to end on loopback, through the official ``openai`` SDK: what clients and harnesses ask
beyond text (log-probabilities, echo, several choices, tokenizing), and the context bound, on
a real cluster (prefill and decode instances with SmolLM2, the store, the Conductor)."""

from __future__ import annotations

import json
import math
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from kvcake.cluster import Cluster, ClusterSpec
from wire import read_reply

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp: Path = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(ClusterSpec(port=0, kv_cache_size="64MiB", store_size="128MiB",
                                  log_dir=str(tmp), max_body_size="1MiB"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://{cluster.api_endpoint}/v1", api_key="none",
                       max_retries=0, timeout=120) as sdk:
        yield sdk


def _post(cluster: Cluster, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{cluster.api_endpoint}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


def _is_logprob(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value <= 0


def test_echo_scores_the_prompt_as_lm_eval_asks(cluster: Cluster,
                                                client: openai.OpenAI) -> None:
    count = _post(cluster, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})["count"]
    completion = client.completions.create(model="smollm2", prompt=PROMPT, echo=True,
                                           logprobs=1, max_tokens=1, temperature=0)
    [choice] = completion.choices
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == count + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(_is_logprob(lp) for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i]))
                                    for i in range(len(logprobs.tokens))]
    greedy = logprobs.top_logprobs[-1]
    assert greedy is not None and max(greedy, key=greedy.__getitem__) == logprobs.tokens[-1]


def test_a_batch_scores_each_prompt(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "Paris is the capital of"]
    completion = client.completions.create(model="smollm2", prompt=prompts, echo=True,
                                           logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1]
    for prompt, choice in zip(prompts, completion.choices, strict=True):
        assert choice.text.startswith(prompt)
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert choice.logprobs.token_logprobs[0] is None
        assert all(_is_logprob(lp) for lp in choice.logprobs.token_logprobs[1:])


def test_chat_logprobs_with_top_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 6 or reply.choices[0].finish_reason == "stop"
    for entry in logprobs.content:
        assert _is_logprob(entry.logprob) and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_n_choices_each_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8,
                                           temperature=0, n=2)
    first, second = reply.choices
    assert (first.index, second.index) == (0, 1)
    assert first.message.content == second.message.content  # greedy: the same answer
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 16 or first.finish_reason == "stop"
    seeded = [client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, seed=7,
                                        temperature=1.0, n=2) for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]


def test_streamed_logprobs_arrive_per_chunk(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5,
                                      temperature=0, logprobs=2)
    stream = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5,
                                       temperature=0, logprobs=2, stream=True)
    tokens: list[str] = []
    for chunk in stream:
        logprobs = chunk.choices[0].logprobs
        assert logprobs is not None and logprobs.token_logprobs is not None
        assert all(_is_logprob(lp) for lp in logprobs.token_logprobs)
        tokens += logprobs.tokens or []
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens


def test_past_the_context_is_400_with_the_numbers(cluster: Cluster,
                                                  client: openai.OpenAI) -> None:
    answer = _post(cluster, "/tokenize", {"prompt": "Hi", "add_special_tokens": False})
    limit, count = answer["max_model_len"], answer["count"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=100000)
    assert caught.value.body is not None
    assert caught.value.body["message"] == (  # type: ignore[index]
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{count + 100000} tokens ({count} in the messages, 100000 in the completion). "
        f"Please reduce the length of the messages or completion.")
    with pytest.raises(openai.BadRequestError, match="your request has"):
        client.completions.create(model="smollm2", prompt=[5] * limit, max_tokens=1)


def test_tokenize_and_detokenize_round_trip(cluster: Cluster) -> None:
    tokens = _post(cluster, "/tokenize", {"model": "smollm2", "prompt": PROMPT})["tokens"]
    assert _post(cluster, "/detokenize", {"tokens": tokens})["prompt"].endswith(PROMPT)
    chat = _post(cluster, "/tokenize", {"messages": QUESTION})
    assert chat["count"] == len(chat["tokens"]) > len(tokens)


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "weather"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_parameters_are_refused_by_name(client: openai.OpenAI,
                                                    extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=QUESTION, **extra)
    assert caught.value.param == param


@pytest.mark.parametrize("length", [64 << 20, 2 << 20])  # 2 MiB: past up's --max-body-size
def test_an_oversized_body_is_413_before_it_is_sent(cluster: Cluster, length: int) -> None:
    host, port = cluster.api_endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % length)
        reply = read_reply(sock)
    assert reply.startswith("HTTP/1.1 413")
    assert "larger than the server's limit" in reply
