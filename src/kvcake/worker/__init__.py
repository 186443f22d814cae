"""Inference instances under the Conductor: prefill, decode or colocated (``both``)."""

from kvcake.worker.server import WorkerServer

__all__ = ["WorkerServer"]
