"""The master's HTTP port in a real store: a master process, two nodes and clients putting
keys, asked over HTTP what Mooncake integrations poll (/query_key, /batch_query_keys,
/get_all_keys, /get_all_segments, /health, /metrics/summary); and an HA standby that says
it does not serve, then serves on the same port once it leads."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvcake.common import codec
from kvcake.common.http import JSON, TEXT
from kvcake.common.lifespan import read_ready_file
from kvcake.common.rpc import RpcClient
from kvcake.common.sockets import free_port
from kvcake.ops import (
    ReadyFile,
    ServerProcess,
    health,
    kvcake_command,
    start_etcd,
    start_master,
    start_node,
)
from kvcake.store import AsyncStore, DistributedStore, ReplicateConfig
from kvcake.store.config import StoreConfig
from kvcake.wire import store as m

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
DEFAULT_KEYS = ["a b,c/ü", "alpha", "two"]


@dataclass(frozen=True)
class Store:
    rpc: str
    http: str
    nodes: list[ServerProcess]
    client: DistributedStore


def get(http: str, target: str) -> tuple[int, str, str]:
    """Status, content type and body of ``GET http://{http}{target}``."""
    try:
        with DIRECT.open(f"http://{http}{target}", timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def get_json(http: str, target: str) -> tuple[int, Any]:
    status, content_type, body = get(http, target)
    assert content_type == JSON, (status, body)
    return status, json.loads(body)


def ask(endpoint: str, request: m.MasterRequest, reply_type: type[Any]) -> Any:
    async def call() -> Any:
        client = RpcClient(endpoint, 5.0)
        try:
            return codec.decode(await client.call(codec.encode(request)), reply_type)
        finally:
            client.close()
    return asyncio.run(call())


async def _put_as_tenant(master: str, tenant: str, key: str) -> None:
    store = AsyncStore(StoreConfig(master=master, tenant=tenant))
    await store.setup()
    try:
        await store.put(key, b"t" * 64)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    master, rpc = start_master("--summary-interval", "0")
    nodes: list[ServerProcess] = []
    client = DistributedStore()
    try:
        nodes += [start_node(rpc, "8MiB"), start_node(rpc, "8MiB")]
        assert client.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", rpc) == 0
        assert client.put("alpha", b"a" * 1000) == 0
        assert client.put("two", b"2" * 3000, ReplicateConfig(replica_num=2)) == 0
        assert client.put("a b,c/ü", b"odd" * 10) == 0
        asyncio.run(_put_as_tenant(rpc, "acme", "secret"))
        yield Store(rpc, master.endpoints["metrics"], nodes, client)
    finally:
        client.close()
        for process in [*reversed(nodes), master]:
            process.stop()


def test_health_is_json_and_ops_reads_it(store: Store) -> None:
    assert get_json(store.http, "/health") == (200, {"status": "ok", "role": "single",
                                                     "service_ready": True})
    assert health(f"http://{store.http}") == (200, {"status": "ok", "role": "single",
                                                    "service_ready": True})


def test_query_key_describes_the_replicas_the_rpc_hands_readers(store: Store) -> None:
    status, found = get_json(store.http, "/query_key?key=two")
    assert status == 200 and found["success"] is True
    found = sorted((d["buffer_address_"], d["transport_endpoint_"]) for d in found["data"]
                   if d.pop("size_") == 3000 and d.pop("protocol_") == "tcp")
    replicas = ask(store.rpc, m.GetReplicas(["two"]), m.GetReplicasReply).replicas[0]
    segments = ask(store.rpc, m.DescribeSegments([r.segment_id for r in replicas]),
                   m.DescribeSegmentsReply).descriptors
    assert found == sorted((r.offset, s.endpoint) for r, s in zip(replicas, segments,
                                                                   strict=True))
    assert {e for _, e in found} == {n.endpoints["transfer"] for n in store.nodes}


def test_query_key_decodes_the_key(store: Store) -> None:
    status, found = get_json(store.http, "/query_key?key=a%20b%2Cc%2F%C3%BC")
    assert status == 200 and [d["size_"] for d in found["data"]] == [30]


def test_absent_keys_and_other_tenants_keys_are_mooncakes_404(store: Store) -> None:
    for key in ("nope", "secret"):  # "secret" is tenant acme's: out of this port's reach
        assert get_json(store.http, f"/query_key?key={key}") == (
            404, {"success": False, "error_code": -704, "error_message": "OBJECT_NOT_FOUND"})


@pytest.mark.parametrize(("target", "words"), [
    ("/query_key", "missing query parameter 'key'"),
    ("/query_key?key=%zz", "malformed percent-escape"),
    ("/query_key?key=%ff%fe", "not UTF-8"),
    ("/query_key?key=%1Facme%2Fsecret", "INVALID_KEY"),
    ("/query_key?key=" + "k" * 10000, "longer than the 8192 allowed"),
    ("/batch_query_keys", "no keys given"),
    ("/batch_query_keys?keys=", "no keys given"),
    ("/batch_query_keys?keys=%g1", "malformed percent-escape"),
])
def test_bad_input_gets_a_clear_400(store: Store, target: str, words: str) -> None:
    status, found = get_json(store.http, target)
    assert status == 400 and found["success"] is False
    assert words in found.get("error_message", found.get("error", ""))


def test_an_absurdly_long_request_gets_a_400_and_the_port_still_serves(store: Store) -> None:
    status, _, body = get(store.http, "/query_key?key=" + "k" * 40000)
    assert status == 400 and "longer than" in body
    assert get(store.http, "/health")[0] == 200


def test_batch_query_keys(store: Store) -> None:
    status, found = get_json(store.http, "/batch_query_keys?keys=alpha,nope,a%20b%2Cc%2F%C3%BC")
    assert status == 200 and found["success"] is True
    data = found["data"]
    assert sorted(data) == ["a b", "alpha", "c/ü", "nope"]  # the comma, decoded, splits
    assert data["alpha"]["ok"] is True
    assert [d["size_"] for d in data["alpha"]["values"]] == [1000]
    assert data["nope"] == data["a b"] == {"ok": False, "error": "OBJECT_NOT_FOUND"}


def test_get_all_keys_lists_the_default_tenant_as_keys_come_and_go(store: Store) -> None:
    assert store.client.put("gone", b"g" * 10) == 0
    assert get(store.http, "/get_all_keys") == (
        200, TEXT, "".join(f"{k}\n" for k in sorted([*DEFAULT_KEYS, "gone"])))
    assert store.client.remove("gone") == 0
    assert get(store.http, "/get_all_keys")[2] == "".join(f"{k}\n" for k in DEFAULT_KEYS)


def test_get_all_segments_names_each_nodes_segment(store: Store) -> None:
    names = sorted(n.endpoints["segment"] for n in store.nodes)
    assert get(store.http, "/get_all_segments") == (200, TEXT, "".join(f"{n}\n" for n in names))


def test_metrics_summary_is_one_line_and_metrics_still_serve(store: Store) -> None:
    status, content_type, body = get(store.http, "/metrics/summary")
    assert (status, content_type) == (200, TEXT)
    assert body.startswith("role=single keys=4 ") and body.count("\n") == 1  # acme's too
    status, content_type, body = get(store.http, "/metrics")
    assert (status, content_type) == (200, TEXT) and "kvcake_store_segments 2\n" in body


@pytest.mark.etcd
@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd server binary")
def test_a_standby_says_so_then_serves_on_the_same_port_once_it_leads(tmp_path: Path) -> None:
    etcd, endpoint = start_etcd(tmp_path / "etcd")
    url = f"etcd://{endpoint}/test-{random.getrandbits(32):x}/"
    started = [etcd]

    def master(metrics_port: int, ready: ReadyFile) -> ServerProcess:
        process = ServerProcess(kvcake_command(
            "master", "--port", "0", "--metrics-port", str(metrics_port), "--etcd", url,
            "--leader-ttl", "2", "--summary-interval", "0"), ready, name="kvcake master")
        started.append(process)
        return process

    try:
        leader = master(0, ReadyFile(want="rpc"))
        port = free_port()
        standby_ready = tmp_path / "standby.ready"
        master(port, ReadyFile(str(standby_ready), want="metrics"))
        standby = f"127.0.0.1:{port}"
        status, found = get_json(standby, "/health")
        assert (status, found["status"], found["role"], found["service_ready"]) == (
            503, "unavailable", "standby", False)
        assert get_json(standby, "/query_key?key=k")[1]["error_code"] == -1011
        assert get(standby, "/metrics/summary") == (200, TEXT, "role=standby\n")
        assert get_json(leader.endpoints["metrics"], "/health")[1]["role"] == "leader"
        leader.stop()  # it resigns: the standby takes over at once
        _wait_for(lambda: "rpc" in (read_ready_file(standby_ready) or {}))
        assert get_json(standby, "/health") == (200, {"status": "ok", "role": "leader",
                                                      "service_ready": True})
    finally:
        for process in reversed(started):
            process.stop()


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
