"""Admission rules, by name (STYLE.md §12): whether a routed request may start at all.

==============  =========================================================================
``none``        admits everything (routing may still fail for want of an instance)
``ttft``        rejects when the predicted TTFT breaks the SLO; decode load is left to
                the decode instance (the paper's baseline checks each stage only when the
                request reaches it)
``early``       rejects when the predicted TTFT breaks the SLO, or when the decode
                instance's *current* batch plus this request breaks the TBT SLO or
                overflows the instance's KV capacity
``predictive``  the TTFT rule, and the TBT SLO and KV capacity checked on the batch
                predicted for the moment this request would reach decode (arXiv §6)
==============  =========================================================================

``early`` looks at the decode batch as it is now, so it rejects while a burst is draining
and admits while one is on its way; ``predictive`` replays the decode instance's timeline
instead. A request decodes for ``num_output_tokens`` steps of the current step time, from
its (actual or predicted) decode start. The TBT compared with the objective is the predicted
step times ``tbt_tail`` (what the objective's slowest-gaps measure adds to a mean step, as
recent requests showed; 1 without that evidence). A batch whose contexts (prompt plus
expected output, as a decode instance reserves them) overflow the instance's KV would leave
the request waiting for a seat, which breaks the TBT objective as surely as a slow step::

    now ─────────────── t = now + ttft ───────▶
    decoding: [start ──── start + n·step)      present at t if start <= t < end
    heading:        [prefill end ─── … )       (prefill end predicted)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from kvcake.common.errors import InvalidParamsError

StepTime = Callable[[int, int], float]  # (batch_size, num_context_tokens) -> seconds


@dataclass(frozen=True)
class DecodeMember:
    """A request decoding on the chosen decode instance, or on its way there.

    decode_start_s: when it started decoding, or (``decoding`` false) its predicted prefill
    end. context_tokens: prompt plus expected output.
    """

    context_tokens: int
    num_output_tokens: int
    decode_start_s: float
    decoding: bool


@dataclass(frozen=True)
class AdmissionInput:
    """Everything a rule may look at for one routed request (times in seconds)."""

    now_s: float
    prefill_id: str
    decode_id: str
    ttft_s: float
    context_tokens: int  # this request's prompt plus expected output
    members: Sequence[DecodeMember]  # on decode_id
    step_s: StepTime
    capacity_tokens: int = 0  # KV the decode instance holds for its batch (0: unknown)
    tbt_tail: float = 1.0  # observed TBT / predicted step of recent requests (>= 1)

    def current_batch(self) -> tuple[int, int]:
        """The batch decoding now with this request added: (requests, context tokens)."""
        decoding = [m for m in self.members if m.decoding]
        return len(decoding) + 1, sum(m.context_tokens for m in decoding) + self.context_tokens

    def current_tbt_s(self) -> tuple[float, int]:
        """Step time of the batch decoding now with this request added, and that batch."""
        batch, context = self.current_batch()
        return self.step_s(batch, context), batch


@dataclass(frozen=True)
class Rejection:
    reason: str  # short code: "ttft_slo" or "tbt_slo"
    detail: str  # the numbers


class Admission(ABC):
    """Admits or rejects one routed request against the SLOs."""

    name: ClassVar[str]

    def __init__(self, slo_ttft_s: float, slo_tbt_s: float) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.slo_tbt_s = slo_tbt_s

    @abstractmethod
    def check(self, query: AdmissionInput) -> Rejection | None:
        """``None`` to admit; never changes state."""

    def _check_ttft(self, query: AdmissionInput) -> Rejection | None:
        if query.ttft_s <= self.slo_ttft_s:
            return None
        return Rejection("ttft_slo", f"predicted TTFT {query.ttft_s:.3f} s on "
                         f"{query.prefill_id!r} > SLO {self.slo_ttft_s:.3f} s")

    def _check_decode(self, query: AdmissionInput, batch: int, context: int,
                      when: str) -> Rejection | None:
        """The TBT objective and the KV capacity for ``batch`` requests holding ``context``
        tokens on the decode instance."""
        tbt_s = query.step_s(batch, context) * query.tbt_tail
        if tbt_s > self.slo_tbt_s:
            tail = f", tail x{query.tbt_tail:.2f}" if query.tbt_tail > 1 else ""
            return Rejection("tbt_slo", f"predicted TBT {tbt_s:.4f} s {when} on "
                             f"{query.decode_id!r} (batch {batch}{tail}) > SLO "
                             f"{self.slo_tbt_s:.4f} s")
        if batch > 1 and 0 < query.capacity_tokens < context:
            return Rejection("tbt_slo", f"decode batch {when} on {query.decode_id!r} would "
                             f"hold {context} KV tokens > its {query.capacity_tokens}: no seat")
        return None


class NoAdmission(Admission):
    name = "none"

    def check(self, query: AdmissionInput) -> Rejection | None:
        return None


class TtftAdmission(Admission):
    name = "ttft"

    def check(self, query: AdmissionInput) -> Rejection | None:
        return self._check_ttft(query)


class EarlyAdmission(Admission):
    name = "early"

    def check(self, query: AdmissionInput) -> Rejection | None:
        batch, context = query.current_batch()
        return self._check_ttft(query) or self._check_decode(query, batch, context, "now")


class PredictiveAdmission(Admission):
    name = "predictive"

    def check(self, query: AdmissionInput) -> Rejection | None:
        batch, context = predicted_batch(query)
        arrival = f"at +{query.ttft_s:.3f} s"
        return self._check_ttft(query) or self._check_decode(query, batch, context, arrival)


def predicted_batch(query: AdmissionInput) -> tuple[int, int]:
    """The decode batch at ``now + ttft``, this request included: (requests, context tokens).

    Every member decodes for ``num_output_tokens`` steps of the current step time (one
    uniform rate: the paper's simplification); it is in the batch at ``t`` when its decode
    interval contains ``t``.
    """
    step_now, _ = query.current_tbt_s()
    arrival = query.now_s + query.ttft_s
    present = [m for m in query.members
               if m.decode_start_s <= arrival < m.decode_start_s + m.num_output_tokens * step_now]
    return len(present) + 1, sum(m.context_tokens for m in present) + query.context_tokens


ADMISSIONS: dict[str, type[Admission]] = {
    rule.name: rule for rule in (NoAdmission, TtftAdmission, EarlyAdmission,
                                 PredictiveAdmission)
}


def make_admission(name: str, slo_ttft_s: float, slo_tbt_s: float) -> Admission:
    """The rule called ``name``; ``InvalidParamsError`` naming the known ones otherwise."""
    try:
        return ADMISSIONS[name](slo_ttft_s, slo_tbt_s)
    except KeyError:
        raise InvalidParamsError(
            f"unknown admission {name!r}; known: {', '.join(sorted(ADMISSIONS))}") from None
