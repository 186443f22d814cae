"""Mooncake's ``BufferPool`` on kvcake: leases of registered memory against a real master —
size classes, reuse after release, exhaustion (raising, timing out, waiting), the views a
lease hands out, closing, and ``put_from`` / ``get_into`` through a lease."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master
from kvcake.store import DistributedStore
from kvcake.store.compat import BufferPool, BufferPoolError

KiB, MiB = 1 << 10, 1 << 20
LOCAL = 1 * MiB
SHIM = Path(__file__).resolve().parents[2] / "shims" / "mooncake"


@pytest.fixture(scope="module")
def master() -> Iterator[str]:
    process: ServerProcess
    process, endpoint = start_master("--summary-interval", "0")
    try:
        yield endpoint
    finally:
        process.stop()


@pytest.fixture
def store(master: str) -> Iterator[DistributedStore]:
    store = DistributedStore()
    assert store.setup("127.0.0.1", "p2p", 4 * MiB, LOCAL, "tcp", "", master) == 0
    try:
        yield store
    finally:
        store.close()


def small_pool(store: DistributedStore, **kwargs: object) -> BufferPool:
    return BufferPool(store, min_size_class=4 * KiB, alignment=4 * KiB, **kwargs)  # type: ignore[arg-type]


# ----- construction
def test_a_store_that_is_not_set_up_or_has_no_local_buffer_is_refused(master: str) -> None:
    with pytest.raises(RuntimeError, match="not initialized"):
        BufferPool(DistributedStore())
    store = DistributedStore()
    assert store.setup("127.0.0.1", "p2p", 0, 0, "tcp", "", master) == 0
    try:
        with pytest.raises(BufferPoolError, match="local buffer"):
            BufferPool(store)
    finally:
        store.close()


@pytest.mark.parametrize("alignment", [0, 4, 12345])
def test_an_alignment_that_is_no_power_of_two_of_a_pointer_is_refused(
        store: DistributedStore, alignment: int) -> None:
    with pytest.raises(RuntimeError, match="must be") as caught:
        BufferPool(store, alignment=alignment)
    assert isinstance(caught.value, BufferPoolError)
    assert caught.value.code is ErrorCode.INVALID_PARAMS


# ----- leases
def test_a_lease_is_registered_aligned_writable_and_sized_as_asked(
        store: DistributedStore) -> None:
    pool = BufferPool(store, min_size_class=4 * KiB, alignment=64 * KiB)
    with pool.acquire(1234) as lease:
        assert lease.size == 1234 and lease.ptr % (64 * KiB) == 0
        view = lease.buffer
        assert len(view) == 1234 and not view.readonly and bytes(view) == bytes(1234)
        view[:4] = b"abcd"
        assert ctypes.string_at(lease.ptr, 4) == b"abcd"
        assert store._buffers.capacity(lease.ptr) == 4 * KiB  # its size class, registered
        del view
    pool.close()


@pytest.mark.parametrize("size", [0, 1, 128 * KiB + 1])
def test_any_size_gets_a_lease_of_that_size(store: DistributedStore, size: int) -> None:
    pool = small_pool(store, max_bytes=LOCAL, max_size_class=128 * KiB)
    lease = pool.acquire(size)
    assert lease.size == size and len(lease.buffer) == size
    lease.release()
    pool.close()


def test_a_released_region_is_reused_by_its_size_class_and_oversize_ones_are_dropped(
        store: DistributedStore) -> None:
    pool = small_pool(store, max_size_class=64 * KiB)
    first = pool.acquire(3000)
    ptr = first.ptr
    first.release()
    assert store._buffers.capacity(ptr) == 4 * KiB  # kept idle, still registered
    first.release()  # a second release does nothing
    with pytest.raises(RuntimeError, match="closed"):
        _ = first.ptr
    again = pool.acquire(4096)  # same class (4 KiB): the same region
    assert again.ptr == ptr
    other = pool.acquire(5000)  # the 8 KiB class: another region
    assert other.ptr != ptr
    big = pool.acquire(64 * KiB + 1)
    big_ptr = big.ptr
    big.release()
    assert store._buffers.capacity(big_ptr) == 0  # oversize: unregistered on release
    for lease in (again, other):
        lease.release()
    pool.close()
    assert store._buffers.capacity(ptr) == 0  # close unregisters what it kept


def test_a_lease_holds_local_buffer_budget_while_it_is_out(store: DistributedStore) -> None:
    pool = small_pool(store)
    lease = pool.acquire(LOCAL)
    assert store.put("k-local", b"x") == int(ErrorCode.INVALID_PARAMS)  # no room left
    lease.release()
    assert store.put("k-local", b"x") == 0
    pool.close()


def test_a_live_view_keeps_its_lease_and_refuses_release(store: DistributedStore) -> None:
    pool = small_pool(store)
    lease = pool.acquire(4)
    part = lease.buffer[1:3]
    with pytest.raises(RuntimeError, match="exported views"):
        lease.release()
    del lease
    gc.collect()
    part[:] = b"ok"  # the view kept the lease (and its region) alive
    with pytest.raises(RuntimeError, match="active leases"):
        pool.close()
    del part
    gc.collect()
    pool.close()  # the dropped lease went back


def test_dropping_a_pool_unregisters_its_idle_regions(store: DistributedStore) -> None:
    pool = small_pool(store)
    lease = pool.acquire(1)
    ptr = lease.ptr
    del pool  # the lease still holds it
    gc.collect()
    assert store._buffers.capacity(ptr) == 4 * KiB
    lease.release()  # parked idle, and the pool's last reference goes
    gc.collect()
    assert store._buffers.capacity(ptr) == 0


# ----- exhaustion
def test_a_full_budget_raises_without_blocking_and_after_a_timeout(
        store: DistributedStore) -> None:
    pool = small_pool(store, max_bytes=2 * MiB, block_on_exhaustion=False)
    lease = pool.acquire(2 * MiB)
    with pytest.raises(RuntimeError, match="exhausted") as caught:
        pool.acquire(1)
    assert isinstance(caught.value, BufferPoolError)
    assert caught.value.code is ErrorCode.NO_AVAILABLE_HANDLE
    with pytest.raises(BufferPoolError, match="timed out"):
        pool.acquire(1, block=True, timeout=0.05)
    with pytest.raises(BufferPoolError, match="capacity"):
        pool.acquire(2 * MiB + 1)
    with pytest.raises(BufferPoolError, match="non-negative"):
        pool.acquire(1, timeout=-1)
    lease.release()
    small = pool.acquire(1)  # the idle 2 MiB region was dropped to make room
    assert small.size == 1
    small.release()
    pool.close()


def test_max_regions_makes_a_blocked_acquire_wait_for_a_release(
        store: DistributedStore) -> None:
    pool = small_pool(store, max_regions=1)
    lease = pool.acquire(1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(1, timeout=5.0)))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still waiting
    ptr = lease.ptr
    lease.release()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and got[0].ptr == ptr
    got[0].release()
    pool.close()
    with pytest.raises(BufferPoolError, match="closed"):
        pool.acquire(1)


def test_max_bytes_zero_is_twice_the_local_buffer_and_smaller_ones_are_raised_to_it(
        store: DistributedStore) -> None:
    pool = small_pool(store, block_on_exhaustion=False)
    lease = pool.acquire(2 * LOCAL)
    with pytest.raises(BufferPoolError, match="exhausted"):
        pool.acquire(1)
    lease.release()
    pool.close()
    pool = small_pool(store, max_bytes=1)
    pool.acquire(LOCAL).release()
    pool.close()


def test_prewarm_makes_idle_regions_within_the_budget(store: DistributedStore) -> None:
    pool = small_pool(store, max_bytes=2 * MiB, prewarm_size=MiB, prewarm_count=1)
    assert pool.prewarm(MiB, 5) == 1  # room for one more
    first, second = pool.acquire(MiB, block=False), pool.acquire(MiB, block=False)
    assert store._buffers.capacity(first.ptr) == MiB == store._buffers.capacity(second.ptr)
    first.release()
    second.release()
    pool.close()


# ----- the store through a lease
def test_put_from_and_get_into_through_leases(store: DistributedStore) -> None:
    pool = small_pool(store)
    value = os.urandom(100 * KiB)
    with pool.acquire(len(value)) as source:
        ctypes.memmove(source.ptr, value, len(value))
        assert store.put_from("k-pool", source.ptr, source.size) == 0
        assert store.batch_put_from(["k-pool-2"], [source.ptr], [source.size]) == [0]
    with pool.acquire(len(value)) as target:
        assert store.get_into("k-pool", target.ptr, target.size) == len(value)
        assert ctypes.string_at(target.ptr, len(value)) == value
        ctypes.memset(target.ptr, 0, target.size)
        assert store.batch_get_into(["k-pool-2"], [target.ptr], [target.size]) == [len(value)]
        assert ctypes.string_at(target.ptr, len(value)) == value
    pool.close()


def test_the_drop_in_serves_buffer_pool_under_mooncakes_names() -> None:
    code = ("import mooncake.store as s, mooncake.buffer_pool as b, kvcake.store.compat as c; "
            "assert s.BufferPool is b.BufferPool is b.RegisteredBufferPool is c.BufferPool; "
            "assert s.RegisteredBufferLease is s.BufferLease is c.BufferLease")
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
