"""Sampling shared by drafter and verifier: logits -> processed probabilities -> token.

Both sides apply the *same* processing (temperature, top-k, top-p) so that the rejection rule compares
the distributions that are really sampled from. Temperature 0 means greedy: the processed distribution
is the one-hot of the argmax.

Sparse draft distributions: the drafter samples from its processed distribution truncated to at most
``max_support`` entries (the most probable ones, renormalised). The verifier receives exactly that
truncated distribution, so the rejection rule stays exact (lossless) while the wire carries a few hundred
bytes per drafted token instead of a vocabulary-sized vector. The cap only lowers acceptance a little
when the drafter's processed distribution has mass outside its top ``max_support`` tokens.

Seeded generations sample by position (``position_noise``, ``race``): the token at sequence position i is
``argmax_x p(x) / E_i(x)`` with ``E_i`` a vector of Exp(1) draws keyed by (seed, i) alone (the exponential
race, the Gumbel-max trick in another form), which is an exact draw from ``p``. The drafter races its own
distribution against the same noise, and the verifier keeps a drafted token while it equals the target's
race winner (``verification.verify_coupled``). Each emitted token is then the one the target model alone
would sample at that position with that seed: a seeded generation gives the same tokens whatever the draft
lengths, the load, the batch, the drafter (or none: ``--no-draft``), and on any host. The noise is drawn
on the CPU with torch's Mersenne twister, so it does not depend on the device either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import SamplingParams

DEFAULT_MAX_SUPPORT = 64


def make_generator(seed: int | None, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
    """A generator for one role of one generation; ``stream`` separates drafter and verifier draws."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) * 1_000_003 + stream) % (2**63))
    return gen


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a generator seed per position, unrelated between neighbours."""
    mask = 2**64 - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & (2**63 - 1)


def position_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Exp(1) draws [vocab_size] (float32, CPU) for the token at sequence ``position`` of a seeded generation.

    The same on every host and device, and each a prefix of the longer vectors (a drafter whose vocabulary
    is shorter than its target's races the same noise over the ids it has).
    """
    gen = torch.Generator().manual_seed(_mix(seed, position))
    uniform = torch.rand(vocab_size, generator=gen, dtype=torch.float64)  # [0, 1)
    return (-torch.log1p(-uniform)).float().clamp_min_(1e-30)  # no division by 0 below


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: ``argmax probs / noise`` over the last dim, an exact draw from ``probs``
    ([..., vocab] -> [...]; a token of probability 0 never wins)."""
    return (probs / noise.to(probs.device)[..., : probs.shape[-1]]).argmax(dim=-1)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams, check: bool = True) -> torch.Tensor:
    """Processed probabilities for each row of ``logits`` ([..., vocab] -> [..., vocab], float32).

    Greedy rows become one-hot at the argmax. ``-inf`` logits get probability 0; a row that is entirely
    ``-inf`` is an error of the model, reported rather than turned into NaNs (``check``; the check reads
    the logits on the host: code that must not wait for the device checks its result later instead).
    """
    logits = logits.float()
    if params.greedy:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if check and torch.isneginf(logits).all(dim=-1).any():
        raise ValueError("a row of logits is entirely -inf")
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return probs


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches ``top_p`` (always >= 1 token)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a 1-D probability vector (argmax when it is one-hot)."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class SparseDist:
    """A distribution over at most ``max_support`` token ids: ``token_ids`` [S] with ``probs`` [S] summing to 1."""

    token_ids: torch.Tensor  # [S] int64
    probs: torch.Tensor  # [S] float32

    def to_dense(self, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        dense = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        return dense.scatter_(0, self.token_ids.to(device), self.probs.to(device, torch.float32))


def truncate_support(probs: torch.Tensor, max_support: int = DEFAULT_MAX_SUPPORT) -> SparseDist:
    """The ``max_support`` most probable entries of a 1-D distribution, renormalised (zeros dropped)."""
    top = torch.topk(probs, min(max_support, probs.shape[-1]))
    keep = top.values > 0
    values, ids = top.values[keep], top.indices[keep]
    return SparseDist(token_ids=ids.cpu(), probs=(values / values.sum()).float().cpu())


def sample_sparse(dist: SparseDist, generator: torch.Generator | None) -> int:
    """Draw a token id from a sparse distribution."""
    idx = int(torch.multinomial(dist.probs, 1, generator=generator).item())
    return int(dist.token_ids[idx].item())


Pick = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]  # token [1], ids [S], probs [S], conf [1]


def draft_pick(
    logits: torch.Tensor,
    params: SamplingParams,
    position: int,
    seed: int,
    max_support: int = DEFAULT_MAX_SUPPORT,
) -> Pick:
    """A drafter's token at sequence ``position`` from its logits [vocab], computed where the logits are and
    never read on the host (a drafter on a GPU drafts a whole block before its one wait, ``ModelRunner``'s
    stepped rows): the token [1], the sparse distribution it was drawn from (ids [S], probs [S], zero
    entries padding a support below S), and the drafter model's own probability of it (softmax at
    temperature 1) [1]. ``picked`` turns it into host values.

    Greedy: the argmax, a one-token support. Seeded: the race against the target's noise at ``position``
    (the coupled rule). Otherwise an inverse-CDF draw over the truncated support with a uniform keyed by
    (``seed``, ``position``), so the draft at a position does not depend on when it was made.
    """
    logits = logits.float()
    device = logits.device
    if params.greedy:
        token = logits.argmax(dim=-1, keepdim=True)  # [1]
        ids, probs = token, torch.ones(1, device=device)
    else:
        top = torch.topk(logits_to_probs(logits, params, check=False), min(max_support, logits.shape[-1]))
        ids, probs = top.indices, top.values / top.values.sum()  # [S]
        if params.seed is not None:
            index = race(probs, position_noise(params.seed, position, logits.shape[-1]).to(device)[ids])
        else:
            uniform = torch.rand(1, generator=make_generator(seed, stream=position)).to(device)
            below = (probs.cumsum(0) < uniform).sum()  # the first index whose CDF reaches the uniform
            index = torch.minimum(below, (probs > 0).sum() - 1)  # rounding never picks a zero entry
        token = ids[index].reshape(1)
    return token, ids, probs, torch.softmax(logits, dim=-1)[token]


def picked(pick: Pick) -> tuple[int, SparseDist, float]:
    """A ``draft_pick`` on the host: (token, its sparse distribution without zero entries, confidence)."""
    token, ids, probs, confidence = (t.cpu() for t in pick)
    if not torch.isfinite(probs).all():
        raise ValueError("the drafter's logits gave no distribution (a row entirely -inf, or NaN)")
    keep = probs > 0
    return int(token), SparseDist(ids[keep], probs[keep].float()), float(confidence)
