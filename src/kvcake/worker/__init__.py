"""Inference instances under the Conductor: prefill, decode or colocated (``both``).
:class:`WorkerServer` (torch) loads on first use, never with the torch-free ``config``."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcake.worker.server import WorkerServer

__all__ = ["WorkerServer"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'kvcake.worker' has no attribute {name!r}")
    return getattr(import_module("kvcake.worker.server"), name)
