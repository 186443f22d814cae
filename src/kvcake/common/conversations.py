"""Multi-turn conversations as trace records: a replay whose prompts share prefixes.

Mooncake's released traces reuse a third to two thirds of their prompt tokens (conversation
36 %, tool & agent 59 %, synthetic 66 %), but the packaged conversation trace spreads its
reuse over an hour: a window short enough to replay on two cores reuses a few per cent (see
:func:`kvcake.common.trace.prefix_reuse`). This module makes traffic with the reuse of real
multi-turn and agent sessions at any size. Each turn's prompt is the previous turn's prompt,
the reply to it, and a new message (a user turn or a tool's output); sessions open with one
of a few shared system prompts::

    session 0, turn 0   [A0 A1 A2 A3][u0 u1]                  system prompt A + message
    session 0, turn 1   [A0 A1 A2 A3][u0 u1][r0][u2 u3]       + its reply + next message
    session 1, turn 0   [A0 A1 A2 A3][v0 v1]                  system prompt A again
    session 2, turn 0   [B0 B1 B2 B3][w0 w1]                  system prompt B

The records are :class:`~kvcake.common.trace.TraceRecord`\\ s with 512-token blocks, as a
trace file's rows, so ``scale_record`` and ``synthesize_prompt`` make their prompts and the
replay, the simulator and the reports take them unchanged. Pure and seeded: the same spec
gives the same records in every process.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import TRACE_BLOCK_TOKENS, TraceRecord


@dataclass(frozen=True)
class ConversationSpec:
    """The shape of a multi-turn workload; lengths in 512-token trace blocks, times in
    trace seconds (a replay's ``speed`` compresses them as a trace file's).

    sessions / turns: how many conversations, and the turns of each.
    system_prompts / system_blocks: how many distinct system prompts the sessions share
        (session ``i`` opens with prompt ``i % system_prompts``), and their length.
    message_blocks / reply_blocks: each turn adds a message of ``message_blocks`` blocks,
        and from the second turn on the previous reply, ``reply_blocks`` blocks.
    output_tokens: mean reply length, tokens (each drawn from 0.5x to 1.5x of it).
    open_s: sessions open at times drawn evenly from ``[0, open_s]``.
    think_s: mean time from one turn's arrival to the next (each drawn from 0.5x to 1.5x).
    seed: draws times and lengths; the same spec gives the same records.
    """

    sessions: int = 8
    turns: int = 4
    system_prompts: int = 2
    system_blocks: int = 4
    message_blocks: int = 2
    reply_blocks: int = 1
    output_tokens: int = 400
    open_s: float = 40.0
    think_s: float = 20.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "system_prompts", "message_blocks",
                     "output_tokens"):
            if getattr(self, name) < 1:
                raise InvalidParamsError(f"conversations: {name} must be >= 1, got "
                                         f"{getattr(self, name)}")
        for name in ("system_blocks", "reply_blocks"):
            if getattr(self, name) < 0:
                raise InvalidParamsError(f"conversations: {name} must be >= 0, got "
                                         f"{getattr(self, name)}")
        if self.open_s < 0 or self.think_s < 0:
            raise InvalidParamsError(f"conversations: open_s and think_s must be >= 0, got "
                                     f"{self.open_s} and {self.think_s}")


def conversation_records(spec: ConversationSpec) -> list[TraceRecord]:
    """Every turn of every session of ``spec`` as a trace record, in arrival order (ties
    by session). Hash ids are numbered from 0 in the order blocks are made."""
    draw = random.Random(spec.seed)
    ids = itertools.count()
    systems = [tuple(next(ids) for _ in range(spec.system_blocks))
               for _ in range(spec.system_prompts)]
    timed: list[tuple[int, int, TraceRecord]] = []
    for session in range(spec.sessions):
        at_s = draw.uniform(0.0, spec.open_s)
        prompt = systems[session % spec.system_prompts]
        for turn in range(spec.turns):
            if turn:
                at_s += draw.uniform(0.5, 1.5) * spec.think_s
                prompt += tuple(next(ids) for _ in range(spec.reply_blocks))
            prompt += tuple(next(ids) for _ in range(spec.message_blocks))
            output = max(1, round(draw.uniform(0.5, 1.5) * spec.output_tokens))
            record = TraceRecord(round(at_s * 1000), len(prompt) * TRACE_BLOCK_TOKENS,
                                 output, prompt)
            timed.append((record.timestamp_ms, session, record))
    timed.sort(key=lambda entry: entry[:2])
    return [record for _, _, record in timed]
