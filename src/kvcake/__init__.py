"""kvcake: KVCache-centric disaggregated LLM serving (a Python Mooncake)."""

__version__ = "0.1.0"
