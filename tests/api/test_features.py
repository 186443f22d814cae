"""What clients and harnesses ask of the API beyond plain text: log-probabilities (and echo,
as lm-evaluation-harness scores log-likelihood), several choices, /tokenize and /detokenize,
and the bound on request bodies; against the scripted backend of test_app."""

from __future__ import annotations

import socket
from typing import Any

import httpx2
import pytest
from test_app import (
    CHAT,
    COMPLETION,
    MAX_MODEL_LEN,
    MODEL,
    FakeBackend,
    Serve,
    post,
    serve,
    sse_events,
)

from kvcake.common.errors import InvalidParamsError, RequestRejectedError
from kvcake.conductor.config import ConductorServerConfig
from kvcake.wire.generate import EchoedPrompt, GenerateChunk, TokenLogprob
from wire import read_reply

__all__ = ["serve"]  # the fixture, shared with test_app


def lp(token: str, token_id: int, logprob: float | None,
       *top: tuple[str, int, float]) -> TokenLogprob:
    return TokenLogprob(token, token_id, logprob, tuple(TokenLogprob(*t) for t in top))


PROMPT = EchoedPrompt("Say hi", [83, 84], (lp("Say", 83, None), lp(" hi", 84, -2.5)))
SCORED = [
    GenerateChunk("Hel", [11], None, 2, 0, logprobs=(lp("Hel", 11, -0.5, ("Hel", 11, -0.5),
                                                        ("He", 12, -1.5)),), prompt=PROMPT),
    GenerateChunk("lo!", [13, 14], "length", 2, 0,
                  logprobs=(lp("lo", 13, -0.25, ("lo", 13, -0.25), ("la", 15, -3.0)),
                            lp("!", 14, -1.0, ("?", 16, -0.75), ("!", 14, -1.0)))),
]
GENERATED_LOGPROBS = {
    "tokens": ["Hel", "lo", "!"], "token_logprobs": [-0.5, -0.25, -1.0],
    "top_logprobs": [{"Hel": -0.5, "He": -1.5}, {"lo": -0.25, "la": -3.0},
                     {"?": -0.75, "!": -1.0}],
    "text_offset": [0, 3, 5]}


# ----- /v1/completions
def test_completion_logprobs_in_the_legacy_shape(serve: Serve) -> None:
    backend = FakeBackend(SCORED)
    body = post(serve(backend), "/v1/completions", {**COMPLETION, "logprobs": 2}).json()
    [choice] = body["choices"]
    assert choice["text"] == "Hello!"
    assert choice["logprobs"] == GENERATED_LOGPROBS
    [request] = backend.requests
    assert (request.params.logprobs, request.params.prompt_logprobs, request.echo) == (
        2, None, False)


def test_echo_with_logprobs_scores_the_prompt_first_null(serve: Serve) -> None:
    """lm-evaluation-harness's log-likelihood request: echo, logprobs 1, max_tokens 1."""
    backend = FakeBackend(SCORED)
    body = post(serve(backend), "/v1/completions", {
        **COMPLETION, "prompt": "Say hi", "echo": True, "logprobs": 1, "max_tokens": 1}).json()
    [choice] = body["choices"]
    assert choice["text"] == "Say hiHello!"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["Say", " hi", "Hel", "lo", "!"]
    assert logprobs["token_logprobs"] == [None, -2.5, -0.5, -0.25, -1.0]
    assert logprobs["top_logprobs"][:2] == [None, {" hi": -2.5}]
    assert logprobs["text_offset"] == [0, 3, 6, 9, 11]
    [request] = backend.requests
    assert (request.params.logprobs, request.params.prompt_logprobs, request.echo) == (
        1, 1, True)


def test_echo_without_logprobs_prepends_the_prompt(serve: Serve) -> None:
    backend = FakeBackend([GenerateChunk("!", [3], "stop", 2, 0,
                                         prompt=EchoedPrompt("Say hi", [83, 84]))])
    body = post(serve(backend), "/v1/completions", {**COMPLETION, "echo": True}).json()
    assert (body["choices"][0]["text"], body["choices"][0]["logprobs"]) == ("Say hi!", None)
    assert backend.requests[0].params.prompt_logprobs is None


