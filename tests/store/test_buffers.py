"""Registered caller buffers: views lie inside one registered buffer, are its own bytes,
and end with its registration."""

from __future__ import annotations

import ctypes

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.store.compat.buffers import BufferRegistry


def test_views_are_the_registered_bytes_and_end_with_the_registration() -> None:
    first, second = ctypes.create_string_buffer(4096), ctypes.create_string_buffer(1024)
    a, b = ctypes.addressof(first), ctypes.addressof(second)
    registry = BufferRegistry()
    registry.register(a, 4096)
    registry.register(b, 1024)
    view = registry.view(a + 100, 8)
    view[:] = b"12345678"
    assert first.raw[100:108] == b"12345678"
    assert bytes(registry.view(b, 1024)) == second.raw  # each buffer its own view
    assert registry.capacity(a + 4000) == 96
    with pytest.raises(InvalidParamsError, match="not inside a registered buffer"):
        registry.view(a + 4000, 97)  # past its end
    registry.unregister(a)
    assert registry.capacity(a + 100) == 0
    with pytest.raises(InvalidParamsError, match="not inside a registered buffer"):
        registry.view(a + 100, 8)
    assert bytes(registry.view(b + 1, 3)) == second.raw[1:4]
