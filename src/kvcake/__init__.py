"""kvcake: KVCache-centric disaggregated LLM serving (a Python Mooncake)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_ENGINE_NAMES = ("LLM", "SamplingParams")


def __getattr__(name: str) -> Any:
    # the engine needs torch; importing kvcake alone (store, transfer) must not
    if name in _ENGINE_NAMES:
        import kvcake.engine

        return getattr(kvcake.engine, name)
    raise AttributeError(f"module 'kvcake' has no attribute {name!r}")
