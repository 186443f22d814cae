"""etcd for kvcake: a client that speaks in kvcake errors (a local server to test against is
:mod:`kvcake.ops.etcd`).

The Python client (``pyetcd``, the optional ``etcd`` extra) is synchronous gRPC; callers on
an event loop run it in a thread. Every failure to reach etcd becomes :class:`MetadataError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from kvcake.common.errors import InvalidParamsError, KvcakeError, MetadataError

T = TypeVar("T")


def parse_etcd(spec: str) -> tuple[str, int]:
    """``etcd://HOST:PORT`` or ``HOST:PORT`` (port 2379 if absent) -> ``(host, port)``."""
    host, _, port = spec.removeprefix("etcd://").partition(":")
    if not host or (port and not port.isdigit()):
        raise InvalidParamsError(f"etcd address must be HOST:PORT, got {spec!r}")
    return host, int(port or 2379)


def etcd_client(spec: str, timeout_s: float = 5.0) -> Any:
    import pyetcd  # the optional ``etcd`` extra

    host, port = parse_etcd(spec)
    return pyetcd.client(host=host, port=port, timeout=timeout_s)


def guarded(action: Callable[[], T]) -> T:
    """Run one etcd call; its grpc and client errors become :class:`MetadataError`."""
    try:
        return action()
    except KvcakeError:
        raise
    except Exception as exc:  # the etcd client raises grpc and its own errors
        raise MetadataError(f"etcd: {type(exc).__name__}: {exc}") from exc


PAGE_KEYS = 2000  # keys per read: one response must stay under gRPC's 4 MiB message limit


def read_prefix(client: Any, prefix: str, page_keys: int = PAGE_KEYS) -> list[tuple[bytes, Any]]:
    """Every ``(value, metadata)`` under ``prefix``, as ``client.get_prefix`` gives them, in
    key order, read in pages of ``page_keys`` keys, all at the first page's revision (one
    read of 25,000 journal records failed on gRPC's message limit)."""
    from pyetcd.client import KVMetadata
    from pyetcd.utils import prefix_range_end

    start, end = prefix.encode(), prefix_range_end(prefix.encode())
    rows: list[tuple[bytes, Any]] = []
    revision = None
    while True:
        reply = guarded(functools.partial(client.get_range_response, start, end,
                                          limit=page_keys, revision=revision))
        revision = reply.header.revision
        rows += [(kv.value, KVMetadata(kv, reply.header)) for kv in reply.kvs]
        if not reply.more or not reply.kvs:
            return rows
        start = reply.kvs[-1].key + b"\0"
