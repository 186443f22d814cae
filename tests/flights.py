"""A request submitted straight to a Conductor server, for tests of how its flight ends."""

from __future__ import annotations

from kvcake.common.aio import LoopThread
from kvcake.conductor.server import ConductorServer
from kvcake.wire.sampling import SamplingParams


def first_output_error(thread: LoopThread, server: ConductorServer, request_id: str,
                       num_tokens: int, timeout_s: float) -> BaseException:
    """Submit a request and wait for its first output, which must be an error: that error
    (what the API turns into a status). The flight is ended either way."""
    async def submit() -> BaseException:
        flight = await server.submit(request_id, list(range(num_tokens)),
                                     SamplingParams(max_tokens=4), "t")
        try:
            await flight.next_output(timeout_s)
        except Exception as exc:  # the error the API turns into a status
            return exc
        finally:
            await server.end(flight)
        raise AssertionError(f"request {request_id} produced output")
    return thread.run(submit(), timeout_s * 2)
