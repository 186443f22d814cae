"""Metadata directories: where a peer learns a segment's descriptor.

=============  ==============================================================================
``local``      a dict in this process (engines that share a process, and tests)
``p2p``        handshake: the name ``HOST:PORT/SEGMENT`` says which server to ask
``etcd://…``   a cluster's etcd; descriptors live under a lease, so a dead owner's vanish
=============  ==============================================================================
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from kvcake.common import codec
from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.blocking_rpc import BlockingRpcClient
from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    MetadataError,
    SegmentNotFoundError,
)
from kvcake.common.etcd import etcd_client, guarded
from kvcake.common.log import get_logger
from kvcake.transfer.messages import DescribeReply, DescribeRequest
from kvcake.transfer.segment import SegmentDescriptor

log = get_logger(__name__)

ETCD_PREFIX = "/kvcake/transfer/segments/"


class MetadataDirectory(Protocol):
    """Publishes this process's segments and finds other processes' segments.

    ``lookup`` raises :class:`SegmentNotFoundError` for an unknown name and
    :class:`MetadataError` when the directory itself cannot be reached.
    """

    def publish(self, descriptor: SegmentDescriptor) -> None: ...

    def unpublish(self, name: str) -> None: ...

    def lookup(self, name: str) -> SegmentDescriptor: ...

    def close(self) -> None: ...


class LocalDirectory:
    """An in-process directory; share one instance between engines of a process."""

    def __init__(self) -> None:
        self._descriptors: dict[str, SegmentDescriptor] = {}

    def publish(self, descriptor: SegmentDescriptor) -> None:
        self._descriptors[descriptor.name] = descriptor

    def unpublish(self, name: str) -> None:
        self._descriptors.pop(name, None)

    def lookup(self, name: str) -> SegmentDescriptor:
        try:
            return self._descriptors[name]
        except KeyError:
            raise SegmentNotFoundError(f"segment {name!r} is not published") from None

    def close(self) -> None:
        self._descriptors.clear()


def split_p2p_name(name: str) -> tuple[str, int, str]:
    """``"127.0.0.1:7000/kv0"`` -> ``("127.0.0.1", 7000, "kv0")``."""
    endpoint, slash, segment = name.partition("/")
    host, colon, port = endpoint.rpartition(":")
    if not (slash and colon and host and segment and port.isdigit()):
        raise InvalidParamsError(f"p2p segment names look like HOST:PORT/SEGMENT, got {name!r}")
    return host, int(port), segment


class P2PDirectory:
    """No directory service: ask the owner's transfer server (Mooncake's P2P handshake),
    authenticating first when ``auth`` holds a cluster token."""

    def __init__(self, timeout_s: float, auth: ClusterAuth = NO_AUTH) -> None:
        self._timeout_s = timeout_s
        self._auth = auth

    def publish(self, descriptor: SegmentDescriptor) -> None:
        """Nothing to do: the owner's server answers for its segments."""

    def unpublish(self, name: str) -> None:
        """Nothing to do."""

    def lookup(self, name: str) -> SegmentDescriptor:
        host, port, segment = split_p2p_name(name)
        client = BlockingRpcClient(f"{host}:{port}", self._timeout_s, self._auth)
        try:
            reply = client.call(codec.encode(DescribeRequest([segment])))
        except KvcakeError as exc:
            if exc.code is not ErrorCode.RPC_FAIL:
                raise
            raise MetadataError(f"handshake with {host}:{port} failed: {exc}") from exc
        finally:
            client.close()
        (descriptor,) = codec.decode(reply, DescribeReply).segments
        return descriptor

    def close(self) -> None:
        pass


class EtcdDirectory:
    """Descriptors in etcd under ``/kvcake/transfer/segments/NAME``, kept alive by a lease."""

    def __init__(self, url: str, ttl_s: int = 10) -> None:
        self._client: Any = etcd_client(url)
        self._ttl_s = ttl_s
        self._lease: Any = None
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    def publish(self, descriptor: SegmentDescriptor) -> None:
        guarded(
            lambda: self._client.put(
                ETCD_PREFIX + descriptor.name, codec.encode(descriptor), lease=self._ensure_lease()
            )
        )

    def unpublish(self, name: str) -> None:
        guarded(lambda: self._client.delete(ETCD_PREFIX + name))

    def lookup(self, name: str) -> SegmentDescriptor:
        value, _ = guarded(lambda: self._client.get(ETCD_PREFIX + name))
        if value is None:
            raise SegmentNotFoundError(f"segment {name!r} is not published in etcd")
        return codec.decode(value, SegmentDescriptor)

    def _ensure_lease(self) -> Any:
        if self._lease is None:
            self._lease = self._client.lease(self._ttl_s)
            self._keepalive = threading.Thread(
                target=self._refresh, name="kvcake-etcd-lease", daemon=True
            )
            self._keepalive.start()
        return self._lease

    def _refresh(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            try:
                self._lease.refresh()
            except Exception as exc:  # etcd may come back before the TTL runs out
                log.warning("etcd lease refresh failed, retrying: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._keepalive is not None:
            self._keepalive.join()
        if self._lease is not None:
            try:
                guarded(self._lease.revoke)
            except MetadataError as exc:  # the TTL removes the descriptors anyway
                log.warning("could not revoke the etcd lease: %s", exc)
        self._client.close()


def make_directory(spec: str, timeout_s: float, auth: ClusterAuth = NO_AUTH
                   ) -> MetadataDirectory:
    """The directory named by ``TransferConfig.metadata``."""
    if spec == "local":
        return LocalDirectory()
    if spec == "p2p":
        return P2PDirectory(timeout_s, auth)
    if spec.startswith("etcd://"):
        return EtcdDirectory(spec)
    raise InvalidParamsError(f"unknown metadata directory {spec!r}")
