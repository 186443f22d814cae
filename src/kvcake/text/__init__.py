"""Text around token ids, torch-free, shared by the Conductor and the engine: the model's
tokenizer and chat template (:mod:`~kvcake.text.tokenizer`), and incremental detokenizing
with stop strings held back while they may still match (:mod:`~kvcake.text.detokenize`)."""
