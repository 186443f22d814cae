"""Hostile HTTP against the real app on a real uvicorn server (the scripted backend of
test_app): every answer is a success or an OpenAI-shaped 4xx, never a 5xx, and a good request
is served afterwards; malformed request lines, huge headers and idle half-requests do not stop
the server either."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx2
import test_app
from hypothesis import example, given
from hypothesis import strategies as st
from test_app import MODEL, FakeBackend, Serve

from fuzzing import address_of, fuzz_settings, open_partial_connections

serve = test_app.serve  # the real app on a real server, stopped after each test
PATHS = ["/v1/completions", "/v1/chat/completions"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "min_p", "n", "stream", "stream_options", "stop", "seed",
          "stop_token_ids", "logprobs", "echo", "presence_penalty", "ignore_eos",
          "skip_special_tokens", "add_generation_prompt", "role", "content"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
           | st.sampled_from([10**400, -(10**400)]) | st.floats(allow_nan=False)
           | st.text(max_size=10) | st.sampled_from([MODEL, "user", "text", "x" * 100_000]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner,
                                      max_size=5), max_leaves=20)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8) | JSON


def assert_openai_answer(response: httpx2.Response) -> None:
    """A success, or a 4xx whose body is ``{"error": {message, type, param, code}}``."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code < 400:
        return
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert set(error) == {"message", "type", "param", "code"}


def assert_still_serving(address: str) -> None:
    response = httpx2.post(f"http://{address}/v1/completions", json={"model": MODEL,
                                                                     "prompt": "hi"}, timeout=10)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "Hello!"


def fuzzed(serve: Serve) -> tuple[str, httpx2.Client]:
    address = serve(FakeBackend())
    return address, httpx2.Client(base_url=f"http://{address}", timeout=10)


def test_random_json_bodies(serve: Serve) -> None:
    address, client = fuzzed(serve)

    @fuzz_settings(150)
    @given(path=st.sampled_from(PATHS), body=BODIES)
    @example(path=PATHS[0], body={"model": MODEL, "prompt": [10**30]})
    @example(path=PATHS[0], body={"model": MODEL, "prompt": "x", "max_tokens": 10**30})
    @example(path=PATHS[0], body={"model": MODEL, "prompt": "x", "seed": 2**64})
    @example(path=PATHS[0], body={"model": MODEL, "prompt": "x", "temperature": 1e308})
    @example(path=PATHS[0], body={"model": MODEL, "prompt": "x", "stop_token_ids": [-1]})
    @example(path=PATHS[1], body={"model": MODEL, "messages": [{"role": "user",
                                                                "content": [{}]}]})
    @example(path=PATHS[1], body={"model": MODEL, "messages": []})
    @example(path=PATHS[1], body={"model": MODEL, "messages": [{"role": 5}]})
    def post(path: str, body: Any) -> None:
        assert_openai_answer(client.post(path, content=json.dumps(body),
                                         headers={"content-type": "application/json"}))

    with client:
        post()
    assert_still_serving(address)


RAW_BODIES = (st.binary(max_size=300)
              | st.sampled_from([b"\xff\xfe{}", b'{"model": "\xc3\x28"}', b"{" * 100_000,
                                 b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000,
                                 b'{"model": "tiny", "prompt": "' + b"\xed\xa0\x80" + b'"}',
                                 b'{"model": "tiny", "prompt": "\\ud800"}', b"NaN",
                                 b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                                 b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}',
                                 b'{"model": "tiny", "prompt": [' + b"1," * 50_000 + b"1]}"])
              | st.text(max_size=200).map(str.encode))
CONTENT_TYPES = st.sampled_from([
    "application/json", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json; charset=latin-1", "", "*/*",
    "application/json; charset=\xff"]) \
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=20)


def test_raw_bodies_and_content_types(serve: Serve) -> None:
    address, client = fuzzed(serve)

    @fuzz_settings(120)
    @given(path=st.sampled_from(PATHS), body=RAW_BODIES, content_type=CONTENT_TYPES)
    def post(path: str, body: bytes, content_type: str) -> None:
        headers = {"content-type": content_type.encode("latin-1")} if content_type else {}
        assert_openai_answer(client.post(path, content=body, headers=headers))

    with client:
        post()
    assert_still_serving(address)


def test_random_paths_and_methods(serve: Serve) -> None:
    address, client = fuzzed(serve)
    segment = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                    exclude_characters="/?#%"), max_size=8)

    @fuzz_settings(100)
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                                   "TRACE", "FOO"]),
           path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models",
                                 "/v1/models/x", "/health", "/metrics", "/v1", "/", "/v2/x"])
           | st.lists(segment, max_size=4).map(lambda parts: "/" + "/".join(parts)),
           body=st.none() | st.binary(max_size=50))
    def request(method: str, path: str, body: bytes | None) -> None:
        response = client.request(method, path, content=body)
        if method == "HEAD":  # no body to look at
            assert response.status_code < 500
        else:
            assert_openai_answer(response)

    with client:
        request()
    assert_still_serving(address)


# ----- raw sockets: what no HTTP client would send

def raw_exchange(address: str, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes or half a second passes in silence."""
    with socket.create_connection(address_of(address), timeout=0.5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return received
            if not chunk:
                return received
            received += chunk


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(60),  # a TLS hello
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 20_000 + b"\r\n",
    b"GET /\x00\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n" * 10_000,
]


def test_malformed_requests_on_a_raw_socket_leave_the_server_serving(serve: Serve) -> None:
    address = serve(FakeBackend())
    for data in MALFORMED:
        answer = raw_exchange(address, data)
        if answer:  # an answer, if any, is an HTTP status line that is not a server error
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.1 "), status_line
            assert not status_line[9:].startswith(b"5"), status_line
        assert_still_serving(address)


def test_idle_half_requests_do_not_block_others(serve: Serve) -> None:
    address = serve(FakeBackend())
    half = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mo"
    with open_partial_connections(address_of(address), half, 50), \
            open_partial_connections(address_of(address), b"GET / HT", 50):
        assert_still_serving(address)
    assert_still_serving(address)
