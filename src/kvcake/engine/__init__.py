"""The inference engine: model files and weights, tokenizer, paged KV cache, model runner and
scheduler of one serving instance (prefill, decode or both), and its store connector."""

from kvcake.engine.core import EngineCore, RequestOutput
from kvcake.engine.llm import LLM, CompletionOutput, GenerationResult
from kvcake.engine.output import OutputProcessor, TextDelta
from kvcake.engine.sampling import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineCore",
    "GenerationResult",
    "OutputProcessor",
    "RequestOutput",
    "SamplingParams",
    "TextDelta",
]
