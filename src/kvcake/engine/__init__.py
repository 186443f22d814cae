"""The inference engine (needs torch) of one serving instance (prefill, decode or both): core,
scheduler, runner and sampler here; the model math in ``model/``, the paged KV cache in ``kv/``.
Torch loads with the first of these names used, never with the torch-free ``config``."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcake.engine.core import EngineCore
    from kvcake.engine.llm import LLM, CompletionOutput, GenerationResult
    from kvcake.wire.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineCore", "GenerationResult", "SamplingParams"]
_HOMES = {"EngineCore": "kvcake.engine.core", "SamplingParams": "kvcake.wire.sampling"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'kvcake.engine' has no attribute {name!r}")
    return getattr(import_module(_HOMES.get(name, "kvcake.engine.llm")), name)
