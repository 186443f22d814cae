"""One request in flight through the cluster, as the Conductor server tracks it.

A flight is fed from RPC handlers (token outputs, the prefill's completion, an instance's
death) and drained by the API's generator. The lifecycle, as a table (STYLE §3)::

    ROUTED --(colocated: first output)--------------------> DECODING --> FINISHED
       |  \\--(reserve, prefill with target)--> PREFILLING --commit--^        ^
       |                                          \\--first token ends it------|
       '----------------- any live state --(instance died, abort)--> FAILED / ABORTED
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.lifecycle import Lifecycle
from kvcake.wire.conductor import PrefillDone
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams


class FlightState(Enum):
    ROUTED = "routed"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def ended(self) -> bool:
        return TRANSITIONS.final(self)


_ENDS = frozenset({FlightState.FINISHED, FlightState.FAILED, FlightState.ABORTED})
TRANSITIONS = Lifecycle({
    FlightState.ROUTED: frozenset({FlightState.PREFILLING, FlightState.DECODING} | _ENDS),
    FlightState.PREFILLING: frozenset({FlightState.DECODING} | _ENDS),
    FlightState.DECODING: _ENDS,
    FlightState.FINISHED: frozenset(),
    FlightState.FAILED: frozenset(),
    FlightState.ABORTED: frozenset(),
})


class InstanceLostError(KvcakeError):
    """The instance serving a request died (HTTP 503 hint)."""

    default_code = ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS

    def __init__(self, instance_id: str, request_id: str) -> None:
        super().__init__(f"instance {instance_id} serving request {request_id} stopped "
                         f"responding")
        self.instance_id = instance_id


@dataclass
class Flight:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str
    prefill_id: str
    decode_id: str
    predicted_ttft_s: float = 0.0  # what routing expected; the decode seat is held for it
    state: FlightState = FlightState.ROUTED
    num_output_tokens: int = 0
    # (cached, from the store) prompt tokens its prefill instance reused, under P/D: the
    # decode instance's outputs cannot know them
    prefill_cached: tuple[int, int] | None = None
    prefill_done: asyncio.Future[PrefillDone] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    _queue: asyncio.Queue[TokenOutput | KvcakeError] = field(default_factory=asyncio.Queue)
    _arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic s, tokens)

    @property
    def colocated(self) -> bool:
        return self.prefill_id == self.decode_id

    def move_to(self, state: FlightState) -> bool:
        """Change state; moves out of an ended state are ignored (a late message)."""
        if self.state.ended:
            return False
        self.state = TRANSITIONS.move(self.state, state, "request %s", self.request_id)
        return True

    def push(self, output: TokenOutput) -> None:
        if self.state.ended:
            return
        if self.state is FlightState.ROUTED:
            self.move_to(FlightState.DECODING)
        self.num_output_tokens += len(output.token_ids)
        self._arrivals.append((time.monotonic(), len(output.token_ids)))
        self._queue.put_nowait(output)
        if output.finish_reason is not None:
            self.move_to(FlightState.FINISHED)

    def fail(self, error: KvcakeError) -> None:
        if self.move_to(FlightState.FAILED):
            self._queue.put_nowait(error)
            self._stop_waiting(error)

    def abort(self) -> None:
        """The client is gone: end the flight, and wake whatever waits for its prefill."""
        if self.move_to(FlightState.ABORTED):
            self._stop_waiting(KvcakeError(f"request {self.request_id} was aborted"))

    def _stop_waiting(self, error: KvcakeError) -> None:
        if not self.prefill_done.done():
            self.prefill_done.set_exception(error)
            self.prefill_done.exception()  # retrieved: nobody else may be waiting

    def token_gaps(self) -> list[float]:
        """Seconds between tokens as they reached the Conductor, the first one excluded; an
        output carrying n tokens counts as n equal gaps."""
        gaps: list[float] = []
        for (before, _), (after, count) in itertools.pairwise(self._arrivals):
            gaps += [(after - before) / count] * count
        return gaps

    def needs(self, instance_id: str) -> bool:
        """Whether the flight still needs ``instance_id``: its decode instance to the end,
        its prefill instance until the prefill is done (the KV has moved by then)."""
        return instance_id == self.decode_id or (instance_id == self.prefill_id
                                                 and not self.prefill_done.done())

    async def next_output(self, timeout_s: float) -> TokenOutput:
        """The next output; raises the error that ended the flight, or on timeout."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            raise KvcakeError(f"request {self.request_id} produced nothing for "
                              f"{timeout_s:.0f}s") from None
        if isinstance(item, KvcakeError):
            raise item
        return item
