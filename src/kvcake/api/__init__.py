"""The OpenAI-compatible HTTP front end (completions, chat, streaming, log-probabilities,
/tokenize, /detokenize, /health, /metrics).

It works against any :class:`Backend` (the Conductor in production): ``build_app(backend)``
gives the ASGI app and :class:`ApiServer` serves it from the running event loop.
"""

from kvcake.api.app import DEFAULT_MAX_BODY_BYTES, build_app
from kvcake.api.backend import Backend
from kvcake.api.protocol import DEFAULT_COMPLETION_MAX_TOKENS
from kvcake.api.server import ApiServer

__all__ = [
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "DEFAULT_MAX_BODY_BYTES",
    "ApiServer",
    "Backend",
    "build_app",
]
