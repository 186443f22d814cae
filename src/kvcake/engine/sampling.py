"""The batched sampler (its parameters: :class:`kvcake.wire.sampling.SamplingParams`).

The sampler turns one row of logits per running sequence into one token per sequence.
Every step runs it on up to a whole decode batch, so it stays vectorised over rows:

    logits (num_seqs, vocab)
      |-- greedy rows ----------------------------------------------> argmax
      '-- random rows --> / temperature --> top-k --> top-p --> min-p --> exponential race

The exponential race draws ``q ~ Exponential(1)`` per vocabulary entry and takes
``argmax(probs / q)``, which picks token ``i`` with probability ``probs[i]`` (and never a token
of probability 0). It runs in log space, ``argmax(logit - log q)``, so no softmax is needed;
each filter becomes a per-row logit cutoff. A row with its own generator draws its ``q``
alone, so a seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.penalties import TokenHistory, penalise
from kvcake.wire.sampling import SamplingParams

TOP_P_CANDIDATES = 512  # largest logits top-p inspects before it sorts a whole row
# float32 logits (rows, vocab) -> each row's argmax (int64) and its log-probability (float32)
GreedyKernel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def skip_draws(generator: torch.Generator, tokens: int, vocab: int) -> None:
    """Move ``generator`` past what the sampler draws for ``tokens`` sampled tokens over
    ``vocab`` logits (one float32 uniform per logit each), so a seeded request continued on
    another instance draws what it would have drawn on one."""
    for _ in range(tokens):
        torch.empty(vocab).uniform_(generator=generator)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator a seeded request keeps for its whole life."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class SampleResult:
    """One token per row, its log-probability under the raw logits, and top alternatives.

    ``top_logprobs[row]`` is ``params[row].logprobs`` pairs ``(token_id, logprob)``, most
    likely first (empty for rows that asked for none); None when no row asked.
    """

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Sampler:
    """Batched sampling; ``seed`` makes unseeded rows reproducible too (for simulations).

    Without ``seed`` unseeded rows draw from torch's default generator. ``greedy`` (the CPU
    kernels' :meth:`~kvcake.engine.model.kernels.CpuKernels.greedy`) takes batches where every
    row is greedy, unpenalised and asks for no top alternatives: the common decode step.
    """

    def __init__(self, seed: int | None = None, greedy: GreedyKernel | None = None) -> None:
        self.seed = seed
        self._greedy = greedy
        self._shared: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None],
               histories: Sequence[TokenHistory] | None = None) -> SampleResult:
        """Pick one token per row of ``logits`` (num_seqs, vocab) under ``params[row]``.

        ``generators[row]`` (on the CPU or the logits' device) drives row ``row``'s randomness; None
        shares the sampler's. A seeded request keeps ``make_generator(params.seed)`` for its
        whole life and passes it every step. ``histories[row]`` feeds the row's penalties
        (needed when a row has any). Mismatched lengths or shapes raise InvalidParamsError.
        """
        _check_batch(logits, params, generators)
        if histories is None and any(p.penalised for p in params):
            raise InvalidParamsError("penalties and min_tokens need each row's token history")
        greedy = self._greedy
        if greedy is not None and _plainly_greedy(logits, params):
            token_ids, logprobs = greedy(logits.contiguous())
            return SampleResult(token_ids.tolist(), logprobs.tolist())
        with torch.no_grad():
            logits = logits.float()
            drawn_from = logits if histories is None else penalise(logits, params, histories)
            token_ids = self._choose(drawn_from, params, generators)  # (num_seqs,)
            # log_softmax(x)[i] == x[i] - logsumexp(x), without writing a (num_seqs, vocab)
            log_norm = _log_sum_exp(logits)  # (num_seqs, 1)
            chosen = logits.gather(1, token_ids.unsqueeze(1)) - log_norm
            top = _top_logprobs(logits, log_norm, params)
            return SampleResult(token_ids.tolist(), chosen.squeeze(1).tolist(), top)

    def _choose(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return logits.argmax(dim=-1)
        if len(rows) == len(params):
            return self._draw(logits, params, generators)
        token_ids = logits.argmax(dim=-1)
        index = torch.tensor(rows, device=logits.device)
        token_ids[index] = self._draw(logits[index], [params[i] for i in rows],
                                      [generators[i] for i in rows])
        return token_ids

    def _draw(self, logits: torch.Tensor, params: Sequence[SamplingParams],
              generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Sample every row of ``logits`` (rows, vocab): all rows are non-greedy.

        The race runs in log space, ``argmax(x - log q)``: no softmax is needed (the race is
        blind to normalisation), and every filter is one per-row cutoff on ``x``.
        """
        temperatures = [p.temperature for p in params]
        scaled = logits
        if any(t != 1.0 for t in temperatures):
            scaled = logits / _column(temperatures, logits)
        cutoff = _cutoffs(scaled, params)  # (rows, 1) or None
        scores = scaled - self._exponential(scaled, generators).log_()
        if cutoff is not None:
            scores.masked_fill_(scaled < cutoff, -math.inf)
        return scores.argmax(dim=-1)

    def _exponential(self, like: torch.Tensor,
                     generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Exponential(1) noise shaped like ``like``; each seeded row from its own generator.

        Drawn as ``-log(u)`` (several times faster than ``exponential_`` on CPU), with ``u``
        kept off 0 and 1 so the noise is finite and positive. A seeded row draws ``u`` on its
        generator's device (requests keep CPU generators), so a seed draws the same noise on
        every device.
        """
        uniform = torch.empty_like(like)
        if any(g is None for g in generators):
            uniform.uniform_(generator=self._shared_generator(like.device))
        elsewhere = [row for row, g in enumerate(generators)
                     if g is not None and g.device != uniform.device]
        for row, generator in enumerate(generators):
            if generator is not None and generator.device == uniform.device:
                uniform[row].uniform_(generator=generator)
        if elsewhere:  # requests keep CPU generators: draw their rows there, copy them once
            drawn = torch.empty(len(elsewhere), uniform.shape[1], dtype=uniform.dtype)
            for index, row in enumerate(elsewhere):
                drawn[index].uniform_(generator=generators[row])
            uniform[elsewhere] = drawn.to(uniform.device)
        info = torch.finfo(uniform.dtype)
        return uniform.clamp_(info.tiny, 1.0 - info.eps / 2).log_().neg_()

    def _shared_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._shared:
            self._shared[device] = make_generator(self.seed, device)
        return self._shared[device]


def _check_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> None:
    if logits.dim() != 2:
        raise InvalidParamsError(f"logits must be (num_seqs, vocab), got shape "
                                 f"{tuple(logits.shape)}")
    if not len(params) == len(generators) == logits.shape[0]:
        raise InvalidParamsError(f"logits has {logits.shape[0]} rows but params has "
                                 f"{len(params)} and generators {len(generators)}")


def _plainly_greedy(logits: torch.Tensor, params: Sequence[SamplingParams]) -> bool:
    """CPU float32 rows that are all greedy, unpenalised and ask for no top alternatives."""
    return (logits.dtype == torch.float32 and logits.device.type == "cpu"
            and all(p.greedy and p.logprobs is None and not p.penalised for p in params))


def _column(values: Sequence[float | int], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a (len, 1) column on ``like``'s device and dtype."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _log_sum_exp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim (rows, 1), fast on CPU for peaked rows.

    ``exp`` of a value far below the row's peak is a denormal float, which CPUs process
    about 20x slower; such terms add under 1e-30 of the sum, so they are raised to e^-80.
    """
    peak = x.amax(dim=-1, keepdim=True)
    return (x - peak).clamp_min_(-80.0).exp_().sum(dim=-1, keepdim=True).log_() + peak


def _cutoffs(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
    """The smallest logit each row keeps after top-k, then top-p, then min-p (rows, 1).

    min-p keeps ``p >= min_p * p_max``, i.e. ``x >= x_max + log(min_p)``: a logit cutoff that
    top-k and top-p never change (they always keep the top token). None: no row filters.
    """
    vocab = scaled.shape[1]
    top_ks = [min(p.top_k, vocab) for p in params]
    top_ps = [p.top_p for p in params]
    cutoff = None
    if any(top_ks) or any(p < 1.0 for p in top_ps):
        cutoff = _top_k_top_p_cutoff(scaled, top_ks, top_ps).unsqueeze(1)
    min_ps = [p.min_p for p in params]
    if any(min_ps):
        floor = scaled.amax(dim=-1, keepdim=True) + _column(min_ps, scaled).log()
        cutoff = floor if cutoff is None else torch.maximum(cutoff, floor)
    return cutoff


def _top_k_top_p_cutoff(scaled: torch.Tensor, top_ks: list[int],
                        top_ps: list[float]) -> torch.Tensor:
    """Per-row cutoffs (rows,) from the few largest logits, falling back to a full sort.

    Sorting the whole vocabulary is the slow part, so top-p first looks only at the
    ``TOP_P_CANDIDATES`` largest logits; a row whose kept mass reaches past them (a very
    flat distribution) is sorted in full.
    """
    needs_p = any(p < 1.0 for p in top_ps)
    width = min(scaled.shape[1], max(*top_ks, TOP_P_CANDIDATES if needs_p else 1))
    ks = torch.tensor(top_ks, device=scaled.device)
    ps = torch.tensor(top_ps, dtype=scaled.dtype, device=scaled.device)
    candidates = scaled.topk(width, dim=-1).values  # (rows, width), descending
    cutoff, resolved = _cutoff_among(candidates, scaled, ks, ps)
    if not bool(resolved.all()):
        rows = (~resolved).nonzero().squeeze(1)
        ordered = scaled[rows].sort(dim=-1, descending=True).values  # (unresolved, vocab)
        cutoff[rows] = _cutoff_among(ordered, scaled[rows], ks[rows], ps[rows])[0]
    return cutoff


def _cutoff_among(candidates: torch.Tensor, scaled: torch.Tensor, ks: torch.Tensor,
                  ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cutoffs (rows,) computed from each row's largest logits ``candidates`` (descending).

    ``resolved[row]`` is False when top-p would keep tokens beyond the candidates. In sorted
    order a token is dropped once the mass strictly before it reaches ``p`` (the kept set is
    the shortest prefix whose mass reaches ``p``; the top token always stays)::

        candidates  [ x0  x1  x2 | x3 ... ]      ks = 3: x3.. are out of the top-k
        mass before [ 0  .55 .80 |            ]  p = .7: x2 is dropped -> cutoff x1
    """
    width = candidates.shape[1]
    position = torch.arange(width, device=candidates.device)
    in_top_k = (ks == 0).unsqueeze(1) | (position < ks.unsqueeze(1))  # (rows, width)
    kept = candidates.masked_fill(~in_top_k, -math.inf)
    kth = candidates.gather(1, (ks.clamp_min(1) - 1).unsqueeze(1)).squeeze(1)
    k_cut = torch.where(ks > 0, kth, -math.inf)
    # Top-p measures mass under the top-k-renormalised distribution.
    log_norm = _log_sum_exp(kept)  # (rows, 1)
    if bool((ks == 0).any()):
        log_norm = torch.where((ks > 0).unsqueeze(1), log_norm, _log_sum_exp(scaled))
    probs = (kept - log_norm).exp()
    cumulative = probs.cumsum(dim=-1)
    keep = (cumulative - probs < ps.unsqueeze(1)) & in_top_k
    keep[:, 0] = True
    p_cut = kept.masked_fill(~keep, math.inf).amin(dim=-1)
    cutoff = torch.where(ps < 1.0, torch.maximum(p_cut, k_cut), k_cut)
    resolved = (ps >= 1.0) | (ks > 0) | (cumulative[:, -1] >= ps)
    return cutoff, resolved


def _top_logprobs(logits: torch.Tensor, log_norm: torch.Tensor,
                  params: Sequence[SamplingParams]) -> list[list[tuple[int, float]]] | None:
    counts = [p.logprobs for p in params]
    if all(n is None for n in counts):
        return None
    widest = max(n or 0 for n in counts)
    if widest == 0:
        return [[] for _ in counts]
    values, ids = logits.topk(widest, dim=-1)  # (num_seqs, widest) each
    pairs = zip(ids.tolist(), (values - log_norm).tolist(), strict=True)
    return [list(zip(row_ids[:n or 0], row_values[:n or 0], strict=True))
            for (row_ids, row_values), n in zip(pairs, counts, strict=True)]
