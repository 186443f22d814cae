"""The steady, seeded store workload: lanes of puts and gets, each op bounded by a deadline.

Keys, sizes, replica counts and pauses come from ``random.Random(f"{seed}/{tag}/{lane}")``,
so a seed names the same sequence of operations on every run (their timing, and so what a
fault interrupts, still depends on the machine). Every value checks itself
(:mod:`kvcake.chaos.values`); every acknowledged put is looked up once to learn which
segments hold its replicas.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvcake.chaos.ledger import HANG, NOT_FOUND, OK, WRONG_BYTES, Ledger, Written
from kvcake.chaos.values import MIN_VALUE_LEN, is_exact, make_value, value_digest
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.store import AsyncStore, ReplicateConfig
from kvcake.store.config import StoreConfig
from kvcake.transfer.config import TransferConfig
from kvcake.wire import store as m

T = TypeVar("T")
_CHECK_BATCH = 16


@dataclass(frozen=True)
class WorkloadConfig:
    """seed, tag: name the operation sequence (tag: the scenario, also the key prefix).
    lanes: concurrent loops of operations. put_share: fraction of ops that are puts.
    min_size / max_size: value bytes, log-uniform between them.
    replica_num: replicas a put asks for; single_share of puts ask for one only.
    missing_share: fraction of gets of keys never written (they must be not-found).
    pause_s: mean pause between a lane's ops. deadline_s: an op still running after this
    long is a hang (abandoned and counted). track_placement: look up each acknowledged
    put's segments (one more master call; its read lease delays that object's eviction).
    """

    seed: int
    tag: str
    lanes: int = 3
    put_share: float = 0.5
    min_size: int = 512
    max_size: int = 64 << 10
    replica_num: int = 2
    single_share: float = 0.2
    missing_share: float = 0.05
    pause_s: float = 0.01
    deadline_s: float = 12.0
    track_placement: bool = True

    def __post_init__(self) -> None:
        assert MIN_VALUE_LEN <= self.min_size <= self.max_size, (self.min_size, self.max_size)
        assert self.lanes >= 1 and 0 <= self.put_share <= 1


def client_configs(master: str, host: str = "127.0.0.1", transport: str = "auto",
                   timeout_s: float = 2.0) -> tuple[StoreConfig, TransferConfig]:
    """A chaos client's settings: short timeouts, so a fault shows as a clean error soon.
    ``transport="tcp"``: reach even same-host nodes as a remote client would; ``"shm"``: map
    their memory (a killed node's pages are refused by its pidfd)."""
    return (StoreConfig(master=master, rpc_timeout_s=timeout_s, heartbeat_s=0.5),
            TransferConfig(host=host, transport=transport, timeout_s=timeout_s))


@dataclass(frozen=True)
class Verdict:
    """The final read of every acknowledged object."""

    checked: int
    results: dict[str, int]  # result -> count
    wrong_bytes: int
    lost: list[str]  # acknowledged keys with a surviving replica that did not read back


class StoreWorkload:
    def __init__(self, store: AsyncStore, config: WorkloadConfig, ledger: Ledger) -> None:
        self.store = store
        self.config = config
        self.ledger = ledger
        self._names: dict[int, str] = {}  # segment id -> name

    # ----- the steady load
    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._lane(lane, stop) for lane in range(self.config.lanes)))

    async def _lane(self, lane: int, stop: asyncio.Event) -> None:
        c = self.config
        rng = random.Random(f"{c.seed}/{c.tag}/{lane}")
        n = 0
        while not stop.is_set():
            if rng.random() < c.put_share or not self.ledger.attempted:
                await self.put(f"{c.tag}/{lane}/{n}", self._size(rng), rng)
                n += 1
            else:
                await self.get(self._pick(rng))
            await asyncio.sleep(rng.expovariate(1 / c.pause_s) if c.pause_s else 0)

    def _size(self, rng: random.Random) -> int:
        low, high = math.log(self.config.min_size), math.log(self.config.max_size)
        return int(math.exp(rng.uniform(low, high)))

    def _pick(self, rng: random.Random) -> str:
        if rng.random() < self.config.missing_share:
            return f"{self.config.tag}/never/{rng.randrange(1 << 30)}"
        return rng.choice(self.ledger.attempted)

    # ----- one operation
    async def put(self, key: str, size: int, rng: random.Random, pinned: bool = False) -> str:
        c = self.config
        value = make_value(key, size, rng)
        replicas = 1 if rng.random() < c.single_share else c.replica_num
        config = ReplicateConfig(replica_num=replicas, with_hard_pin=pinned)
        self.ledger.attempted.append(key)
        started = self.ledger.clock()
        result = await self._outcome(self.store.put_batch([key], [value], config))
        if isinstance(result, list):
            result = OK if result[0] == 0 else _code_name(result[0])
        if result == OK:
            segments = await self._segments_of(key) if c.track_placement else frozenset()
            self.ledger.acknowledge(key, Written(size, value_digest(value), segments, pinned))
        self.ledger.record("put", result, started)
        return result

    async def get(self, key: str) -> str:
        started = self.ledger.clock()
        reply = await self._outcome(self.store.get_batch([key]))
        result = reply if isinstance(reply, str) else self._judge(key, reply[0])
        self.ledger.record("get", result, started)
        return result

    def _judge(self, key: str, value: bytes | int) -> str:
        if isinstance(value, int):
            return NOT_FOUND if value == ErrorCode.OBJECT_NOT_FOUND else _code_name(value)
        written = self.ledger.acknowledged.get(key)
        return OK if is_exact(key, value, written.digest if written else None) else WRONG_BYTES

    async def _outcome(self, call: Awaitable[T]) -> T | str:
        """The call's value, or its failure as a result name (``hang`` past the deadline)."""
        try:
            return await asyncio.wait_for(call, self.config.deadline_s)
        except TimeoutError:
            return HANG
        except KvcakeError as exc:
            return NOT_FOUND if exc.code is ErrorCode.OBJECT_NOT_FOUND else exc.code.name

    async def _segments_of(self, key: str) -> frozenset[str]:
        session = self.store.session
        assert session is not None
        try:
            found = await session.call(m.GetReplicas([key]), m.GetReplicasReply)
            ids = [h.segment_id for h in found.replicas[0]] if found.codes[0] == 0 else []
            missing = [i for i in ids if i not in self._names]
            if missing:
                reply = await session.call(m.DescribeSegments(missing), m.DescribeSegmentsReply)
                for segment_id, d in zip(missing, reply.descriptors, strict=True):
                    if d is not None:
                        self._names[segment_id] = d.name
        except KvcakeError:
            return frozenset()  # unknown placement: the object counts as not surviving
        return frozenset(self._names[i] for i in ids if i in self._names)

    # ----- afterwards
    async def verify(self, surviving: set[str]) -> Verdict:
        """Read back every acknowledged object. Wrong bytes are always wrong; an object
        that does not read back is lost when it is pinned or had a replica on a segment
        in ``surviving``."""
        results: Counter[str] = Counter()
        lost: list[str] = []
        keys = sorted(self.ledger.acknowledged)
        for start in range(0, len(keys), _CHECK_BATCH):
            batch = keys[start:start + _CHECK_BATCH]
            for key, result in zip(batch, await self._read_back(batch), strict=True):
                results[result] += 1
                written = self.ledger.acknowledged[key]
                if result != OK and (written.pinned or written.segments & surviving):
                    lost.append(key)
        return Verdict(len(keys), dict(sorted(results.items())), results[WRONG_BYTES], lost)

    async def _read_back(self, keys: Sequence[str]) -> list[str]:
        reply = await self._outcome(self.store.get_batch(keys))
        if isinstance(reply, str):
            return [reply] * len(keys)
        return [self._judge(key, value) for key, value in zip(keys, reply, strict=True)]


def _code_name(code: int) -> str:
    try:
        return NOT_FOUND if code == ErrorCode.OBJECT_NOT_FOUND else ErrorCode(code).name
    except ValueError:
        return f"code_{code}"


async def integrity(store: AsyncStore) -> str:
    """The master's own consistency check: ``ok``, or what failed."""
    session = store.session
    assert session is not None
    try:
        reply = await session.call(m.CheckIntegrity(), m.IntegrityReply)
    except KvcakeError as exc:
        return f"check failed: {exc}"
    return "ok" if reply.ok else reply.problem
