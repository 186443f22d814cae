"""Mooncake's ``mooncake.buffer_pool`` names, served by kvcake: see
:mod:`kvcake.store.compat.buffer_pool`."""

from kvcake.store.compat import BufferPool, RegisteredBufferPool

__all__ = ["BufferPool", "RegisteredBufferPool"]
