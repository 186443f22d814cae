"""``kvcake generate``: one prompt through a local engine, streamed to a text stream."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TextIO

from kvcake.engine.llm import LLM
from kvcake.wire.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    chat: bool
    system: str | None
    params: SamplingParams
    show_stats: bool


def run_generate(options: GenerateOptions, engine_overrides: dict[str, Any],
                 out: TextIO, err: TextIO) -> int:
    started = time.monotonic()
    llm = LLM(**engine_overrides)
    loaded = time.monotonic()
    prompt = _render(llm, options)
    num_tokens = 0
    reason = None
    for delta in llm.stream(prompt, options.params):
        out.write(delta.text)
        out.flush()
        num_tokens += len(delta.token_ids)
        reason = delta.finish_reason
    out.write("\n")
    if options.show_stats:
        elapsed = time.monotonic() - loaded
        err.write(f"[{num_tokens} tokens in {elapsed:.2f} s, finish_reason={reason}, "
                  f"model loaded in {loaded - started:.2f} s]\n")
    return 0


def _render(llm: LLM, options: GenerateOptions) -> str | list[int]:
    """The prompt as text (the tokenizer adds its BOS), or, with ``--chat``, the chat
    template's tokens (the template writes its own BOS)."""
    if not options.chat:
        return options.prompt
    messages = [{"role": "system", "content": options.system}] if options.system else []
    messages.append({"role": "user", "content": options.prompt})
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))
