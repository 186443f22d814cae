"""A storage node: the memory (and disk) one process contributes to the pool.

The master sends its disk-tier tasks (offload, promote, drop) to the node's control
endpoint; :class:`DiskTier` copies between the node's segment and files.
"""

from kvcake.store.node.disk import DiskTier

__all__ = ["DiskTier"]
