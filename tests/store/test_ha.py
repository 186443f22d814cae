"""Masters with a real etcd: leader election, failover with the state restored, clients and
nodes that follow the leader, and a deposed leader that cannot write."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.etcd import etcd_client
from kvcake.common.rpc import RpcClient
from kvcake.ops import ServerProcess, kvcake_command, start_etcd, start_node
from kvcake.store import DistributedStore, ReplicateConfig
from kvcake.store.leader import Layout, find_leader, split_etcd_url
from kvcake.store.master.ha import LeaderElection, LeadershipLostError
from kvcake.store.session import LeaderFinder
from kvcake.wire import store as m

T = TypeVar("T")

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd server binary"),
]


@pytest.fixture
def etcd_process(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    process, endpoint = start_etcd(tmp_path / "etcd")
    yield process, f"etcd://{endpoint}/test-{random.getrandbits(32):x}/"
    if process.alive():
        os.kill(process.pid, signal.SIGCONT)
    process.stop()


@pytest.fixture
def etcd(etcd_process: tuple[ServerProcess, str]) -> str:
    return etcd_process[1]


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


def start_master(url: str, started: list[ServerProcess]) -> ServerProcess:
    process = ServerProcess(kvcake_command(
        "master", "--port", "0", "--metrics-port", "-1", "--etcd", url, "--leader-ttl", "2",
        "--client-ttl", "6", "--put-fence", "0.5", "--summary-interval", "0"),
        r"standby", name="kvcake master")
    started.append(process)
    return process


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def leading(process: ServerProcess) -> bool:
    return "as leader" in process.output()


def leader_endpoint(url: str) -> str:
    address, layout = split_etcd_url(url)
    client = etcd_client(address)
    try:
        record = find_leader(client, layout)
    finally:
        client.close()
    assert record is not None
    return record.endpoint


def ask(endpoint: str, request: m.MasterRequest, reply_type: type[T]) -> T:
    async def call() -> T:
        client = RpcClient(endpoint, 5.0)
        try:
            return codec.decode(await client.call(codec.encode(request)), reply_type)
        finally:
            client.close()
    return asyncio.run(call())


def stats(url: str) -> m.Stats:
    return ask(leader_endpoint(url), m.GetStats(), m.Stats)


def cluster(url: str, processes: list[ServerProcess]) -> tuple[ServerProcess, ServerProcess]:
    """Two masters (the first leads) and two 32 MiB nodes, all given only etcd."""
    first = start_master(url, processes)
    wait_for(lambda: leading(first))
    second = start_master(url, processes)
    processes.extend(start_node(url, "32MiB") for _ in range(2))
    return first, second


def client(url: str) -> DistributedStore:
    store = DistributedStore()
    assert store.setup("127.0.0.1", "p2p", 0, 64 << 20, "tcp", "", url) == 0
    return store


@pytest.mark.parametrize("token", ["", "a-cluster-token-" + "7" * 32], ids=["open", "token"])
def test_kill_9_of_the_leader_loses_no_acknowledged_object(
        etcd: str, processes: list[ServerProcess], token: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # with a token, the new leader signs grants with the keys the nodes send when remounting
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", token)
    first, second = cluster(etcd, processes)
    assert not leading(second)
    rng = random.Random(3)
    values = {f"obj-{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(40)}
    store = client(etcd)
    try:
        for i, (key, value) in enumerate(values.items()):
            config = ReplicateConfig(replica_num=2) if i % 2 else ReplicateConfig()
            assert store.put(key, value, config) == 0
        assert store.remove("obj-0") == 0
        del values["obj-0"]

        first.kill()
        wait_for(lambda: leading(second))
        assert "39 objects on 2 segments restored" in second.output()
        for key, value in values.items():  # the client follows the new leader by itself
            assert store.get(key) == value, key
        assert store.is_exist("obj-0") == 0  # a removal stays removed
        assert store.put("after", b"new leader" * 1000) == 0
        assert store.get("after") == b"new leader" * 1000
        assert store.put("obj-1", b"other bytes") == 0  # still insert-if-absent
        assert store.get("obj-1") == values["obj-1"]
        # both nodes rejoined the new leader with their segments
        wait_for(lambda: stats(etcd).num_clients >= 3)
        assert stats(etcd).num_segments == 2
        assert stats(etcd).num_keys == 40
        reply = ask(leader_endpoint(etcd), m.CheckIntegrity(), m.IntegrityReply)
        assert reply == m.IntegrityReply(True)
        # a master with a journal answers PutEnd once durable, so it lets no put skip that
        assert store.native.session is not None
        started = ask(leader_endpoint(etcd), m.PutStart(
            store.native.session.client_id, ["probe"], [64], pipeline_end=True),
            m.PutStartReply)
        assert started.codes == [0] and not started.pipeline_end
        # nor does it publish a location table: a deposed leader would go on answering
        assert store.native.session.locations == ""
    finally:
        store.close()


def test_a_stopped_leader_resigns_and_the_standby_leads_at_once(
        etcd: str, processes: list[ServerProcess]) -> None:
    first, second = cluster(etcd, processes)
    store = client(etcd)
    try:
        assert store.put("kept", b"x" * 5000) == 0
        first.stop()  # SIGTERM: the lease is revoked, no TTL to wait out
        wait_for(lambda: leading(second), timeout_s=5.0)
        assert store.get("kept") == b"x" * 5000
        third = start_master(etcd, processes)  # a new standby joins the campaign
        assert not leading(third)
        second.stop()
        wait_for(lambda: leading(third), timeout_s=5.0)
        assert store.get("kept") == b"x" * 5000
    finally:
        store.close()


def test_a_deposed_leader_cannot_write(etcd: str) -> None:
    address, layout = split_etcd_url(etcd)
    client_a, client_b = etcd_client(address), etcd_client(address)
    try:
        a = LeaderElection(client_a, layout, ttl_s=2)
        b = LeaderElection(client_b, layout, ttl_s=2)
        assert a.try_win()
        assert not b.try_win()
        a.publish("127.0.0.1:1", "")
        a.commit([(layout.object_key("k"), b"v")])
        client_b.revoke_lease(a._lease.id)  # as if a's lease had lapsed
        assert b.try_win()
        b.publish("127.0.0.1:2", "")
        with pytest.raises(LeadershipLostError, match="another master leads"):
            a.commit([(layout.object_key("k"), b"stale")])
        with pytest.raises(LeadershipLostError, match="expired"):
            a.refresh()
        assert client_b.get(layout.object_key("k"))[0] == b"v"
        record = find_leader(client_b, layout)
        assert record is not None and record.endpoint == "127.0.0.1:2"
    finally:
        client_a.close()
        client_b.close()


def test_no_leader_is_a_clear_error_after_the_wait(etcd: str) -> None:
    finder = LeaderFinder(etcd, timeout_s=0.5)
    try:
        with pytest.raises(KvcakeError, match="no store master leads") as caught:
            asyncio.run(finder.leader())
        assert caught.value.code is ErrorCode.RPC_FAIL
    finally:
        finder.close()


def test_etcd_urls_name_a_prefix() -> None:
    assert split_etcd_url("etcd://127.0.0.1:2379") == ("127.0.0.1:2379", Layout())
    assert split_etcd_url("etcd://h:1/a/b") == ("h:1", Layout("/a/b/"))
    assert split_etcd_url("h") == ("h:2379", Layout())


def test_a_leader_cut_off_from_etcd_stops_serving_then_the_cluster_recovers(
        etcd_process: tuple[ServerProcess, str], processes: list[ServerProcess]) -> None:
    etcd_server, url = etcd_process
    cluster(url, processes)
    endpoint = leader_endpoint(url)
    store = client(url)
    try:
        assert store.put("before", b"b" * 4096) == 0
        os.kill(etcd_server.pid, signal.SIGSTOP)  # the leader can no longer renew its term
        try:
            def refuses() -> bool:
                try:
                    ask(endpoint, m.GetStats(), m.Stats)
                except KvcakeError as exc:
                    return "not confirmed" in str(exc)
                return False
            wait_for(refuses, timeout_s=10.0)  # within the lease: no second leader yet
        finally:
            os.kill(etcd_server.pid, signal.SIGCONT)
        # etcd back: the same master renews its term, or a new leader restores the state
        assert store.get("before") == b"b" * 4096
        assert store.put("after", b"a" * 4096) == 0
        assert store.get("after") == b"a" * 4096
    finally:
        store.close()
