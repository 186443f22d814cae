"""The official ``openai`` SDK against the front end and a scripted backend."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pytest

from kvcake.api import ApiServer, build_app
from kvcake.common.aio import LoopThread
from kvcake.common.errors import RequestRejectedError
from kvcake.wire.generate import EchoedPrompt, GenerateChunk, GenerateRequest, TokenLogprob

MODEL = "tiny"
KEY = "sk-kvcake-test"
WORDS = [
    GenerateChunk("The", [1], None, num_prompt_tokens=6, num_cached_tokens=4),
    GenerateChunk(" sky", [2], None, num_prompt_tokens=6, num_cached_tokens=4),
    GenerateChunk("", [3], None, num_prompt_tokens=6, num_cached_tokens=4),
    GenerateChunk(" is blue.", [4], "stop", num_prompt_tokens=6, num_cached_tokens=4),
]


class ScriptedBackend:
    """Answers every request with ``WORDS``, or raises ``error`` when one is set."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.requests: list[GenerateRequest] = []

    @property
    def model_name(self) -> str:
        return MODEL

    @property
    def max_model_len(self) -> int:
        return 2048

    async def tokenize(self, prompt: str | list[int] | None,
                       messages: tuple[dict[str, str], ...] | None, add_special_tokens: bool,
                       add_generation_prompt: bool) -> list[int]:
        return [len(prompt or "")]

    async def detokenize(self, token_ids: list[int]) -> str:
        return "x" * len(token_ids)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        for index, chunk in enumerate(WORDS):
            yield _with_extras(request, chunk, index == 0)

    def health(self) -> tuple[bool, dict[str, object]]:
        return True, {}

    def render_metrics(self) -> str:
        return ""


def _with_extras(request: GenerateRequest, chunk: GenerateChunk,
                 first: bool) -> GenerateChunk:
    """``chunk`` with the log-probabilities (all -0.5) and echoed prompt that were asked."""
    if request.params.logprobs is not None:
        chunk = dataclasses.replace(chunk, logprobs=tuple(
            TokenLogprob(chunk.text, token_id, -0.5, (TokenLogprob(chunk.text, token_id, -0.5),))
            for token_id in chunk.token_ids))
    if request.echo and first:
        chunk = dataclasses.replace(chunk, prompt=EchoedPrompt("Sky", [9], (
            TokenLogprob("Sky", 9, None),)))
    return chunk


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ScriptedBackend, str]]:
    """One server (API key ``KEY``) for the module: ``(backend, base_url)``."""
    thread = LoopThread("api-sdk-test")
    backend = ScriptedBackend()
    server = ApiServer(build_app(backend, api_key=KEY), "127.0.0.1", 0)
    address = thread.run(server.startup(), timeout=10)
    yield backend, f"http://{address}/v1"
    thread.run(server.shutdown(timeout_s=1.0), timeout=10)
    thread.stop()


@pytest.fixture
def backend(served: tuple[ScriptedBackend, str]) -> ScriptedBackend:
    served[0].error = None
    served[0].requests.clear()
    return served[0]


@pytest.fixture
def client(served: tuple[ScriptedBackend, str],
           backend: ScriptedBackend) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served[1], api_key=KEY, max_retries=0, timeout=10) as sdk:
        yield sdk


def test_chat(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What colour is the sky?"}],
        max_completion_tokens=20, temperature=0)
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", "The sky is blue.")
    assert choice.finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (6, 4, 10)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 4
    [request] = backend.requests
    assert request.messages == ({"role": "user", "content": "What colour is the sky?"},)
    assert (request.params.max_tokens, request.params.temperature) == (20, 0.0)


def test_chat_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Sky?"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices]
    assert deltas == ["", "The", " sky", "", " is blue."]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_completions(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    completion = client.completions.create(model=MODEL, prompt="The sky", max_tokens=8,
                                           stop=["\n"], seed=1)
    assert completion.choices[0].text == "The sky is blue."
    assert completion.object == "text_completion"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 10
    [request] = backend.requests
    assert (request.prompt, request.params.max_tokens, request.params.stop,
            request.params.seed) == ("The sky", 8, ("\n",), 1)


def test_completions_streaming(client: openai.OpenAI) -> None:
    texts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=[5, 6, 7], stream=True)]
    assert texts == ["The", " sky", "", " is blue."]


def test_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "kvcake"


@pytest.mark.parametrize("stream", [False, True])
def test_rejection_raises_rate_limit_error(client: openai.OpenAI, backend: ScriptedBackend,
                                           stream: bool) -> None:
    backend.error = RequestRejectedError("tbt_slo", "decode batch too large")
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       stream=stream)
    assert caught.value.code == "tbt_slo"
    assert caught.value.body == {"message": "request rejected (tbt_slo): decode batch too large",
                                 "type": "rate_limit_error", "param": None, "code": "tbt_slo"}


Call = Callable[[openai.OpenAI], object]


@pytest.mark.parametrize(("call", "param"), [
    (lambda sdk: sdk.completions.create(model=MODEL, prompt="x", n=17), "n"),
    (lambda sdk: sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2),
     "top_logprobs"),
    (lambda sdk: sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}],
        tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (lambda sdk: sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_object"}), "response_format"),
    (lambda sdk: sdk.completions.create(model=MODEL, prompt=["a"] * 65), "prompt"),
])
def test_bad_request_raises_bad_request_error(client: openai.OpenAI, call: Call,
                                              param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        call(client)
    assert caught.value.param == param


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="other", prompt="x")
    assert caught.value.code == "model_not_found"


def test_wrong_key_raises_authentication_error(served: tuple[ScriptedBackend, str]) -> None:
    sdk = openai.OpenAI(base_url=served[1], api_key="wrong", max_retries=0, timeout=10)
    with sdk, pytest.raises(openai.AuthenticationError) as caught:
        sdk.models.list()
    assert caught.value.code == "invalid_api_key"


def test_completion_logprobs_and_echo_parse(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="Sky", echo=True, logprobs=1,
                                           max_tokens=1, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    logprobs = completion.choices[1].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.tokens == ["Sky", "The", " sky", "", " is blue."]
    assert logprobs.token_logprobs == [None, -0.5, -0.5, -0.5, -0.5]
    assert logprobs.text_offset == [0, 3, 6, 10, 10]
    assert completion.choices[1].text == "SkyThe sky is blue."


def test_chat_logprobs_parse_streamed_and_whole(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Sky?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True,
                                           top_logprobs=1)
    assert whole.choices[0].logprobs is not None
    content = whole.choices[0].logprobs.content or []
    assert [(c.token, c.logprob, len(c.top_logprobs)) for c in content] == [
        ("The", -0.5, 1), (" sky", -0.5, 1), ("", -0.5, 1), (" is blue.", -0.5, 1)]
    stream = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True,
                                            stream=True)
    streamed = [c.choices[0].logprobs for c in stream if c.choices]
    assert streamed[0] is None  # the opening role chunk
    assert [len(lp.content or []) for lp in streamed[1:] if lp is not None] == [1, 1, 1, 1]


def test_batched_prompts_parse(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    completion = client.completions.create(model=MODEL, prompt=["The sky", "The sea"],
                                           max_tokens=4)
    assert [(c.index, c.text) for c in completion.choices] == [
        (0, "The sky is blue."), (1, "The sky is blue.")]
    assert [r.prompt for r in backend.requests] == ["The sky", "The sea"]
    assert completion.usage is not None and completion.usage.prompt_tokens == 12
