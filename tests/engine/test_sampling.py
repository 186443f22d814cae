"""The batched Sampler: masks, seeding, penalties and log-probabilities."""

from __future__ import annotations

import pytest
import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.model.logprobs import score_tokens
from kvcake.engine.penalties import TokenHistory, penalise
from kvcake.engine.sampling import TOP_P_CANDIDATES, Sampler, make_generator
from kvcake.wire.sampling import SamplingParams

VOCAB = 64


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=make_generator(seed)) * 3.0


def sample_ids(logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None] | None = None) -> list[int]:
    generators = generators if generators is not None else [None] * len(params)
    return Sampler(seed=0).sample(logits, params, generators).token_ids


# ----- Sampler


def test_greedy_is_argmax() -> None:
    logits = random_logits(5)
    assert sample_ids(logits, [SamplingParams(temperature=0.0)] * 5) == (
        logits.argmax(dim=-1).tolist())
    cold = [SamplingParams(temperature=1e-4)] * 5  # sampled, but as sharp as argmax
    assert sample_ids(logits, cold) == logits.argmax(dim=-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = random_logits(6, seed=1)
    argmax = logits.argmax(dim=-1).tolist()
    assert sample_ids(logits, [SamplingParams(top_k=1)] * 6) == argmax
    assert sample_ids(logits, [SamplingParams(top_p=1e-6)] * 6) == argmax
    assert sample_ids(logits, [SamplingParams(min_p=1.0)] * 6) == argmax


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = random_logits(4, seed=2)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=1),
              SamplingParams(temperature=0.0)]
    ids = sample_ids(logits, params)
    argmax = logits.argmax(dim=-1).tolist()
    assert [ids[0], ids[2], ids[3]] == [argmax[0], argmax[2], argmax[3]]


def test_seeded_row_is_independent_of_its_batch() -> None:
    target = random_logits(1, seed=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7)

    def run(others: int, greedy_others: bool) -> list[int]:
        sampler, gen = Sampler(), make_generator(7)
        other_params = SamplingParams(temperature=0.0 if greedy_others else 0.8, top_p=0.5)
        tokens = []
        for step in range(20):
            logits = torch.cat([random_logits(others, seed=100 + step), target])
            batch = [other_params] * others + [params]
            gens: list[torch.Generator | None] = [None] * others + [gen]
            tokens.append(sampler.sample(logits, batch, gens).token_ids[-1])
        return tokens

    alone = run(0, False)
    assert run(3, False) == alone
    assert run(5, True) == alone
    assert len(set(alone)) > 1  # really sampling, not argmax


def test_sampler_seed_makes_unseeded_rows_reproducible() -> None:
    logits = random_logits(8, seed=4)
    params = [SamplingParams()] * 8
    first = Sampler(seed=11).sample(logits, params, [None] * 8).token_ids
    assert Sampler(seed=11).sample(logits, params, [None] * 8).token_ids == first


def draw_counts(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """How often each token is drawn when one row is repeated ``draws`` times."""
    logits = logits_row.expand(draws, -1).contiguous()
    ids = Sampler(seed=5).sample(logits, [params] * draws, [None] * draws).token_ids
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[1])


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    counts = draw_counts(probs.log(), SamplingParams(temperature=1.0), 4000)
    assert counts[3:].sum() == 0  # probability 0: never drawn
    assert torch.allclose(counts[:3] / 4000.0, probs[:3], atol=0.04)


def test_top_k_and_top_p_masked_tokens_are_never_drawn() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    top_k = draw_counts(logits, SamplingParams(temperature=2.0, top_k=3), 2000)
    assert top_k[3:].sum() == 0 and (top_k[:3] > 0).all()
    probs = torch.softmax(logits, dim=0)  # 0.64, 0.24, 0.09, ...: 0.9 needs three tokens
    assert probs[:2].sum() < 0.9 < probs[:3].sum()
    top_p = draw_counts(logits, SamplingParams(top_p=0.9), 2000)
    assert top_p[3:].sum() == 0 and (top_p[:3] > 0).all()
    both = draw_counts(logits, SamplingParams(top_p=0.9, top_k=2), 2000)
    assert both[2:].sum() == 0 and (both[:2] > 0).all()


