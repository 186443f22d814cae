"""The simulator: the same policies and eviction code as the live system, replayed on traces.

Today: the global pool alone (:mod:`kvcake.sim.cache`, ``kvcake sim cache``).
"""

from kvcake.sim.cache import CacheReplay, PoolCache, replay_pool

__all__ = ["CacheReplay", "PoolCache", "replay_pool"]
