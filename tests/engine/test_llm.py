"""The offline LLM API on the real SmolLM2-135M-Instruct (bfloat16): generate, chat, stop
strings, streaming, token-id prompts, bad input, and the ``kvcake generate`` command.

One engine serves the whole module; runs whose tokens are compared start from an empty prefix
cache, so a rerun computes exactly what the first run did.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Generator, Iterator
from dataclasses import replace

import pytest
import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.generate import GenerateOptions, _render
from kvcake.engine.llm import LLM, CompletionOutput
from kvcake.model import ModelFiles
from kvcake.text import Tokenizer
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
STORY = "Once upon a time"


@pytest.fixture(scope="module")
def llm(smollm2_files: ModelFiles) -> Iterator[LLM]:
    # one torch thread: on a 2-core machine shared with other jobs a second thread mostly
    # waits at barriers (steps 20x slower); restored for the modules that follow
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with LLM(model=str(smollm2_files.path), dtype="bfloat16", kv_cache_bytes=64 << 20) as engine:
        yield engine
    torch.set_num_threads(threads)


def fresh(llm: LLM) -> LLM:
    """``llm`` with an empty prefix cache (and nothing left running from an earlier test)."""
    assert not llm.core.has_unfinished()
    assert llm.core.scheduler.kv.reset_prefix_cache()
    return llm


def completion(llm: LLM, prompt: str | list[int], params: SamplingParams) -> CompletionOutput:
    [result] = fresh(llm).generate(prompt, params)
    return result.outputs[0]


def assert_idle(llm: LLM) -> None:
    pool = llm.core.scheduler.kv.pool
    pool.check_integrity()
    assert not llm.core.has_unfinished() and llm.core.scheduler.requests == {}
    assert pool.num_free_blocks == pool.num_blocks


def test_generate_returns_results_in_prompt_order(llm: LLM,
                                                  smollm2_tokenizer: Tokenizer) -> None:
    prompts = ["The capital of France is", STORY, "def fibonacci(n):"]
    # the first prompt finishes last, the second first
    params = [replace(GREEDY, max_tokens=n) for n in (12, 4, 8)]
    results = fresh(llm).generate(prompts, params)
    assert [r.prompt for r in results] == prompts
    assert [r.prompt_token_ids for r in results] == [smollm2_tokenizer.encode(p) for p in prompts]
    assert len({r.request_id for r in results}) == 3
    for result, p in zip(results, params, strict=True):
        out = result.outputs[0]
        assert out.text and out.finish_reason in ("stop", "length")
        assert len(out.token_ids) == p.max_tokens if out.finish_reason == "length" else (
            len(out.token_ids) <= p.max_tokens)
        assert smollm2_tokenizer.decode(out.token_ids) == out.text
        assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
        assert result.num_cached_tokens == 0
    assert_idle(llm)


def test_chat_knows_the_capital_of_france(llm: LLM) -> None:
    [result] = fresh(llm).chat([{"role": "user", "content": "What is the capital of France?"}],
                               GREEDY)
    out = result.outputs[0]
    assert "Paris" in out.text
    if out.finish_reason == "stop":  # the model's end-of-turn token, kept in token_ids
        assert out.token_ids[-1] in llm.core.model_config.eos_token_ids
    assert_idle(llm)


def pick_stop(llm: LLM, full: CompletionOutput) -> tuple[str, int]:
    """A stop string spanning tokens 5..7 of ``full`` and where ``full.text`` first has it."""
    stop = llm.tokenizer.decode(full.token_ids[5:8]).strip()
    index = full.text.find(stop)
    assert len(stop) >= 4 and index > 0, (stop, full.text)
    return stop, index


def test_stop_string_cuts_the_text_right_before_it(llm: LLM) -> None:
    full = completion(llm, STORY, GREEDY)
    assert full.finish_reason == "length"
    stop, index = pick_stop(llm, full)
    cut = completion(llm, STORY, replace(GREEDY, stop=(stop,)))
    assert cut.text == full.text[:index]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    # generation ended with the token that completed the stop string
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert stop in llm.tokenizer.decode(cut.token_ids)
    assert stop not in llm.tokenizer.decode(cut.token_ids[:-1])
    kept = completion(llm, STORY, replace(GREEDY, stop=(stop,), include_stop_str_in_output=True))
    assert kept.text == full.text[:index + len(stop)] and kept.text.endswith(stop)
    assert (kept.finish_reason, kept.stop_reason) == ("stop", stop)
    assert_idle(llm)


def test_stream_deltas_add_up_to_the_generated_text(llm: LLM) -> None:
    full = completion(llm, STORY, GREEDY)
    deltas = list(fresh(llm).stream(STORY, GREEDY))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert_idle(llm)


def test_stream_never_shows_part_of_a_stop_string(llm: LLM) -> None:
    full = completion(llm, STORY, GREEDY)
    stop, index = pick_stop(llm, full)
    deltas = list(fresh(llm).stream(STORY, replace(GREEDY, stop=(stop,))))
    shown = ""
    for delta in deltas:
        shown += delta.text
        assert full.text[:index].startswith(shown)  # nothing shown is taken back later
    assert shown == full.text[:index] and stop not in shown
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", stop)
    assert_idle(llm)  # the stop string finished the request in the engine too


def test_closing_a_stream_early_aborts_its_request(llm: LLM) -> None:
    stream = fresh(llm).stream(STORY, GREEDY)
    assert isinstance(stream, Generator)  # what a server closes when its client goes away
    first = next(stream)
    assert first.finish_reason is None and llm.core.has_unfinished()
    stream.close()
    assert_idle(llm)


def test_token_id_prompts_answer_like_their_text(llm: LLM, smollm2_tokenizer: Tokenizer) -> None:
    text = "The capital of France is"
    ids = smollm2_tokenizer.encode(text)
    by_text = completion(llm, text, GREEDY)
    [by_ids] = fresh(llm).generate(ids, GREEDY)  # one flat list of ints is one prompt
    assert (by_ids.prompt, by_ids.prompt_token_ids) == (None, ids)
    assert by_ids.outputs[0].text == by_text.text
    assert by_ids.outputs[0].token_ids == by_text.token_ids
    several = fresh(llm).generate([ids, smollm2_tokenizer.encode(STORY)],
                                  replace(GREEDY, max_tokens=2))
    assert [len(r.outputs[0].token_ids) for r in several] == [2, 2]
    assert_idle(llm)


def test_text_prompts_get_the_tokenizers_bos_and_chat_templates_do_not(
        llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in vLLM and kvcake's /v1/completions (SmolLM2's tokenizer adds none, so this
    watches what is asked of it)."""
    asked: list[bool] = []
    encode = llm.tokenizer.encode

    def recording(text: str, add_special_tokens: bool = False) -> list[int]:
        asked.append(add_special_tokens)
        return encode(text, add_special_tokens)

    monkeypatch.setattr(llm.tokenizer, "encode", recording)
    one = replace(GREEDY, max_tokens=1)
    fresh(llm).generate("The capital of France is", one)
    list(fresh(llm).stream("Once upon a time", one))
    fresh(llm).chat([{"role": "user", "content": "Hi"}], one)
    chat_prompt = _render(llm, GenerateOptions("Hi", True, None, one, False))  # generate --chat
    list(fresh(llm).stream(chat_prompt, one))
    assert asked == [True, True, False, False]
    assert_idle(llm)


