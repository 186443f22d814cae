"""The OpenAI-compatible HTTP front end (completions, chat, streaming, /health, /metrics).

It works against any :class:`Backend` (the Conductor in production): ``build_app(backend)``
gives the ASGI app and :class:`ApiServer` serves it from the running event loop.
"""

from kvcake.api.app import build_app
from kvcake.api.backend import Backend, GenerateChunk, GenerateRequest
from kvcake.api.protocol import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS
from kvcake.api.server import ApiServer

__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "ApiServer",
    "Backend",
    "GenerateChunk",
    "GenerateRequest",
    "build_app",
]
