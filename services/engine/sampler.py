"""Next-token sampling, apart from the model: logits + per-row SamplingParams + per-row generators -> tokens.

`probs_from_logits` is the exact distribution `Sampler.sample` draws from (greedy rows: one-hot at the
argmax), and `draw` is how it draws, so speculative decoding's rejection sampler can reuse both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specserve.engine.config import SamplingParams
from specserve.engine.logprobs import TokenLogprob

# Top-k / top-p look at this many largest logits first: topk(1024) of a 49k vocabulary costs ~0.3 ms a
# row on CPU, a full sort ~3 ms. Rows whose nucleus reaches past it fall back to the full sort.
_HEAD = 1024


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:  # [num_rows, vocab] -> [num_rows] int64
    """Each row's first argmax. `max(dim=-1).indices` is documented to return the same index as
    `argmax(dim=-1)` (the first maximal value; a NaN counts as the maximum in both), and torch 2.13's CPU
    `argmax` over a vocabulary row is several times slower (tests/unit/engine/test_sampler.py checks
    the two agree on ties and NaN)."""
    return logits.max(dim=-1).indices


def probs_from_logits(
    logits: torch.Tensor,  # [num_rows, vocab] float32
    params: Sequence[SamplingParams],  # one per row
) -> torch.Tensor:  # [num_rows, vocab] float32, each row sums to 1
    """The filtered, temperature-scaled distribution of each row.

    Filters apply in HF `generate`'s order: temperature -> top-k -> top-p -> min-p, each on the
    renormalized distribution the previous one left. A filter keeps every token tied with the last
    token it keeps. Greedy rows (temperature 0) get a one-hot at the first argmax, which is what
    `Sampler.sample` picks for them.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(params), "one SamplingParams per row"
    greedy = torch.tensor([p.greedy for p in params])  # [num_rows] bool
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)  # [num_rows]
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)  # [num_rows], 0 = off
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)  # [num_rows], 1 = off
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)  # [num_rows], 0 = off

    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # [num_rows, vocab]
    if bool(((top_k > 0) | (top_p < 1.0)).any()):
        scaled = scaled.masked_fill(scaled < top_k_top_p_cutoff(scaled, top_k, top_p), float("-inf"))
    probs = scaled.softmax(dim=-1)
    if bool((min_p > 0).any()):
        # min-p keeps tokens whose probability is at least min_p times the most likely token's.
        threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [num_rows, 1]
        probs = scaled.masked_fill(probs < threshold, float("-inf")).softmax(dim=-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(1, greedy_tokens(logits)[:, None], 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def top_k_top_p_cutoff(
    logits: torch.Tensor,  # [num_rows, vocab]
    top_k: torch.Tensor,  # [num_rows] int64, 0 = off
    top_p: torch.Tensor,  # [num_rows] float32, 1 = off
) -> torch.Tensor:  # [num_rows, 1]: tokens with a logit below it are removed
    """The smallest logit that survives top-k and then top-p (on the renormalized top-k survivors)."""
    vocab = logits.shape[-1]
    top_k = top_k.clamp(max=vocab)
    cutoff, exact = _cutoff_within_head(logits, top_k, top_p, min(_HEAD, vocab))
    redo = (~exact).nonzero().flatten()  # rows whose top-k or nucleus reaches past the head
    if len(redo):
        cutoff[redo] = _cutoff_within_head(logits[redo], top_k[redo], top_p[redo], vocab)[0]
    return cutoff


def _cutoff_within_head(
    logits: torch.Tensor,  # [num_rows, vocab]
    top_k: torch.Tensor,  # [num_rows] int64, 0 = off, <= vocab
    top_p: torch.Tensor,  # [num_rows] float32, 1 = off
    head: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # cutoff [num_rows, 1], exact [num_rows] bool
    """The cutoff computed from the `head` largest logits; not `exact` where it may lie past them."""
    head_logits, head_ids = logits.topk(head, dim=-1)  # [num_rows, head], descending
    k = torch.where(top_k > 0, top_k.clamp(max=head), head)  # [num_rows]
    kth_largest = torch.where(top_k[:, None] > 0, head_logits.gather(1, k[:, None] - 1), float("-inf"))
    probs = logits.masked_fill(logits < kth_largest, float("-inf")).softmax(dim=-1)  # top-k renormalized
    head_probs = probs.gather(1, head_ids)  # [num_rows, head]
    # The nucleus is the shortest prefix whose mass reaches top_p: a token is in it while the mass
    # strictly before it is below top_p, so the first token always is. top_p == 1 is off outright, so
    # float rounding of the running sum cannot drop tail tokens.
    mass_before = head_probs.cumsum(dim=-1) - head_probs
    in_nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # [num_rows, head]
    keep = torch.minimum(k, in_nucleus.sum(dim=-1))  # [num_rows], tokens kept, 1..head
    cutoff = head_logits.gather(1, keep[:, None] - 1)  # [num_rows, 1]
    no_filter = (top_k == 0) & (top_p >= 1.0)
    cutoff = torch.where(no_filter[:, None], float("-inf"), cutoff)
    # Exact when top-k's threshold lies in the head and either top-k or the nucleus ends inside it.
    exact = no_filter | ((top_k <= head) & ((top_k > 0) | (keep < head))) | (head == logits.shape[-1])
    return cutoff, exact


def draw(
    probs: torch.Tensor,  # [num_rows, vocab], each row a distribution
    generators: Sequence[torch.Generator | None],  # one per row (may repeat); None = torch's global RNG
) -> torch.Tensor:  # [num_rows] int64
    """One token per row by inverse CDF, from one uniform of the row's own generator.

    A seeded row's draw so depends only on its probs and its generator, never on its batch-mates.
    (`torch.multinomial` would spend one exponential per vocabulary entry: ~1 ms a row at 49k tokens.)
    """
    assert probs.dim() == 2 and probs.shape[0] == len(generators), "one generator (or None) per row"
    uniforms = torch.tensor(
        [torch.rand(1, dtype=torch.float64, generator=g).item() for g in generators], dtype=torch.float64
    )  # [num_rows] in [0, 1)
    cdf = probs.double().cumsum(dim=-1)  # [num_rows, vocab]
    total = cdf[:, -1:]  # [num_rows, 1]
    # Token i owns [cdf[i-1], cdf[i]), so a zero-probability token (empty interval) is never drawn; the
    # target stays strictly below the total, where the last token with mass ends.
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def adjust_logits(
    logits: torch.Tensor,  # [num_rows, vocab] float32, rows of one sequence
    params: SamplingParams,
    context_ids: list[int],  # the sequence's tokens (prompt and output) before the rows' positions
    output_ids: list[int],  # the output part of context_ids
    extra_ids: Sequence[Sequence[int]] | None = None,  # per row: tokens generated after context_ids (a tree path)
) -> torch.Tensor:  # [num_rows, vocab], a new tensor
    """`params`' presence, frequency and repetition penalties, then its logit bias, on each row, as plain
    decoding would apply them at that row's position: row r's output is `output_ids` + `extra_ids[r]`.
    Speculative verification penalizes each tree row with its path, so greedy speculation still equals
    plain greedy decoding."""
    num_rows, vocab = logits.shape
    extra_ids = extra_ids or [()] * num_rows
    assert len(extra_ids) == num_rows
    extra = [torch.tensor(list(ids), dtype=torch.int64) for ids in extra_ids]

    def counts(ids: list[int]) -> torch.Tensor:  # [num_rows, vocab] occurrences, each row with its extra ids
        base = torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab).float()
        rows = base.repeat(num_rows, 1)
        for r, path in enumerate(extra):
            rows[r].index_add_(0, path, torch.ones(len(path)))
        return rows

    out = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = counts(context_ids) > 0
        scaled = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, scaled, out)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        occurrences = counts(output_ids)
        out -= params.frequency_penalty * occurrences + params.presence_penalty * (occurrences > 0).float()
    if params.logit_bias:
        tokens, biases = zip(*params.logit_bias)
        out[:, list(tokens)] += torch.tensor(biases, dtype=out.dtype)
    return out


def token_logprobs(
    logits: torch.Tensor,  # [num_tokens, vocab] float32, the row that produced each token
    token_ids: list[int],
    num_top: int,
) -> list[TokenLogprob]:
    """Each token's log probability in its row, and the `num_top` most likely tokens of the row."""
    assert logits.dim() == 2 and logits.shape[0] == len(token_ids)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [num_tokens, vocab]
    chosen = logp.gather(1, torch.tensor(token_ids, dtype=torch.int64)[:, None]).squeeze(1).tolist()
    if num_top == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    top_logp, top_ids = logp.topk(num_top, dim=-1)  # [num_tokens, num_top], descending
    return [TokenLogprob(t, lp, list(zip(ids, lps)))
            for t, lp, ids, lps in zip(token_ids, chosen, top_ids.tolist(), top_logp.tolist())]


def request_generator(params: SamplingParams) -> torch.Generator | None:
    """A sampled request's own generator: fresh entropy for an unseeded request (the global RNG is left
    alone); a seeded one's is reseeded before each step by `seed_for_position`. None for greedy requests."""
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    return generator


_MASK64 = (1 << 64) - 1


def seed_for_position(generator: torch.Generator | None, params: SamplingParams, position: int) -> None:
    """Reseed a seeded request's generator for the step that decides the token at `position`.

    The draws of a seeded request then depend on its seed and the position alone, not on how many draws
    came before on this replica: the verifier that takes a sequence over after a failure (and re-prefills
    it) continues the very text the lost one would have produced. The key is splitmix64 of the two.
    """
    if generator is None or params.seed is None:
        return
    z = (params.seed * 0x9E3779B97F4A7C15 + position) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    generator.manual_seed(z ^ (z >> 31))


class Sampler:
    """Greedy rows take the argmax (no generator needed); the others draw from `probs_from_logits`."""

    def sample(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab] float32
        params: Sequence[SamplingParams],  # one per row
        generators: Sequence[torch.Generator | None],  # one per row; unused for greedy rows
    ) -> torch.Tensor:  # [num_seqs] int64
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators)
        tokens = greedy_tokens(logits)  # [num_seqs]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            probs = probs_from_logits(logits[random_rows], [params[i] for i in random_rows])
            tokens[random_rows] = draw(probs, [generators[i] for i in random_rows])
        return tokens