def test_bad_sampling_params_fail_before_anything_runs(llm: LLM) -> None:
    with pytest.raises(InvalidParamsError, match=r"top_p must be in \(0.0, 1.0\], got 0"):
        fresh(llm).generate("Hi", SamplingParams(top_p=0))
    with pytest.raises(InvalidParamsError, match="1 sampling params for 2 prompts"):
        llm.generate(["Hi", "Ho"], [GREEDY])
    assert_idle(llm)


def test_a_refused_prompt_withdraws_its_whole_batch(llm: LLM) -> None:
    """The first prompt was already queued when the second was refused: it must not stay
    behind to run (and crash) inside the next call."""
    batch: list[str | list[int]] = ["Hello there", [1_000_000]]
    with pytest.raises(InvalidParamsError, match="token id 1000000 is outside the vocabulary"):
        fresh(llm).generate(batch, GREEDY)
    assert_idle(llm)
    [result] = llm.generate("Hello there", replace(GREEDY, max_tokens=2))
    assert len(result.outputs[0].token_ids) == 2


def test_generate_command_answers_a_question() -> None:
    # as tests/test_cli.py runs the command; one thread for the same reason as the fixture
    result = subprocess.run(
        [sys.executable, "-m", "kvcake.cli", "generate", "What is the capital of France?",
         "--max-tokens", "20", "--threads", "1"],
        check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


# ----- log-probabilities, penalties and the context (through EngineCore)


def run_to_end(llm: LLM, request_id: str, prompt: list[int],
               params: SamplingParams) -> list[TokenOutput]:
    outputs = []
    fresh(llm).core.add_request(request_id, prompt, params)
    while llm.core.has_unfinished():
        outputs += [o for o in llm.core.step() if o.request_id == request_id]
    return outputs


def test_prompt_logprobs_score_the_prompt_like_decoding_did(
        llm: LLM, smollm2_tokenizer: Tokenizer) -> None:
    prompt = smollm2_tokenizer.encode(STORY)
    outputs = run_to_end(llm, "gen", prompt, replace(GREEDY, max_tokens=6, logprobs=2))
    generated = [t for o in outputs for t in o.token_ids]
    decoded = [lp for o in outputs for lp in o.logprobs]
    assert [len(top) for o in outputs for top in o.top_logprobs] == [2] * 6
    assert all(o.prompt_logprobs is None for o in outputs)  # not asked for
    # the same tokens scored as a prompt (prefill): the same log-probabilities
    scoring = replace(GREEDY, max_tokens=1, prompt_logprobs=3)
    first, *_ = run_to_end(llm, "score", prompt + generated, scoring)
    assert first.prompt_logprobs is not None and first.prompt_top_logprobs is not None
    assert len(first.prompt_logprobs) == len(prompt + generated) - 1
    assert first.prompt_logprobs[-6:] == pytest.approx(decoded, abs=0.1)
    assert all(math.isfinite(lp) and lp <= 0 for lp in first.prompt_logprobs)
    assert [len(top) for top in first.prompt_top_logprobs] == [3] * (len(prompt) + 5)
    # greedy tokens were the most likely ones, up to a tie: bf16 logits near 20 are 0.125
    # apart, and decode (the paged kernel) and prefill (sdpa) may round a near tie apart
    for token, top in zip(generated, first.prompt_top_logprobs[-6:], strict=True):
        scored = dict(top)
        assert token in scored and scored[token] >= top[0][1] - 0.25, (token, top)


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_chunking(llm: LLM) -> None:
    prompt = list(range(1000, 1100))
    scoring = replace(GREEDY, max_tokens=1, prompt_logprobs=0)
    [whole] = run_to_end(llm, "a", prompt, scoring)
    llm.core.add_request("warm", prompt, GREEDY)  # fill the prefix cache with these blocks
    while llm.core.has_unfinished():
        llm.core.step()
    budget = llm.core.scheduler.max_num_batched_tokens
    llm.core.scheduler.max_num_batched_tokens = 32  # four chunks
    try:
        llm.core.add_request("b", prompt, scoring)
        outputs = []
        while llm.core.has_unfinished():
            outputs += llm.core.step()
    finally:
        llm.core.scheduler.max_num_batched_tokens = budget
    [chunked] = outputs
    assert chunked.num_cached_tokens == 0
    # bfloat16 matmuls round differently by chunk shape (AMX kernels up to 2% here); a
    # misplaced or skipped position would be off by whole nats
    assert chunked.prompt_logprobs == pytest.approx(whole.prompt_logprobs, rel=0.04, abs=0.05)


def test_penalties_and_min_tokens_reach_the_sampler(llm: LLM,
                                                    smollm2_tokenizer: Tokenizer) -> None:
    prompt = smollm2_tokenizer.encode("1, 1, 1, 1, 1, 1, 1, 1,")
    plain = [t for o in run_to_end(llm, "p", prompt, replace(GREEDY, max_tokens=8))
             for t in o.token_ids]
    penalised = [t for o in run_to_end(llm, "q", prompt, replace(
        GREEDY, max_tokens=8, repetition_penalty=1.8)) for t in o.token_ids]
    assert plain != penalised
    eos = smollm2_tokenizer.eos_token_ids[0]
    held = run_to_end(llm, "m", prompt, replace(GREEDY, max_tokens=4, min_tokens=4,
                                                stop_token_ids=tuple(plain[:1])))
    tokens = [t for o in held for t in o.token_ids]
    assert len(tokens) == 4 and plain[0] not in tokens and eos not in tokens


def test_no_max_tokens_means_up_to_the_context(llm: LLM) -> None:
    request = fresh(llm).core.add_request("ctx", [1000, 1001], SamplingParams(max_tokens=None))
    assert request.params.max_tokens == llm.core.max_model_len - 2
    llm.core.abort("ctx")
