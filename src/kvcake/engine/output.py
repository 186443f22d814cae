"""Token ids to text: incremental detokenizing, stop strings, and text deltas for streaming.

Text that might be the start of a stop string is held back until it is known not to be one,
so a streaming client never sees part of a stop string::

    text:     "... the answer is 42\\n\\nUs"      stop = ("\\n\\nUser",)
    emitted:  "... the answer is 42"   held: "\\n\\nUs"   (len(stop) - 1 characters at most)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcake.engine.core import RequestOutput
from kvcake.engine.logprobs import TopLogprobs
from kvcake.engine.sampling import SamplingParams, find_stop, partial_stop_len
from kvcake.engine.tokenizer import IncrementalDetokenizer, Tokenizer


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

    def process(self, output: RequestOutput) -> tuple[TextDelta, bool]:
        """The text delta for ``output``; the flag says a stop string ended the request."""
        state = self._states[output.request_id]
        for token in output.new_token_ids:
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
        last = output.new_token_ids[-1] if output.new_token_ids else None
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

    def _delta(self, state: _State, output: RequestOutput, finished: bool) -> TextDelta:
        held = 0 if finished else partial_stop_len(state.text, state.params.stop)
        end = max(state.num_emitted, len(state.text) - held)
        text = state.text[state.num_emitted:end]
        state.num_emitted = end
        reason = "stop" if state.stopped else output.finish_reason
        return TextDelta(output.request_id, text, output.new_token_ids, output.new_logprobs,
                         reason, state.stop_reason if reason == "stop" else None,
                         output.new_top_logprobs)
