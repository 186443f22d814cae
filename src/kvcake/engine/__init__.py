"""The inference engine (needs torch) of one serving instance (prefill, decode or both): core,
scheduler, runner and sampler here; the model math in ``model/``, the paged KV cache in ``kv/``."""

from kvcake.engine.core import EngineCore
from kvcake.engine.llm import LLM, CompletionOutput, GenerationResult
from kvcake.wire.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineCore", "GenerationResult", "SamplingParams"]