def test_streamed_logprobs_keep_their_text_offsets(serve: Serve) -> None:
    response = post(serve(FakeBackend(SCORED)), "/v1/completions",
                    {**COMPLETION, "logprobs": 2, "stream": True})
    first, second = [event["choices"][0]["logprobs"] for event in sse_events(response)]
    assert first == {key: value[:1] for key, value in GENERATED_LOGPROBS.items()}
    assert second == {key: value[1:] for key, value in GENERATED_LOGPROBS.items()}


def test_streamed_echo_opens_with_the_prompt(serve: Serve) -> None:
    response = post(serve(FakeBackend(SCORED)), "/v1/completions",
                    {**COMPLETION, "echo": True, "logprobs": 1, "stream": True})
    first, second = [event["choices"][0] for event in sse_events(response)]
    assert (first["text"], second["text"]) == ("Say hiHel", "lo!")
    assert first["logprobs"]["tokens"] == ["Say", " hi", "Hel"]
    assert first["logprobs"]["token_logprobs"] == [None, -2.5, -0.5]
    assert (first["logprobs"]["text_offset"], second["logprobs"]["text_offset"]) == (
        [0, 3, 6], [9, 11])


def test_n_choices_are_requests_of_their_own_with_one_prompt(serve: Serve) -> None:
    backend = FakeBackend()
    body = post(serve(backend), "/v1/completions", {**COMPLETION, "n": 3, "seed": 5}).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "Hello!"), (1, "Hello!"), (2, "Hello!")]
    assert [r.request_id for r in backend.requests] == [f"{body['id']}-{i}" for i in range(3)]
    assert {r.prompt for r in backend.requests} == {"Hi"}
    assert [r.params.seed for r in backend.requests] == [5, 6, 7]  # n answers, reproducible
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 2}}


