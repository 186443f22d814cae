"""kvcake under vLLM: the store as vLLM's KV cache pool.

:mod:`kvcake.vllm.connector` is the KV connector vLLM loads (it imports vLLM and torch, so
only a vLLM process imports it: ``kv_connector_module_path``); :mod:`kvcake.vllm.plan` is its
scheduler-side bookkeeping without vLLM, and :mod:`kvcake.vllm.config` its settings.
"""
