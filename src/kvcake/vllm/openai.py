"""What a sidecar asks its vLLM server (``/v1/completions`` on token ids) and how vLLM's
answer becomes kvcake's :class:`TokenOutput`. Pure: no I/O.

kvcake's Conductor tokenizes, detokenizes and applies stop strings itself, so vLLM gets the
prompt as token ids and returns token ids (``return_token_ids``; log-probability entries
named ``token_id:N``); stop strings never reach it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams

_TOKEN_ID = "token_id:"


def completion_body(model: str, prompt: list[int], params: SamplingParams, *, stream: bool,
                    kv_transfer_params: Mapping[str, Any] | None = None,
                    max_tokens: int | None = None) -> dict[str, Any]:
    """The JSON body of one completion on ``prompt``'s token ids."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "stream": stream,
        "max_tokens": max_tokens if max_tokens is not None else params.max_tokens,
        "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1, "min_p": params.min_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty, "min_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos, "stop_token_ids": list(params.stop_token_ids),
        "skip_special_tokens": params.skip_special_tokens,
        "return_token_ids": True, "return_tokens_as_token_ids": True,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
    if params.prompt_logprobs is not None:
        body["prompt_logprobs"] = params.prompt_logprobs
    if stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = dict(kv_transfer_params)
    return body


def check_params(params: SamplingParams) -> None:
    """Refuse, by name, what a sidecar cannot ask vLLM for: prompt log-probabilities (echo
    with logprobs). vLLM refuses them on a stream, and a decode instance asked for them
    would read no KV, the prefill's neither, and compute the prompt itself."""
    if params.prompt_logprobs is not None:
        raise InvalidParamsError("prompt log-probabilities (echo with logprobs) are not "
                                 "served by vLLM instances; ask without echo or logprobs")


def _token_id(text: str) -> int:
    if not text.startswith(_TOKEN_ID):
        raise KvcakeError(f"vLLM named a log-probability entry {text!r}, not token_id:N "
                          "(return_tokens_as_token_ids)")
    return int(text.removeprefix(_TOKEN_ID))


def _logprobs(choice: Mapping[str, Any], count: int) -> tuple[list[float],
                                                               list[list[tuple[int, float]]]]:
    entry = choice.get("logprobs")
    if not entry:
        return [], []
    values = [float(v) if v is not None else 0.0 for v in entry.get("token_logprobs") or []]
    tops = [[(_token_id(name), float(lp)) for name, lp in (top or {}).items()]
            for top in entry.get("top_logprobs") or []]
    return values[:count], tops[:count]


def chunk_output(request_id: str, chunk: Mapping[str, Any], num_prompt_tokens: int
                 ) -> TokenOutput | None:
    """One streamed chunk (or a whole answer) as a :class:`TokenOutput`; ``None`` for a
    chunk with neither tokens nor an end (the usage-only tail)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    token_ids = [int(t) for t in choice.get("token_ids") or []]
    finish = choice.get("finish_reason")
    if not token_ids and finish is None:
        return None
    logprobs, tops = _logprobs(choice, len(token_ids))
    logprobs += [0.0] * (len(token_ids) - len(logprobs))  # not asked for: not shown
    usage = chunk.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return TokenOutput(request_id, token_ids, logprobs, _finish(finish), num_prompt_tokens,
                       int(details.get("cached_tokens") or 0), 0, tops)


def cached_tokens(chunk: Mapping[str, Any]) -> int | None:
    """The prompt tokens vLLM reused, where ``chunk`` says (a stream's final usage chunk:
    the per-token usage of ``continuous_usage_stats`` leaves them out)."""
    details = (chunk.get("usage") or {}).get("prompt_tokens_details")
    return None if details is None else int(details.get("cached_tokens") or 0)


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "abort"
