"""The Conductor's front end tokenizes a completion's text with the tokenizer's BOS (as vLLM
does, and as /tokenize does by default) and chat messages without it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from kvcake.conductor.frontend import ConductorBackend
from kvcake.conductor.server import ConductorServer
from kvcake.text import Tokenizer
from kvcake.text.tokenizer import byte_level_bpe
from kvcake.wire.generate import GenerateRequest
from kvcake.wire.sampling import SamplingParams

BOS = 0
TOKENS = ["<s>", "a", "b", "ab"]
NORMAL, CONTROL = 1, 3  # llama.cpp's token types


class SubmittedError(Exception):
    """Raised by the stand-in server once it has the routed prompt."""


class RecordingServer:
    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    async def submit(self, request_id: str, tokens: list[int], params: SamplingParams,
                     tenant: str) -> Any:
        self.prompts.append(tokens)
        raise SubmittedError


def backend(server: RecordingServer) -> ConductorBackend:
    tokenizer = Tokenizer(byte_level_bpe(TOKENS, ["a b"], [CONTROL, NORMAL, NORMAL, NORMAL],
                                         bos_id=BOS),
                          "{% for m in messages %}{{ m['content'] }}{% endfor %}", "<s>", None,
                          ())
    return ConductorBackend(cast(ConductorServer, server), tokenizer, "tiny")


def routed(front: ConductorBackend, request: GenerateRequest) -> None:
    async def first() -> None:
        await anext(front.generate(request))

    with pytest.raises(SubmittedError):
        asyncio.run(first())


def test_text_gets_the_bos_when_asked_and_chat_messages_do_not() -> None:
    server = RecordingServer()
    front = backend(server)
    params = SamplingParams(max_tokens=1)
    routed(front, GenerateRequest("a", "ab", None, params, add_special_tokens=True))
    routed(front, GenerateRequest("b", "ab", None, params))
    routed(front, GenerateRequest("c", None, ({"role": "user", "content": "ab"},), params))
    routed(front, GenerateRequest("d", None, ({"role": "user", "content": "ab"},), params,
                                  add_special_tokens=True))
    assert server.prompts == [[BOS, 3], [3], [3], [BOS, 3]]
    assert asyncio.run(front.tokenize("ab", None, True, True)) == [BOS, 3]
