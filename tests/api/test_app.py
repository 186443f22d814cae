"""The HTTP front end against a scripted backend, through a real server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2
import pytest

from kvcake.api import ApiServer, build_app
from kvcake.api.metrics import ApiMetrics
from kvcake.common.aio import LoopThread
from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    RequestRejectedError,
)
from kvcake.wire.generate import GenerateChunk, GenerateRequest
from kvcake.wire.sampling import SamplingParams

MODEL = "tiny"
MAX_MODEL_LEN = 64
HOLD = "hold"  # in a script: wait here until the backend is released (or the client leaves)
CHUNKS = [
    GenerateChunk("Hel", [11], None, num_prompt_tokens=5, num_cached_tokens=2),
    GenerateChunk("", [12], None, num_prompt_tokens=5, num_cached_tokens=2),
    GenerateChunk("lo!", [13], "stop", num_prompt_tokens=5, num_cached_tokens=2),
]


class FakeBackend:
    """Plays ``script`` (chunks, HOLD, or an exception to raise) and records what happened.

    ``outcomes[request_id]``: "finished" (its last chunk went out; the consumer may then close
    the iterator), "cancelled" (CancelledError reached it) or "closed" (its iterator was closed
    early, while suspended).
    """

    def __init__(self, script: list[Any] | None = None, ready: bool = True,
                 extra_metrics: str = "") -> None:
        self.script = list(CHUNKS) if script is None else script
        self.ready = ready
        self.extra_metrics = extra_metrics
        self.requests: list[GenerateRequest] = []
        self.outcomes: dict[str, str] = {}
        self._gate: asyncio.Event | None = None

    @property
    def model_name(self) -> str:
        return MODEL

    @property
    def max_model_len(self) -> int:
        return MAX_MODEL_LEN

    async def tokenize(self, prompt: str | list[int] | None,
                       messages: tuple[dict[str, str], ...] | None, add_special_tokens: bool,
                       add_generation_prompt: bool) -> list[int]:
        """One token per character (of the prompt, or of every message's content)."""
        text = prompt if isinstance(prompt, str) else "".join(
            m["content"] for m in messages or ())
        return [ord(c) for c in text] + ([0] if add_special_tokens else [])

    async def detokenize(self, token_ids: list[int]) -> str:
        if any(t >= 0x110000 for t in token_ids):
            raise InvalidParamsError("tokens: outside the vocabulary")
        return "".join(chr(t) for t in token_ids)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.requests.append(request)
        try:
            for step in self.script:
                if isinstance(step, BaseException):
                    raise step
                if step == HOLD:
                    await self.gate().wait()
                    continue
                if step.finish_reason is not None:
                    self.outcomes[request.request_id] = "finished"
                yield step
        except asyncio.CancelledError:
            self.outcomes.setdefault(request.request_id, "cancelled")
            raise
        except GeneratorExit:
            self.outcomes.setdefault(request.request_id, "closed")
            raise

    def gate(self) -> asyncio.Event:
        if self._gate is None:
            self._gate = asyncio.Event()
        return self._gate

    def health(self) -> tuple[bool, dict[str, object]]:
        return self.ready, {"instances": 2}

    def render_metrics(self) -> str:
        if self.extra_metrics == "boom":
            raise RuntimeError("metrics exploded")
        return self.extra_metrics


Serve = Callable[..., str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(backend, api_key=None, **build_app_options) -> "127.0.0.1:port"``; servers
    stop after the test."""
    thread = LoopThread("api-test")
    servers: list[ApiServer] = []

    def start(backend: FakeBackend, api_key: str | None = None, **options: Any) -> str:
        server = ApiServer(build_app(backend, api_key=api_key, **options), "127.0.0.1", 0)
        servers.append(server)
        return thread.run(server.startup(), timeout=10)

    yield start
    for server in servers:
        thread.run(server.shutdown(timeout_s=1.0), timeout=10)
    thread.stop()


def post(address: str, path: str, body: Any, **kwargs: Any) -> httpx2.Response:
    return httpx2.post(f"http://{address}{path}", json=body, timeout=10, **kwargs)


def sse_events(response: httpx2.Response) -> list[Any]:
    """Each ``data:`` payload, JSON-decoded except the final ``[DONE]``; checks the framing."""
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n")
    frames = text[:-2].split("\n\n")
    assert all(frame.startswith("data: ") for frame in frames)
    payloads = [frame.removeprefix("data: ") for frame in frames]
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
         "prompt_tokens_details": {"cached_tokens": 2}}


# ----- completions
def test_completion_answers_one_openai_body(serve: Serve) -> None:
    backend = FakeBackend()
    address = serve(backend)
    response = post(address, "/v1/completions", {"model": MODEL, "prompt": "Say hi"})
    assert response.status_code == 200
    body = response.json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert isinstance(body["created"], int)
    assert body == {
        "id": body["id"], "object": "text_completion", "created": body["created"],
        "model": MODEL, "usage": USAGE,
        "choices": [{"index": 0, "text": "Hello!", "logprobs": None, "finish_reason": "stop",
                     "stop_reason": None}],
    }
    [request] = backend.requests
    assert request == GenerateRequest(request_id=body["id"], prompt="Say hi", messages=None,
                                      params=SamplingParams(max_tokens=16),
                                      add_special_tokens=True)
    assert backend.outcomes == {body["id"]: "finished"}


def test_completion_stream_sends_one_event_per_chunk_even_empty(serve: Serve) -> None:
    address = serve(FakeBackend())
    response = post(address, "/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})
    assert response.status_code == 200
    events = sse_events(response)
    assert [(e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events] == [
        ("Hel", None), ("", None), ("lo!", "stop")]
    first = events[0]
    assert first == {"id": first["id"], "object": "text_completion", "created": first["created"],
                     "model": MODEL, "choices": [{"index": 0, "text": "Hel", "logprobs": None,
                                                  "finish_reason": None, "stop_reason": None}]}
    assert {e["id"] for e in events} == {first["id"]}


def test_stream_usage_chunk_comes_last_when_asked(serve: Serve) -> None:
    address = serve(FakeBackend())
    response = post(address, "/v1/completions", {
        "model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(response)
    assert [e["usage"] for e in events[:-1]] == [None, None, None]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == USAGE


def test_stop_reason_is_passed_through(serve: Serve) -> None:
    backend = FakeBackend([GenerateChunk("a", [1], "stop", 3, 0, stop_reason=7)])
    address = serve(backend)
    body = post(address, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}).json()
    assert body["choices"][0]["stop_reason"] == 7
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}


# ----- chat
def test_chat_answers_one_openai_body(serve: Serve) -> None:
    backend = FakeBackend()
    address = serve(backend)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]}]
    response = post(address, "/v1/chat/completions", {
        "model": MODEL, "messages": messages, "add_generation_prompt": False})
    body = response.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert body == {
        "id": body["id"], "object": "chat.completion", "created": body["created"],
        "model": MODEL, "usage": USAGE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
    }
    [request] = backend.requests
    assert request == GenerateRequest(
        request_id=body["id"], prompt=None,
        messages=({"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi\nthere"}),
        params=SamplingParams(max_tokens=None), add_generation_prompt=False)


def test_chat_stream_opens_with_the_role(serve: Serve) -> None:
    address = serve(FakeBackend())
    response = post(address, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    events = sse_events(response)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events] == [
        ({"role": "assistant", "content": ""}, None), ({"content": "Hel"}, None),
        ({"content": ""}, None), ({"content": "lo!"}, "stop")]
    assert "usage" not in events[0]


# ----- parameters
def test_every_sampling_field_maps_onto_sampling_params(serve: Serve) -> None:
    backend = FakeBackend()
    address = serve(backend)
    post(address, "/v1/completions", {
        "model": MODEL, "prompt": ["only one"], "max_tokens": 7, "temperature": 0.5,
        "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 3, "stop": ["x", "y"],
        "stop_token_ids": [9], "ignore_eos": True, "include_stop_str_in_output": True,
        "skip_special_tokens": False, "n": 1, "presence_penalty": 0.5, "frequency_penalty": -1,
        "repetition_penalty": 1.2, "min_tokens": 2, "logprobs": 3, "echo": False,
        "user": "alice", "response_format": {"type": "text"}, "logit_bias": {},
        "some_future_field": {"x": 1}})
    [request] = backend.requests
    assert request.prompt == "only one"
    assert request.params == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=3, stop=("x", "y"),
        stop_token_ids=(9,), ignore_eos=True, include_stop_str_in_output=True,
        skip_special_tokens=False, logprobs=3, presence_penalty=0.5, frequency_penalty=-1.0,
        repetition_penalty=1.2, min_tokens=2)
    assert not request.echo


@pytest.mark.parametrize(("body", "prompt", "params"), [
    ({"prompt": [[4, 5]], "stop": "end"}, [4, 5], SamplingParams(max_tokens=16, stop=("end",))),
    ({"prompt": "p", "temperature": None, "top_k": -1, "seed": None}, "p",
     SamplingParams(max_tokens=16)),
])
def test_completion_prompt_forms_and_nulls(serve: Serve, body: dict[str, Any],
                                           prompt: object, params: SamplingParams) -> None:
    backend = FakeBackend()
    address = serve(backend)
    assert post(address, "/v1/completions", {"model": MODEL, **body}).status_code == 200
    assert (backend.requests[0].prompt, backend.requests[0].params) == (prompt, params)


@pytest.mark.parametrize(("limits", "max_tokens"), [
    ({}, None), ({"max_tokens": 20}, 20), ({"max_tokens": 20, "max_completion_tokens": 30}, 30)])
def test_chat_token_limit(serve: Serve, limits: dict[str, int], max_tokens: int | None) -> None:
    backend = FakeBackend()
    address = serve(backend)
    post(address, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **limits})
    assert backend.requests[0].params.max_tokens == max_tokens


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": MODEL, "prompt": "Hi"}


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    ("/v1/completions", {**COMPLETION, "n": 17}, "n",
     "n: Input should be less than or equal to 16"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 5, "n": 16}, "prompt",
     "prompt: at most 64 completions per request (prompts x n), got 80"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", ""]}, "prompt",
     "prompt: must not be empty"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt", "prompt: must not be empty"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, -2]}, "prompt",
     "prompt: token ids must be non-negative integers"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs",
     "logprobs: Input should be less than or equal to 20"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs",
     "top_logprobs: needs logprobs set to true"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo",
     "echo: echo is supported by /v1/completions only; send false"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f"}}]}, "tools", "tools: tool calling is not supported; send no tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice",
     "tool_choice: tool calling is not supported; got tool_choice 'required'"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}},
     "response_format", "response_format: only the text response format is supported "
                        "(structured output is not), got 'json_object'"),
    ("/v1/completions", {**COMPLETION, "response_format": {"type": "json_schema"}},
     "response_format", "response_format: only the text response format is supported "
                        "(structured output is not), got 'json_schema'"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"5": 10}}, "logit_bias",
     "logit_bias: logit_bias is not supported; send null or {}"),
    ("/v1/completions", {**COMPLETION, "suffix": "end"}, "suffix",
     "suffix: suffix (insertion) is not supported; send null"),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of",
     "best_of: best_of is not supported (use n); send null or 1, got 3"),
    ("/v1/chat/completions", {**CHAT, "guided_json": {"type": "object"}}, "guided_json",
     "guided_json: guided decoding is not supported; send null"),
    ("/v1/completions", {"prompt": "Hi"}, "model", "model: Field required"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}},
     "stream_options", "stream_options: stream_options is only for a stream: set stream to "
                       "true or send null"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens",
     "max_tokens: Input should be greater than or equal to 1"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens: Input should be greater than or equal to 1"),
    ("/v1/completions", {**COMPLETION, "stop": 5}, "stop",
     "stop: must be a string or a list of strings, got 5"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages",
     "messages: List should have at least 1 item after validation, not 0"),
    ("/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "messages[0].content: only text content parts are supported, "
                            "got 'image_url'"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role", "messages[0].role: Input should be 'system', 'developer', 'user', "
                         "'assistant' or 'tool'"),
])
def test_bad_fields_get_400_naming_the_field(serve: Serve, path: str, body: dict[str, Any],
                                             param: str, message: str) -> None:
    backend = FakeBackend()
    address = serve(backend)
    response = post(address, path, body)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error",
                                         "param": param, "code": None}}
    assert backend.requests == []


def test_sampling_params_refusal_is_400(serve: Serve) -> None:
    address = serve(FakeBackend())
    response = post(address, "/v1/completions", {**COMPLETION, "temperature": -1})
    assert response.status_code == 400
    assert response.json() == {"error": {
        "message": "temperature must be finite and >= 0.0, got -1.0",
        "type": "invalid_request_error", "param": None, "code": "invalid_params"}}


def test_malformed_json_is_400(serve: Serve) -> None:
    address = serve(FakeBackend())
    response = httpx2.post(f"http://{address}/v1/completions", content=b"{not json",
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "the request body is not valid JSON: Expecting property name enclosed in double quotes")


@pytest.mark.parametrize(("content", "content_type"), [
    (b"[1, 2]", "application/json"), (b'{"model": "tiny"}', "text/plain")])
def test_body_that_is_not_a_json_object_is_400(serve: Serve, content: bytes,
                                                content_type: str) -> None:
    address = serve(FakeBackend())
    response = httpx2.post(f"http://{address}/v1/completions", content=content,
                           headers={"Content-Type": content_type}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "the request body must be a JSON object, sent with Content-Type: "
                   "application/json", "type": "invalid_request_error", "param": "body",
        "code": None}


# ----- models, routing
def test_models_list_and_card(serve: Serve) -> None:
    address = serve(FakeBackend())
    listing = httpx2.get(f"http://{address}/v1/models", timeout=10).json()
    [card] = listing["data"]
    assert listing == {"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": card["created"], "owned_by": "kvcake",
         "max_model_len": MAX_MODEL_LEN}]}
    assert httpx2.get(f"http://{address}/v1/models/{MODEL}", timeout=10).json() == card


def test_a_model_id_with_a_slash_has_its_card(serve: Serve,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeBackend, "model_name", "HuggingFaceTB/SmolLM2-135M-Instruct")
    address = serve(FakeBackend())
    card = httpx2.get(f"http://{address}/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct",
                      timeout=10)
    assert (card.status_code, card.json()["id"]) == (200, "HuggingFaceTB/SmolLM2-135M-Instruct")
    other = httpx2.get(f"http://{address}/v1/models/HuggingFaceTB/other", timeout=10)
    assert other.json()["error"]["code"] == "model_not_found"
    metrics = httpx2.get(f"http://{address}/metrics", timeout=10).text
    assert 'kvcake_api_requests_total{endpoint="/v1/models/{model_id}",status="200"} 1\n' \
        in metrics  # the label of every model card, as before ids could hold '/'


def test_unknown_model_is_404_model_not_found(serve: Serve) -> None:
    backend = FakeBackend()
    address = serve(backend)
    expected = {"error": {"message": f"the model `gpt-4` does not exist; this server serves "
                                     f"`{MODEL}`", "type": "not_found_error", "param": "model",
                          "code": "model_not_found"}}
    response = post(address, "/v1/chat/completions", {**CHAT, "model": "gpt-4"})
    assert (response.status_code, response.json()) == (404, expected)
    response = httpx2.get(f"http://{address}/v1/models/gpt-4", timeout=10)
    assert (response.status_code, response.json()) == (404, expected)
    assert backend.requests == []


def test_unknown_route_and_wrong_method_answer_openai_errors(serve: Serve) -> None:
    address = serve(FakeBackend())
    missing = httpx2.get(f"http://{address}/v1/nothing", timeout=10)
    assert (missing.status_code, missing.json()["error"]["message"]) == (404, "Not Found")
    wrong = httpx2.get(f"http://{address}/v1/completions", timeout=10)
    assert (wrong.status_code, wrong.json()["error"]["type"]) == (405, "invalid_request_error")


# ----- backend errors
@pytest.mark.parametrize("stream", [False, True])
def test_rejection_is_429_before_any_stream_header(serve: Serve, stream: bool) -> None:
    backend = FakeBackend([RequestRejectedError("ttft_slo", "predicted TTFT 45.0 s > 30.0 s")])
    address = serve(backend)
    response = post(address, "/v1/completions", {**COMPLETION, "stream": stream})
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {
        "message": "request rejected (ttft_slo): predicted TTFT 45.0 s > 30.0 s",
        "type": "rate_limit_error", "param": None, "code": "ttft_slo"}}
    metrics = httpx2.get(f"http://{address}/metrics", timeout=10).text
    assert 'kvcake_api_rejections_total{reason="ttft_slo"} 1\n' in metrics
    assert ('kvcake_api_requests_total{endpoint="/v1/completions",status="429"} 1\n'
            in metrics)


@pytest.mark.parametrize(("error", "status", "code", "message"), [
    (KvcakeError("no decode instance is up", ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS), 503,
     "unavailable_in_current_status", "no decode instance is up"),
    (InvalidParamsError("prompt is longer than the context (9000 > 8192 tokens)"), 400,
     "invalid_params", "prompt is longer than the context (9000 > 8192 tokens)"),
    (RuntimeError("bug"), 500, None, "internal error (RuntimeError); the server log has details"),
])
def test_backend_errors_map_to_their_status(serve: Serve, caplog: pytest.LogCaptureFixture,
                                            error: Exception, status: int, code: str | None,
                                            message: str) -> None:
    backend = FakeBackend([error])
    address = serve(backend)
    with caplog.at_level(logging.ERROR, logger="kvcake.api.app"):
        response = post(address, "/v1/chat/completions", CHAT)
    assert response.status_code == status
    assert response.json()["error"] == {
        "message": message, "param": None, "code": code,
        "type": {503: "server_error", 400: "invalid_request_error", 500: "server_error"}[status]}
    logged = [r.getMessage() for r in caplog.records if r.name == "kvcake.api.app"]
    failed = f"request {backend.requests[0].request_id}: the backend failed"
    assert logged == ([failed] if status == 500 else [])


def test_error_after_the_headers_becomes_an_error_event(serve: Serve) -> None:
    backend = FakeBackend([CHUNKS[0], KvcakeError("decode instance lost", ErrorCode.RPC_FAIL)])
    address = serve(backend)
    events = sse_events(post(address, "/v1/completions", {**COMPLETION, "stream": True}))
    assert [e.get("error") for e in events] == [None, {
        "message": "decode instance lost", "type": "server_error", "param": None,
        "code": "rpc_fail"}]


def test_unhandled_error_is_a_logged_500(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    address = serve(FakeBackend(extra_metrics="boom"))
    with caplog.at_level(logging.ERROR, logger="kvcake.api.middleware"):
        response = httpx2.get(f"http://{address}/metrics", timeout=10)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == (
        "internal server error; the server log has details")
    assert [r.getMessage() for r in caplog.records if r.name == "kvcake.api.middleware"] == [
        "unhandled error answering GET /metrics"]


# ----- api key
def test_api_key_guards_the_api_but_not_health_and_metrics(serve: Serve) -> None:
    address = serve(FakeBackend(), api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = post(address, "/v1/completions", COMPLETION, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"error": {
            "message": "missing or incorrect API key: send 'Authorization: Bearer <key>'",
            "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
    good = post(address, "/v1/completions", COMPLETION,
                headers={"Authorization": "Bearer s3cret"})
    assert good.status_code == 200
    assert httpx2.get(f"http://{address}/v1/models", timeout=10).status_code == 401
    for path, body in (("/tokenize", {"model": MODEL, "prompt": "Hi"}),
                       ("/detokenize", {"model": MODEL, "tokens": [72]})):
        assert post(address, path, body).status_code == 401
        assert post(address, path, body,
                    headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx2.get(f"http://{address}/health", timeout=10).status_code == 200
    assert httpx2.get(f"http://{address}/metrics", timeout=10).status_code == 200


def test_empty_api_key_is_refused() -> None:
    with pytest.raises(InvalidParamsError, match="api_key must not be empty"):
        build_app(FakeBackend(), api_key="")


# ----- health, metrics
@pytest.mark.parametrize(("ready", "status"), [(True, 200), (False, 503)])
def test_health_reports_backend_readiness(serve: Serve, ready: bool, status: int) -> None:
    address = serve(FakeBackend(ready=ready))
    response = httpx2.get(f"http://{address}/health", timeout=10)
    assert (response.status_code, response.json()) == (
        status, {"ready": ready, "details": {"instances": 2}})


def test_metrics_count_latencies_tokens_and_requests(serve: Serve) -> None:
    extra = "# TYPE kvcake_conductor_queue gauge\nkvcake_conductor_queue 4"
    address = serve(FakeBackend(extra_metrics=extra))
    post(address, "/v1/completions", COMPLETION)
    post(address, "/v1/completions", {**COMPLETION, "stream": True})
    response = httpx2.get(f"http://{address}/metrics", timeout=10)
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = response.text.splitlines()
    for expected in (
        'kvcake_api_requests_total{endpoint="/v1/completions",status="200"} 2',
        "# TYPE kvcake_api_ttft_seconds histogram",
        'kvcake_api_ttft_seconds_bucket{le="+Inf"} 2', "kvcake_api_ttft_seconds_count 2",
        'kvcake_api_tbt_seconds_bucket{le="+Inf"} 4', "kvcake_api_tbt_seconds_count 4",
        'kvcake_api_e2e_seconds_bucket{le="+Inf"} 2', "kvcake_api_e2e_seconds_count 2",
        "kvcake_api_prompt_tokens_total 10", "kvcake_api_generation_tokens_total 6",
        "kvcake_api_cached_prompt_tokens_total 4", "kvcake_api_running_requests 0",
    ):
        assert expected in lines
    assert lines[-2:] == ["# TYPE kvcake_conductor_queue gauge", "kvcake_conductor_queue 4"]


def test_request_timer_reads_latencies_off_the_clock() -> None:
    now = [10.0]
    metrics = ApiMetrics(clock=lambda: now[0])
    timer = metrics.start_request()
    assert metrics.running.value() == 1
    for at, chunk in ((10.5, GenerateChunk("a", [1], None, 7, 3)),  # TTFT 0.5
                      (10.6, GenerateChunk("", [], None, 7, 3)),  # no token: no TBT sample
                      (10.75, GenerateChunk("b", [2, 3], None, 7, 3)),  # TBT 0.25
                      (11.0, GenerateChunk("c", [4], "length", 7, 3))):  # TBT 0.25, E2E 1.0
        now[0] = at
        timer.on_chunk(chunk)
    timer.finish()
    timer.finish()
    lines = metrics.render().splitlines()
    for expected in ("kvcake_api_ttft_seconds_sum 0.5", "kvcake_api_ttft_seconds_count 1",
                     'kvcake_api_tbt_seconds_bucket{le="0.2"} 0',
                     'kvcake_api_tbt_seconds_bucket{le="0.3"} 2',
                     "kvcake_api_tbt_seconds_sum 0.5", "kvcake_api_tbt_seconds_count 2",
                     "kvcake_api_e2e_seconds_sum 1.0", "kvcake_api_e2e_seconds_count 1",
                     "kvcake_api_prompt_tokens_total 7", "kvcake_api_cached_prompt_tokens_total 3",
                     "kvcake_api_generation_tokens_total 4", "kvcake_api_running_requests 0"):
        assert expected in lines


# ----- disconnects
def open_request(address: str, path: str, body: dict[str, Any]) -> socket.socket:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize(("script", "stream"), [
    ([HOLD], False),  # waiting to be admitted
    ([HOLD], True),
    ([CHUNKS[0], HOLD], False),  # generating
])
def test_client_leaving_early_cancels_the_backend(serve: Serve, script: list[Any],
                                                  stream: bool) -> None:
    backend = FakeBackend(script)
    address = serve(backend)
    sock = open_request(address, "/v1/completions", {**COMPLETION, "stream": stream})
    wait_until(lambda: len(backend.requests) == 1)
    sock.close()
    wait_until(lambda: bool(backend.outcomes))
    assert backend.outcomes == {backend.requests[0].request_id: "cancelled"}
    metrics = httpx2.get(f"http://{address}/metrics", timeout=10).text
    assert "kvcake_api_running_requests 0\n" in metrics
    assert 'kvcake_api_requests_total{endpoint="/v1/completions",status="499"} 1\n' in metrics


def test_client_leaving_mid_stream_cancels_the_backend(serve: Serve) -> None:
    backend = FakeBackend([CHUNKS[0], HOLD, CHUNKS[2]])
    address = serve(backend)
    sock = open_request(address, "/v1/chat/completions", {**CHAT, "stream": True})
    received = b""
    while b'"Hel"' not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    sock.close()
    wait_until(lambda: bool(backend.outcomes))
    assert backend.outcomes == {backend.requests[0].request_id: "cancelled"}
    wait_until(lambda: "kvcake_api_running_requests 0\n" in httpx2.get(
        f"http://{address}/metrics", timeout=10).text)


# ----- the server's lifecycle
def test_server_binds_an_ephemeral_port_without_touching_signals() -> None:
    async def scenario() -> None:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        server = ApiServer(build_app(FakeBackend()), "127.0.0.1", 0)
        address = await server.startup()
        host, port = address.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
        with pytest.raises(InvalidParamsError, match=f"already serving on {address}"):
            await server.startup()
        with pytest.raises(OSError):  # the port is taken
            await ApiServer(build_app(FakeBackend()), host, int(port)).startup()
        async with httpx2.AsyncClient() as client:
            assert (await client.get(f"http://{address}/health")).status_code == 200
        await server.shutdown()
        await server.shutdown()  # again: nothing to do
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))

    asyncio.run(scenario())


def test_shutdown_lets_requests_in_flight_finish() -> None:
    async def scenario() -> None:
        backend = FakeBackend([CHUNKS[0], HOLD, CHUNKS[2]])
        server = ApiServer(build_app(backend), "127.0.0.1", 0)
        address = await server.startup()
        async with httpx2.AsyncClient(timeout=10) as client:
            request = asyncio.ensure_future(
                client.post(f"http://{address}/v1/completions", json=COMPLETION))
            while not backend.requests:
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(server.shutdown(timeout_s=10.0))
            await asyncio.sleep(0.3)  # uvicorn is draining, the request still holds
            assert not stopping.done()
            backend.gate().set()
            response = await request
            await stopping
        assert (response.status_code, response.json()["choices"][0]["text"]) == (200, "Hello!")

    asyncio.run(scenario())


def test_shutdown_cancels_requests_past_the_timeout() -> None:
    async def scenario() -> None:
        backend = FakeBackend([CHUNKS[0], HOLD])
        server = ApiServer(build_app(backend), "127.0.0.1", 0)
        address = await server.startup()
        reader, writer = await asyncio.open_connection(*address.split(":"))
        payload = json.dumps({**COMPLETION, "stream": True}).encode()
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     f"{len(payload)}\r\nContent-Type: application/json\r\n\r\n".encode()
                     + payload)
        await reader.readuntil(b'"Hel"')
        await server.shutdown(timeout_s=0.2)
        assert backend.outcomes == {backend.requests[0].request_id: "cancelled"}
        writer.close()

    asyncio.run(scenario())
