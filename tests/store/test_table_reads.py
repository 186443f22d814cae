"""Same-host reads through the master's location table: a real master and node (child
processes) and Mooncake-API clients in this process. Gets and ``is_exist`` are answered
without the master, and never with bytes that are no longer the key's value."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from waiting import answered_within, stopped, wait_for

from kvcake.common.blocking_rpc import BlockingRpcClient
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import DistributedStore, table_reads
from kvcake.store.blocking import BlockingDriver

LEASE_S = "0.5"


def _cluster(servers: list[ServerProcess], *master_args: str) -> str:
    master, endpoint = start_master("--client-ttl", "30", "--lease-ttl", LEASE_S, *master_args)
    servers.append(master)
    servers.append(start_node(endpoint, "32MiB"))
    return endpoint


def test_gets_and_exist_checks_are_answered_while_the_master_is_stopped(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers)
    writer, reader = clients(endpoint), clients(endpoint)
    value = bytes(range(256)) * 256
    assert writer.put("k", value) == 0 and writer.put("j", b"j" * 100) == 0
    target = (ctypes.c_ubyte * len(value))()
    assert reader.register_buffer(ctypes.addressof(target), len(value)) == 0
    assert reader.get("k") == value  # reaches the node's segment once, through the master
    with stopped(servers[0]):
        assert answered_within(lambda: reader.get("k"), 5.0) == value
        assert answered_within(lambda: reader.batch_is_exist(["k", "j"]), 5.0) == [1, 1]
        assert answered_within(lambda: reader.get_into("k", ctypes.addressof(target),
                                                        len(value)), 5.0) == len(value)
        assert bytes(target) == value
    assert reader.get("absent") == b"" and reader.is_exist("absent") == 0  # asked


def test_a_read_from_the_table_leases_the_key_as_a_get_through_the_master_does(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    store = clients(_cluster(servers))
    assert store.put("k", b"v" * 1000) == 0 and store.put("e", b"e") == 0
    assert store.get("k") == b"v" * 1000 and store.is_exist("e") == 1
    assert store.remove("k") == ErrorCode.OBJECT_HAS_LEASE
    assert store.remove("e") == ErrorCode.OBJECT_HAS_LEASE


def test_removed_and_replaced_values_are_never_read_from_the_table(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers)
    writer, reader = clients(endpoint), clients(endpoint)
    for round_ in range(30):
        key, first, second = f"k{round_}", b"1" * (4096 + round_), b"2" * (8192 + round_)
        assert writer.put(key, first) == 0
        assert reader.get(key) == first
        assert writer.upsert(key, second) == 0
        assert reader.get(key) == second  # the old slot was dropped with the old value
        assert writer.remove(key, force=True) == 0
        assert reader.get(key) == b"" and reader.is_exist(key) == 0


def test_a_tenant_finds_only_its_own_keys(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers)
    acme, other = clients(endpoint, tenant_id="acme"), clients(endpoint)
    assert acme.put("shared-name", b"acme's") == 0
    assert other.put("shared-name", b"default's") == 0
    assert acme.get("shared-name") == b"acme's" and other.get("shared-name") == b"default's"
    assert acme.put("acme-only", b"x") == 0 and acme.is_exist("acme-only") == 1
    assert other.is_exist("acme-only") == 0 and other.get("acme-only") == b""


def test_after_a_master_restart_the_old_table_is_not_read(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The new master forgot every object; the old master's table still names the bytes,
    which are still in the node's segment, but it is dead and no longer trusted."""
    endpoint = _cluster(servers)
    monkeypatch.setenv("KVCAKE_STORE_HEARTBEAT_S", "60")  # the call itself must notice
    store = clients(endpoint)
    assert store.put("k", b"old" * 1000) == 0 and store.get("k") == b"old" * 1000
    servers[0].kill()
    servers[0] = start_master("--client-ttl", "30", "--port", endpoint.rsplit(":", 1)[1])[0]
    assert store.get("k") == b"" and store.is_exist("k") == 0
    wait_for(lambda: store.stats().num_segments == 1)  # the node remounted by itself
    assert store.put("k", b"new") == 0 and store.get("k") == b"new"


def test_a_master_that_publishes_nothing_is_asked_every_time(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers, "--location-slots", "0", "--lease-ttl", "5")
    store = clients(endpoint)
    assert store.put("k", b"v") == 0 and store.get("k") == b"v"
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(store.get("k")))
    with stopped(servers[0]):
        thread.start()
        thread.join(1.0)
        assert not got  # waits for the stopped master
    thread.join(30)
    assert got == [b"v"]


def test_a_read_whose_touch_cannot_be_sent_still_answers(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes were checked already; only the lease is lost, and the call does not wait
    on the master to find that out."""
    store = clients(_cluster(servers))
    assert store.put("k", b"v" * 100) == 0 and store.get("absent") == b""

    def unsendable(*_: object) -> None:
        raise KvcakeError("connection refused", ErrorCode.RPC_FAIL)

    monkeypatch.setattr(BlockingRpcClient, "send", unsendable)
    with stopped(servers[0]):  # nor does it ask instead
        assert answered_within(lambda: store.get("k"), 5.0) == b"v" * 100
        assert answered_within(lambda: store.is_exist("k"), 5.0) == 1


def test_a_single_get_into_is_a_lookup_and_a_copy_here_between_lease_renewals(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the key's lease was renewed for this client, ``get_into`` runs no plan: it
    finds the key in the table and copies (a too-small buffer answers as through the
    master). When half the lease has passed, the next read goes through the plan again,
    which tells the master of it. The table's clock stands still but when moved here."""
    store = clients(_cluster(servers))
    value = bytes(range(256)) * 64
    target = (ctypes.c_ubyte * len(value))()
    address = ctypes.addressof(target)
    assert store.register_buffer(address, len(value)) == 0
    assert store.put("k", value) == 0 and store.get("absent") == b""  # segments reached
    now = [1000.0]
    monkeypatch.setattr(table_reads, "time", SimpleNamespace(monotonic=lambda: now[0]))
    plans: list[object] = []
    run = BlockingDriver.run
    monkeypatch.setattr(BlockingDriver, "run",
                        lambda driver, plan: plans.append(plan) or run(driver, plan))
    assert store.get_into("k", address, len(value)) == len(value)  # due: through a plan
    assert len(plans) == 1
    with stopped(servers[0]):
        ctypes.memset(target, 0, len(value))
        assert answered_within(lambda: store.get_into("k", address, len(value)),
                               5.0) == len(value)
        assert bytes(target) == value
        assert answered_within(lambda: store.get_into("k", address, 100),
                               5.0) == ErrorCode.INVALID_PARAMS
        assert len(plans) == 1
    now[0] += float(LEASE_S) / 2 + 0.01  # past half the lease: due again
    assert store.get_into("k", address, len(value)) == len(value) and len(plans) == 2
    assert store.get_into("k", address, len(value)) == len(value) and len(plans) == 2
