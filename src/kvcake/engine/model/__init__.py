"""The model math in PyTorch: a Llama-family decoder over paged K/V, its parts and weights.

::

    load_weights (weights) --> LlamaModel (llama): embed -> layers -> norm -> LM head
                                 each layer: RoPE (rope) -> attention over paged K/V (attention)
    logits --> prompt-token scores (logprobs)

Torch-free model records (config, files, GGUF conversion) live in :mod:`kvcake.model`.
"""
