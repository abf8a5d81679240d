"""Sampling shared by drafter and verifier: logits -> processed probabilities -> token.

Both sides apply the *same* processing (temperature, top-k, top-p) so that the rejection rule compares
the distributions that are really sampled from. Temperature 0 means greedy: the processed distribution
is the one-hot of the argmax.

Sparse draft distributions: the drafter samples from its processed distribution truncated to at most
``max_support`` entries (the most probable ones, renormalised). The verifier receives exactly that
truncated distribution, so the rejection rule stays exact (lossless) while the wire carries a few hundred
bytes per drafted token instead of a vocabulary-sized vector. The cap only lowers acceptance a little
when the drafter's processed distribution has mass outside its top ``max_support`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_MAX_SUPPORT = 64


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
    """A generator for one role of one generation; ``stream`` separates drafter and verifier draws."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) * 1_000_003 + stream) % (2**63))
    return gen


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed probabilities for each row of ``logits`` ([..., vocab] -> [..., vocab], float32).

    Greedy rows become one-hot at the argmax. ``-inf`` logits get probability 0; a row that is entirely
    ``-inf`` is an error of the model, reported rather than turned into NaNs.
    """
    logits = logits.float()
    if params.greedy:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if torch.isneginf(logits).all(dim=-1).any():
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
