"""The contract between the HTTP front end and whatever generates tokens behind it.

The front end validates an OpenAI request, turns it into a ``GenerateRequest`` and iterates
:meth:`Backend.generate` (the records are in :mod:`kvcake.wire.generate`); the Conductor
implements :class:`Backend` in production and tests implement it with scripted chunks.
Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from kvcake.wire.generate import GenerateChunk, GenerateRequest


@runtime_checkable
class Backend(Protocol):
    """Generates tokens for the front end (the Conductor in production)."""

    @property
    def model_name(self) -> str:
        """The one model served; requests naming another get 404."""
        ...

    @property
    def max_model_len(self) -> int:
        """The longest prompt plus completion served, in tokens (0: not known yet)."""
        ...

    async def tokenize(self, prompt: str | list[int] | None,
                       messages: tuple[dict[str, str], ...] | None,
                       add_special_tokens: bool, add_generation_prompt: bool) -> list[int]:
        """Token ids of a prompt or of chat messages (exactly one is given), off the event
        loop. Raises InvalidParamsError for a bad prompt (e.g. ids outside the vocabulary)."""
        ...

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; ids outside the vocabulary raise InvalidParamsError."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Yields chunks until one has a ``finish_reason``.

        Raises RequestRejectedError (→ 429), InvalidParamsError (→ 400), or another
        KvcakeError (→ its status hint, e.g. 503 when no instance can serve). If the consumer
        stops iterating (``aclose`` or cancellation) before that last chunk, the backend aborts
        the request downstream. The consumer closes the iterator after the last chunk too,
        rather than exhausting it: that is not an abort.
        """
        ...

    def health(self) -> tuple[bool, dict[str, object]]:
        """(ready, details): /health answers 200 when ready, else 503, with the details."""
        ...

    def render_metrics(self) -> str:
        """Extra Prometheus text appended to /metrics ("" for none)."""
        ...
