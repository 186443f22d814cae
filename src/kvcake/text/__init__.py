"""Text around token ids, torch-free, shared by the Conductor and the engine: the model's
tokenizer and chat template (:mod:`~kvcake.text.tokenizer`), and incremental detokenizing
with stop strings held back while they may still match (:mod:`~kvcake.text.detokenize`)."""

from __future__ import annotations

from kvcake.text.detokenize import OutputProcessor, TextDelta, find_stop, partial_stop_len
from kvcake.text.tokenizer import IncrementalDetokenizer, Tokenizer, byte_alphabet, byte_level_bpe

__all__ = [
    "IncrementalDetokenizer",
    "OutputProcessor",
    "TextDelta",
    "Tokenizer",
    "byte_alphabet",
    "byte_level_bpe",
    "find_stop",
    "partial_stop_len",
]
