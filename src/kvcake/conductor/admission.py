"""Admission rules, by name (STYLE.md §12): whether a routed request may start at all.

==============  =========================================================================
``none``        admits everything (routing may still fail for want of an instance)
``early``       rejects when the predicted TTFT breaks the SLO, or when the decode
                instance's *current* batch plus this request breaks the TBT SLO
``predictive``  the TTFT rule, and the TBT SLO checked on the batch predicted for the
                moment this request would reach decode (arXiv §6)
==============  =========================================================================

``early`` looks at the decode batch as it is now, so it rejects while a burst is draining
and admits while one is on its way; ``predictive`` replays the decode instance's timeline
instead. A request decodes for ``num_output_tokens`` steps of the current step time, from
its (actual or predicted) decode start::

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

    def current_tbt_s(self) -> tuple[float, int]:
        """Step time of the batch decoding now with this request added, and that batch."""
        decoding = [m for m in self.members if m.decoding]
        batch = len(decoding) + 1
        context = sum(m.context_tokens for m in decoding) + self.context_tokens
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

    def _check_tbt(self, query: AdmissionInput, tbt_s: float, batch: int,
                   when: str) -> Rejection | None:
        if tbt_s <= self.slo_tbt_s:
            return None
        return Rejection("tbt_slo", f"predicted TBT {tbt_s:.4f} s {when} on "
                         f"{query.decode_id!r} (batch {batch}) > SLO {self.slo_tbt_s:.4f} s")


class NoAdmission(Admission):
    name = "none"

    def check(self, query: AdmissionInput) -> Rejection | None:
        return None


class EarlyAdmission(Admission):
    name = "early"

    def check(self, query: AdmissionInput) -> Rejection | None:
        tbt_s, batch = query.current_tbt_s()
        return self._check_ttft(query) or self._check_tbt(query, tbt_s, batch, "now")


class PredictiveAdmission(Admission):
    name = "predictive"

    def check(self, query: AdmissionInput) -> Rejection | None:
        tbt_s, batch = predicted_tbt_s(query)
        arrival = f"at +{query.ttft_s:.3f} s"
        return self._check_ttft(query) or self._check_tbt(query, tbt_s, batch, arrival)


def predicted_tbt_s(query: AdmissionInput) -> tuple[float, int]:
    """Step time of the decode batch at ``now + ttft``, this request included, and that batch.

    Every member decodes for ``num_output_tokens`` steps of the current step time (one
    uniform rate: the paper's simplification); it is in the batch at ``t`` when its decode
    interval contains ``t``.
    """
    step_now, _ = query.current_tbt_s()
    arrival = query.now_s + query.ttft_s
    present = [m for m in query.members
               if m.decode_start_s <= arrival < m.decode_start_s + m.num_output_tokens * step_now]
    batch = len(present) + 1
    context = sum(m.context_tokens for m in present) + query.context_tokens
    return query.step_s(batch, context), batch


ADMISSIONS: dict[str, type[Admission]] = {
    rule.name: rule for rule in (NoAdmission, EarlyAdmission, PredictiveAdmission)
}


def make_admission(name: str, slo_ttft_s: float, slo_tbt_s: float) -> Admission:
    """The rule called ``name``; ``InvalidParamsError`` naming the known ones otherwise."""
    try:
        return ADMISSIONS[name](slo_ttft_s, slo_tbt_s)
    except KeyError:
        raise InvalidParamsError(
            f"unknown admission {name!r}; known: {', '.join(sorted(ADMISSIONS))}") from None