def reference_kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """Top-k, then top-p, then min-p, one token at a time (the specification)."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if params.top_k:
        order = order[: params.top_k]
    probs = torch.softmax(logits[order] / params.temperature, dim=0).tolist()
    kept: list[tuple[int, float]] = []
    mass = 0.0
    for token, prob in zip(order, probs, strict=True):
        if kept and mass >= params.top_p:
            break
        kept.append((token, prob))
        mass += prob
    return {t for t, p in kept if p >= params.min_p * kept[0][1]}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=7),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=12, top_p=0.8),
    SamplingParams(temperature=2.0, top_p=0.95, min_p=0.3),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.99, min_p=0.01),
])
def test_filters_keep_exactly_the_reference_set(params: SamplingParams) -> None:
    logits = random_logits(1, seed=8)[0] / 3.0
    kept = reference_kept(logits, params)
    drawn = set(draw_counts(logits, params, 6000).nonzero().squeeze(1).tolist())
    assert drawn == kept


def test_top_p_past_the_candidates_sorts_the_row() -> None:
    vocab = 4 * TOP_P_CANDIDATES
    logits = torch.linspace(0.0, 2.0, vocab)  # nearly flat: half the mass is ~1500 tokens
    params = SamplingParams(top_p=0.5)
    kept = reference_kept(logits, params)
    assert len(kept) > TOP_P_CANDIDATES
    drawn = set(draw_counts(logits, params, 3000).nonzero().squeeze(1).tolist())
    assert drawn <= kept and len(drawn) > TOP_P_CANDIDATES


def test_min_p_masks_unlikely_tokens() -> None:
    logits = torch.tensor([2.0, 2.0, 0.0, -5.0])  # token 2 has 0.135x the top probability
    counts = draw_counts(logits, SamplingParams(min_p=0.2), 2000)
    assert counts[2:].sum() == 0 and (counts[:2] > 0).all()


def test_logprobs_are_the_raw_log_softmax() -> None:
    logits = random_logits(3, seed=6)
    params = [SamplingParams(temperature=0.5, top_k=5, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=0), SamplingParams()]
    result = Sampler(seed=0).sample(logits, params, [None] * 3)
    expected = torch.log_softmax(logits, dim=-1)
    for row, token in enumerate(result.token_ids):
        assert result.logprobs[row] == pytest.approx(expected[row, token].item(), abs=1e-6)
    assert result.top_logprobs is not None
    assert [len(row) for row in result.top_logprobs] == [3, 0, 0]
    values, ids = expected[0].topk(3)
    assert [i for i, _ in result.top_logprobs[0]] == ids.tolist()
    assert [v for _, v in result.top_logprobs[0]] == pytest.approx(values.tolist(), abs=1e-6)
    assert Sampler().sample(logits, [SamplingParams()] * 3, [None] * 3).top_logprobs is None


def test_sample_rejects_mismatched_batches() -> None:
    with pytest.raises(InvalidParamsError, match="rows"):
        Sampler().sample(random_logits(2), [SamplingParams()], [None])
    with pytest.raises(InvalidParamsError, match="shape"):
        Sampler().sample(torch.zeros(VOCAB), [SamplingParams()], [None])


# ----- penalties, min_tokens and seeds (vLLM's definitions)


def test_penalties_change_logits_as_vllm_defines_them() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -3.0]])
    history = TokenHistory(prompt_token_ids=[0, 1], output_token_ids=[2, 2, 3])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25)
    got = penalise(logits, [params], [history])
    # token 0: prompt only, repetition (positive: divided); 1: prompt, negative: multiplied;
    # 2: twice in the output, 3: once; 4: never seen, untouched
    expected = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 * 2 - 0.25, 1.0 / 2 - 0.5 - 0.25, -3.0]
    assert got[0].tolist() == pytest.approx(expected)
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 1.0, -3.0]  # the input is left alone


def test_penalties_steer_the_draw_but_logprobs_stay_raw() -> None:
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0]])
    history = TokenHistory(prompt_token_ids=[1], output_token_ids=[0, 0])
    greedy = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    result = Sampler().sample(logits, [greedy], [None], [history])
    assert result.token_ids == [1]  # token 0 lost 2.0 to its two repeats
    assert result.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


def test_min_tokens_holds_back_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0]])  # 1 is EOS, 2 a stop token
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    early = TokenHistory([0], [3], stop_token_ids=frozenset({1, 2}))
    late = TokenHistory([0], [3, 3], stop_token_ids=frozenset({1, 2}))
    assert Sampler().sample(logits, [params], [None], [early]).token_ids == [3]
    assert Sampler().sample(logits, [params], [None], [late]).token_ids == [1]


def test_penalised_rows_need_a_history() -> None:
    with pytest.raises(InvalidParamsError, match="history"):
        Sampler().sample(random_logits(1), [SamplingParams(presence_penalty=1.0)], [None])


def test_a_seed_draws_the_same_tokens_whatever_shares_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = random_logits(3, seed=8)

    def draw(rows: list[int]) -> list[int]:
        generator = make_generator(1234)
        ids = []
        for _ in range(5):
            batch = logits[rows]
            batch_params = [params if row == 0 else SamplingParams() for row in rows]
            gens = [generator if row == 0 else None for row in rows]
            ids.append(Sampler().sample(batch, batch_params, gens).token_ids[0])
        return ids

    assert draw([0]) == draw([0, 1, 2])


def test_scored_tokens_are_the_log_softmax_of_their_logits() -> None:
    logits = random_logits(4, seed=9)
    targets = torch.tensor([3, 0, 63, 7])
    chosen, tops = score_tokens(logits, targets, 2)
    expected = torch.log_softmax(logits, dim=-1)
    assert chosen == pytest.approx(expected[torch.arange(4), targets].tolist(), abs=1e-6)
    values, ids = expected.topk(2, dim=-1)
    assert [[i for i, _ in row] for row in tops] == ids.tolist()
    assert [v for row in tops for _, v in row] == pytest.approx(values.flatten().tolist(),
                                                                abs=1e-6)
    assert score_tokens(logits, targets, 0)[1] == [[], [], [], []]
