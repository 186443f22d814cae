"""The inference engine (needs torch): model math and weights, paged KV cache, model runner
and scheduler of one serving instance (prefill, decode or both), and its store connector."""

from kvcake.engine.core import EngineCore
from kvcake.engine.llm import LLM, CompletionOutput, GenerationResult
from kvcake.wire.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineCore", "GenerationResult", "SamplingParams"]
