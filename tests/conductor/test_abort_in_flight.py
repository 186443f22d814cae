"""A request its client leaves while the Conductor still sets it up ends there: left while
a decode seat is being reserved, no prefill starts and the seat is given back; left while
its prefill runs, the flight's drive ends too. Either way the prefill instance is aborted
before the decode instance, so no prefill write lands in blocks the decode side freed.
A prefill instance lost once its prefills are done fails none of the streams it handed
over; a decode instance lost fails its own.

The instances are RPC servers that log what they are told, in one shared order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from flights import first_output_error
from kvcake.common.aio import LoopThread
from kvcake.common.rpc import Dispatcher, RpcServer
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.flight import Flight, FlightState
from kvcake.conductor.server import ConductorServer
from kvcake.wire.conductor import Outputs, PrefillDone, Register, Snapshot
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams
from kvcake.wire.worker import Abort, Ack, Commit, Prefill, Release, Reserve, Reserved
from wire import call_once

TIMEOUT_S = 5.0
Log = list[tuple[str, str]]  # (instance, message type), in the order they arrived


class FakeInstance:
    """Answers every call at once, but a Reserve only once ``seat`` is set."""

    def __init__(self, name: str, log: Log, seat: asyncio.Event) -> None:
        self.name = name
        self._log = log
        self._seat = seat
        handlers: dict[type, Callable[[object], object]] = {
            kind: self._ack for kind in (Prefill, Commit, Release, Abort)}
        handlers[Reserve] = self._reserve
        self.server = RpcServer(Dispatcher(Prefill | Reserve | Commit | Release | Abort,
                                           handlers), "127.0.0.1", 0)

    def _ack(self, message: object) -> Ack:
        self._log.append((self.name, type(message).__name__))
        return Ack()

    async def _reserve(self, message: object) -> Reserved:
        self._log.append((self.name, "Reserve"))
        await self._seat.wait()
        return Reserved([0, 1])


class Cluster:
    def __init__(self, thread: LoopThread, server: ConductorServer, seat: asyncio.Event,
                 log: Log, endpoint: str) -> None:
        self.thread, self.server, self.seat, self.log = thread, server, seat, log
        self.endpoint = endpoint

    def told(self, name: str) -> list[str]:
        return [kind for instance, kind in self.log if instance == name]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    thread = LoopThread("abort-in-flight-test")
    log: Log = []
    seat: asyncio.Event = thread.run(_event(), TIMEOUT_S)
    instances = [FakeInstance(name, log, seat) for name in ("prefill-0", "decode-0")]
    server = ConductorServer(ConductorServerConfig(rpc_port=0), ConductorConfig())
    endpoint = thread.run(server.startup(), TIMEOUT_S)
    try:
        for instance, role in zip(instances, ("prefill", "decode"), strict=True):
            address = thread.run(instance.server.startup(), TIMEOUT_S)
            thread.run(call_once(endpoint, Register(
                instance.name, role, address, "m", "fp", 16, 64, 256, None, Snapshot(0, []))),
                TIMEOUT_S)
        yield Cluster(thread, server, seat, log, endpoint)
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        for instance in instances:
            thread.run(instance.server.shutdown(), TIMEOUT_S)
        thread.stop()


async def _event() -> asyncio.Event:
    return asyncio.Event()


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


def _drives() -> int:
    """The Conductor's tasks that drive a flight (on the running loop)."""
    return sum(task.get_name().startswith("drive ") for task in asyncio.all_tasks())


def test_left_while_reserving_no_prefill_starts_and_the_seat_is_given_back(
        cluster: Cluster) -> None:
    server = cluster.server

    async def scenario() -> None:
        flight = await server.submit("r1", list(range(40)), SamplingParams(max_tokens=4), "t")
        await _until(lambda: cluster.told("decode-0") == ["Reserve"])
        await server.end(flight)  # its Abort reaches the decode side before the seat
        assert flight.state is FlightState.ABORTED
        cluster.seat.set()
        await asyncio.wait_for(_until(lambda: _drives() == 0), TIMEOUT_S)

    cluster.thread.run(scenario(), TIMEOUT_S * 2)
    assert "Prefill" not in cluster.told("prefill-0")
    assert cluster.told("decode-0") == ["Reserve", "Abort", "Release"]


def test_left_while_its_prefill_runs_the_prefill_instance_is_aborted_first(
        cluster: Cluster) -> None:
    server = cluster.server
    cluster.thread.run(_set(cluster.seat), TIMEOUT_S)

    async def scenario() -> Flight:
        flight = await server.submit("r2", list(range(40)), SamplingParams(max_tokens=4), "t")
        await _until(lambda: "Prefill" in cluster.told("prefill-0"))
        await server.end(flight)
        await asyncio.wait_for(_until(lambda: _drives() == 0), TIMEOUT_S)
        return flight

    flight = cluster.thread.run(scenario(), TIMEOUT_S * 2)
    assert flight.state is FlightState.ABORTED
    aborts = [instance for instance, kind in cluster.log if kind == "Abort"]
    assert aborts == ["prefill-0", "decode-0"]


async def _set(event: asyncio.Event) -> None:
    event.set()


def _output(request_id: str, token: int, finish_reason: str | None = None) -> TokenOutput:
    return TokenOutput(request_id, [token], [0.0], finish_reason, 40, 0, 0)


@pytest.mark.parametrize("lost", ["prefill-0", "decode-0"])
def test_an_instance_lost_mid_stream_fails_only_the_streams_that_still_need_it(
        cluster: Cluster, lost: str) -> None:
    server = cluster.server
    cluster.thread.run(_set(cluster.seat), TIMEOUT_S)

    async def scenario() -> tuple[Flight, list[object]]:
        flight = await server.submit("r3", list(range(40)), SamplingParams(max_tokens=4), "t")
        await _until(lambda: "Prefill" in cluster.told("prefill-0"))
        await call_once(cluster.endpoint, PrefillDone("prefill-0", _output("r3", 7)))
        await _until(lambda: "Commit" in cluster.told("decode-0"))
        server.drop_instance(lost, "was killed")
        await call_once(cluster.endpoint, Outputs("decode-0", [_output("r3", 8, "stop")]))
        got: list[object] = []
        while len(got) < 2:
            try:
                got.append((await flight.next_output(TIMEOUT_S)).token_ids)
            except Exception as exc:  # the error the API turns into a status
                got.append(exc)
                break
        await server.end(flight)
        return flight, got

    flight, got = cluster.thread.run(scenario(), TIMEOUT_S * 3)
    if lost == "prefill-0":  # the prefill was done: the stream ends as it would have
        assert got == [[7], [8]] and flight.state is FlightState.FINISHED
    else:
        assert isinstance(got[-1], Exception) and flight.state is FlightState.FAILED


def test_a_drive_that_fails_unexpectedly_ends_its_flight(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever fails while the Conductor sets a request up, its client hears at once
    (it waited out the request timeout, the request counted in every queue meanwhile)."""
    server = cluster.server

    async def broken(flight: Flight) -> None:
        raise OverflowError("can't serialize ints > 2**64 - 1")
    monkeypatch.setattr(server, "_disaggregate", broken)

    error = first_output_error(cluster.thread, server, "r4", 40, TIMEOUT_S)
    assert "internal error: OverflowError" in str(error)
