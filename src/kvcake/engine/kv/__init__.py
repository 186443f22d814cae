"""The paged KV cache: which block holds what, and how blocks leave and enter the cache.

::

    Scheduler --> KVCacheManager (manager) --> BlockPool (block_pool): ref counts, LRU, prefix map
    blocks <--> store: StoreConnector (connector), records laid out by BlockLayout (format)
    blocks  --> decode peer: KVSender (transfer), writes inside grants from sign_kv_grants

Only the manager touches the pool; the K/V tensors themselves belong to the model runner.
"""

from kvcake.engine.kv.manager import KVCacheManager
from kvcake.engine.kv.transfer import KVSender, sign_kv_grants

__all__ = ["KVCacheManager", "KVSender", "sign_kv_grants"]
