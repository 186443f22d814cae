"""Where the master of a highly available store is found, by masters and clients alike: the
etcd keys under one cluster's prefix, and the record the leader keeps there under its lease
(:mod:`kvcake.store.master.ha` elects and persists; :mod:`kvcake.store.master.journal` says
what the other keys hold)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from kvcake.common import codec
from kvcake.common.etcd import guarded, parse_etcd

DEFAULT_PREFIX = "/kvcake/store/"


@dataclass(frozen=True)
class Layout:
    """etcd key names under one cluster's prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def leader(self) -> str:
        return self.prefix + "leader"

    @property
    def objects(self) -> str:
        return self.prefix + "objects/"

    @property
    def segments(self) -> str:
        return self.prefix + "segments/"

    def object_key(self, key: str) -> str:
        return self.objects + key

    def segment_key(self, segment_id: int) -> str:
        return f"{self.segments}{segment_id}"


class LeaderRecord(msgspec.Struct, frozen=True):
    uid: str  # one master process's term as leader
    endpoint: str  # its RPC listener
    metrics_endpoint: str = ""


def split_etcd_url(spec: str) -> tuple[str, Layout]:
    """``etcd://HOST:PORT[/PREFIX/]`` -> (``HOST:PORT``, layout of that prefix)."""
    address, slash, path = spec.removeprefix("etcd://").partition("/")
    host, port = parse_etcd(address)
    prefix = f"/{path.strip('/')}/" if slash and path.strip("/") else Layout().prefix
    return f"{host}:{port}", Layout(prefix)


def find_leader(client: Any, layout: Layout) -> LeaderRecord | None:
    """The current leader's record, or ``None`` while there is none (or it is not serving
    yet)."""
    value, _ = guarded(lambda: client.get(layout.leader))
    if value is None:
        return None
    record = codec.decode(value, LeaderRecord)
    return record if record.endpoint else None