def test_n_choices_stream_each_in_order(serve: Serve) -> None:
    response = post(serve(FakeBackend()), "/v1/completions", {
        **COMPLETION, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(response)
    for index in (0, 1):
        texts = [e["choices"][0]["text"] for e in events
                 if e["choices"] and e["choices"][0]["index"] == index]
        assert texts == ["Hel", "", "lo!"]
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_a_batch_of_prompts_gets_n_choices_each(serve: Serve) -> None:
    backend = FakeBackend()
    body = post(serve(backend), "/v1/completions", {
        **COMPLETION, "prompt": [[1, 2], [3]], "n": 2, "seed": 9}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [(r.request_id.rsplit("-", 1)[1], r.prompt, r.params.seed)
            for r in backend.requests] == [
        ("0", [1, 2], 9), ("1", [1, 2], 10), ("2", [3], 9), ("3", [3], 10)]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 4}}


def test_one_refused_choice_refuses_the_request(serve: Serve) -> None:
    backend = FakeBackend([RequestRejectedError("ttft_slo", "queue too long")])
    response = post(serve(backend), "/v1/completions", {**COMPLETION, "n": 2})
    assert response.status_code == 429
    assert len(backend.requests) == 2


# ----- /v1/chat/completions
def test_chat_logprobs_in_the_chat_shape(serve: Serve) -> None:
    backend = FakeBackend(SCORED)
    body = post(serve(backend), "/v1/chat/completions", {
        **CHAT, "logprobs": True, "top_logprobs": 2, "n": 2, "presence_penalty": 1.5}).json()
    assert len(body["choices"]) == 2
    content = body["choices"][1]["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [
        ("Hel", -0.5, [72, 101, 108]), ("lo", -0.25, [108, 111]), ("!", -1.0, [33])]
    assert content[2]["top_logprobs"] == [{"token": "?", "logprob": -0.75, "bytes": [63]},
                                          {"token": "!", "logprob": -1.0, "bytes": [33]}]
    params = backend.requests[0].params
    assert (params.logprobs, params.presence_penalty, params.max_tokens) == (2, 1.5, None)


def test_chat_stream_carries_logprobs_per_chunk(serve: Serve) -> None:
    response = post(serve(FakeBackend(SCORED)), "/v1/chat/completions",
                    {**CHAT, "logprobs": True, "stream": True})
    opening, *chunks = sse_events(response)
    assert opening["choices"][0]["logprobs"] is None
    tokens = [[c["token"] for c in e["choices"][0]["logprobs"]["content"]] for e in chunks]
    assert tokens == [["Hel"], ["lo", "!"]]


def test_chat_without_logprobs_asks_for_none(serve: Serve) -> None:
    backend = FakeBackend()
    body = post(serve(backend), "/v1/chat/completions", {**CHAT, "logprobs": False}).json()
    assert body["choices"][0]["logprobs"] is None
    assert backend.requests[0].params.logprobs is None


# ----- /tokenize and /detokenize
def test_tokenize_a_prompt_or_messages(serve: Serve) -> None:
    address = serve(FakeBackend())
    assert post(address, "/tokenize", {"model": MODEL, "prompt": "hi"}).json() == {
        "count": 3, "max_model_len": MAX_MODEL_LEN, "tokens": [104, 105, 0]}
    answer = post(address, "/tokenize", {"messages": CHAT["messages"],
                                         "add_special_tokens": True}).json()
    assert answer["tokens"] == [72, 105, 0]


def test_special_tokens_default_as_in_vllm(serve: Serve) -> None:
    """A text prompt gets the tokenizer's BOS; chat messages do not (the template writes
    it); /tokenize tokenizes as those endpoints do, and every default can be overridden."""
    backend = FakeBackend()
    address = serve(backend)
    post(address, "/v1/completions", COMPLETION)
    post(address, "/v1/completions", {**COMPLETION, "add_special_tokens": False})
    post(address, "/v1/chat/completions", CHAT)
    post(address, "/v1/chat/completions", {**CHAT, "add_special_tokens": True})
    assert [r.add_special_tokens for r in backend.requests] == [True, False, False, True]
    assert post(address, "/tokenize", {"messages": CHAT["messages"]}).json()["tokens"] == [
        72, 105]


def test_detokenize_round_trips(serve: Serve) -> None:
    address = serve(FakeBackend())
    assert post(address, "/detokenize", {"model": MODEL, "tokens": [104, 105]}).json() == {
        "prompt": "hi"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "messages": CHAT["messages"]}, 400, "messages"),
    ("/tokenize", {}, 400, "messages"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [0x110000]}, 400, None),
])
def test_tokenizer_routes_refuse_bad_bodies(serve: Serve, path: str, body: dict[str, Any],
                                            status: int, param: str | None) -> None:
    response = post(serve(FakeBackend()), path, body)
    assert (response.status_code, response.json()["error"]["param"]) == (status, param)


# ----- bounds
def test_a_body_past_the_limit_is_413_before_it_is_read(serve: Serve) -> None:
    backend = FakeBackend()
    address = serve(backend)
    response = post(address, "/v1/completions", {**COMPLETION, "prompt": "x" * (5 << 20)})
    assert response.status_code == 413
    assert response.json()["error"] == {
        "message": "the request body is larger than the server's limit of 4194304 bytes",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    assert backend.requests == []


def test_a_chunked_body_past_the_limit_is_413(serve: Serve) -> None:
    backend = FakeBackend()
    host, port = serve(backend, max_body_bytes=1000).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 600
        for _ in range(2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        reply = read_reply(sock)
    assert reply.startswith("HTTP/1.1 413")
    assert "larger than the server's limit of 1000 bytes" in reply
    assert backend.requests == []


def test_a_body_under_the_limit_is_served(serve: Serve) -> None:
    address = serve(FakeBackend(), max_body_bytes=200)
    assert post(address, "/v1/completions", COMPLETION).status_code == 200
    assert httpx2.get(f"http://{address}/health", timeout=10).status_code == 200


def test_the_conductor_flag_sets_the_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcake.conductor.run
    from kvcake.cli import build_parser

    seen: list[ConductorServerConfig] = []
    monkeypatch.setattr(kvcake.conductor.run, "run_conductor",
                        lambda config, policy, ready_file: seen.append(config))
    args = build_parser().parse_args(["conductor", "--max-body-size", "64KiB"])
    assert args.run(args) == 0
    assert seen[0].max_body_bytes == 64 << 10
    with pytest.raises(InvalidParamsError, match="max_body_bytes must be >= 1"):
        ConductorServerConfig(max_body_bytes=0)
