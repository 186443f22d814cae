"""Token ids to text: incremental detokenizing, stop strings, and text deltas for streaming.

Text that might be the start of a stop string is held back until it is known not to be one,
so a streaming client never sees part of a stop string::

    text:     "... the answer is 42\\n\\nUs"      stop = ("\\n\\nUser",)
    emitted:  "... the answer is 42"   held: "\\n\\nUs"   (len(stop) - 1 characters at most)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcake.text.tokenizer import IncrementalDetokenizer, Tokenizer
from kvcake.wire.output import TokenOutput, TopLogprobs
from kvcake.wire.sampling import SamplingParams


@dataclass(frozen=True)
class TextDelta:
    """New text of one request since the last delta; ``finish_reason`` once it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    stop_reason: str | int | None = None
    top_logprobs: list[TopLogprobs] = field(default_factory=list)


@dataclass
class _State:
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0
    text: str = ""
    num_emitted: int = 0
    stop_reason: str | int | None = None
    stopped: bool = False


class OutputProcessor:
    """Tracks the text of live requests; tells the caller when a stop string matched."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _State] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        self._states[request_id] = _State(params, detok)

    def discard(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, output: TokenOutput) -> tuple[TextDelta, bool]:
        """The text delta for ``output``; the flag says a stop string ended the request."""
        state = self._states[output.request_id]
        for token in output.token_ids:
            before = len(state.text)
            state.text += state.detokenizer.push(token)
            state.num_tokens += 1
            if state.num_tokens >= state.params.min_tokens and self._check_stop(state, before):
                break
        finished = output.finish_reason is not None or state.stopped
        if finished and not state.stopped:
            before = len(state.text)
            state.text += state.detokenizer.finish()
            self._check_stop(state, before)
        last = output.token_ids[-1] if output.token_ids else None
        if not state.stopped and output.finish_reason == "stop" \
                and last in state.params.stop_token_ids:
            state.stop_reason = last  # a stop token (EOS leaves it None, as OpenAI servers do)
        delta = self._delta(state, output, finished)
        if finished:
            del self._states[output.request_id]
        return delta, state.stopped and output.finish_reason is None

    def _check_stop(self, state: _State, start: int) -> bool:
        if state.stopped or not state.params.stop:
            return state.stopped
        hit = find_stop(state.text, start, state.params.stop)
        if hit is None:
            return False
        index, length = hit
        state.stop_reason = state.text[index:index + length]
        keep = index + length if state.params.include_stop_str_in_output else index
        state.text = state.text[:keep]
        state.stopped = True
        return True

    def _delta(self, state: _State, output: TokenOutput, finished: bool) -> TextDelta:
        held = 0 if finished else partial_stop_len(state.text, state.params.stop)
        end = max(state.num_emitted, len(state.text) - held)
        text = state.text[state.num_emitted:end]
        state.num_emitted = end
        reason = "stop" if state.stopped else output.finish_reason
        return TextDelta(output.request_id, text, output.token_ids, output.logprobs,
                         reason, state.stop_reason if reason == "stop" else None,
                         output.top_logprobs)


def find_stop(text: str, start: int, stops: Sequence[str]) -> tuple[int, int] | None:
    """The earliest stop string in ``text`` that ends at or after index ``start``.

    Meant for incremental text: ``start`` is where this step's new characters begin, so only
    occurrences that use at least one new character are searched for. Returns
    ``(index where it begins, its length)``; on a tie the shorter string (it ends first).
    """
    best: tuple[int, int] | None = None
    for stop in stops:
        if not stop:
            continue
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index >= 0 and (best is None or (index, len(stop)) < best):
            best = (index, len(stop))
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string.

    A streaming front end holds these back until the next step proves them harmless.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
