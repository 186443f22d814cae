"""A storage node: the memory (and disk) one process contributes to the pool.

::

    readers, writers <--- transfer engine ---> segment (registered memory)
    master --- offload / promote / drop ---> control server --> DiskTier <--> DIR/*.kv

``server.py`` starts and stops the three (``kvcake node``, or any client with a segment);
``disk.py`` copies between the segment and files.
"""

from kvcake.store.node.disk import DiskTier
from kvcake.store.node.server import NodeServer, run_node

__all__ = ["DiskTier", "NodeServer", "run_node"]
