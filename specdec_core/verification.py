"""The rejection rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023). No I/O.

Vocabulary used throughout:
  * *drafted* tokens ``x_1..x_k`` were sampled by the drafter from ``draft_probs``;
  * a drafted token is *accepted* with probability ``min(1, target_probs[x] / draft_probs[x])``, in order,
    stopping at the first rejection;
  * at the first rejection the *recovered* token is drawn from ``norm(max(0, target_probs - draft_probs))``
    at that position;
  * when all ``k`` are accepted, the *bonus* token is drawn from the target's distribution at position
    ``k + 1``.
Every emitted token is then distributed exactly as the target model's own sampling would be. For greedy
decoding the rule reduces to: accept while the drafted token is the target's argmax, then emit the argmax.

Seeded generations use the coupled rule instead (``verify_coupled``): the target's token at each position
is the winner of an exponential race keyed by (seed, position) (``sampling.race``), an exact draw from its
distribution; drafted tokens are kept while they equal it. The emitted tokens are then exactly what the
target alone samples with that seed, so a seeded generation is reproducible whatever was drafted. The
price: a drafter racing its own distribution against the same noise matches with a probability somewhat
below the rejection rule's ``1 - TV(p, q)`` (docs/serving.md gives the measured figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import race


@dataclass(frozen=True)
class Verdict:
    """Outcome of one verification: ``num_accepted`` drafted tokens kept, then ``next_token``.

    ``next_token`` is the recovered token when ``num_accepted < k`` and the bonus token otherwise.
    """

    num_accepted: int
    next_token: int


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Greedy verification: accept the longest prefix equal to the target's argmax.

    draft_tokens: [k] int64; target_logits (or probabilities): [k + 1, vocab].
    """
    return _verify_by_tokens(draft_tokens, target_logits.argmax(dim=-1))


def verify_sampled(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative rejection sampling over one drafted block.

    draft_tokens: [k] int64 — the tokens the drafter sampled.
    draft_probs: [k, vocab] — the drafter's (processed, support-capped) distribution at each drafted position.
    target_probs: [k + 1, vocab] — the target's processed distribution at each drafted position plus one.
    generator: drives the k acceptance draws and the final draw; same device as ``target_probs``.
    """
    k = draft_tokens.shape[0]
    device = target_probs.device
    draft_tokens = draft_tokens.to(device)
    draft_probs = draft_probs.to(device)
    rows = torch.arange(k, device=device)
    p_target = target_probs[rows, draft_tokens]  # [k]
    p_draft = draft_probs[rows, draft_tokens]  # [k]
    uniforms = torch.rand(k, generator=generator, device=device)  # [k]
    # accept iff u < p_target / p_draft, written without the division (p_draft > 0 for a sampled token)
    n = _leading(uniforms * p_draft < p_target)
    # the next token's distribution at every position a rejection may happen, then the bonus: the one at n
    # is drawn from, all on the device (one wait, for the verdict)
    recovered = (target_probs[:k] - draft_probs).clamp_min(0.0)  # [k, vocab]
    total = recovered.sum(dim=-1, keepdim=True)
    # total == 0 only when target == draft at a position, where a rejection has probability 0; guard rounding
    recovered = torch.where(total > 0, recovered / total, target_probs[:k])
    next_probs = torch.cat([recovered, target_probs[k:]]).index_select(0, n.reshape(1))[0]  # [vocab]
    next_token = torch.multinomial(next_probs, 1, generator=generator)  # [1]
    return _verdict(n, next_token, target_probs)


def verify_coupled(draft_tokens: torch.Tensor, target_probs: torch.Tensor, noise: torch.Tensor) -> Verdict:
    """Coupled verification of a seeded block: accept the longest prefix equal to the target's race winners.

    draft_tokens: [k]; target_probs: [k + 1, vocab] processed; noise: [k + 1, >= vocab] Exp(1) draws keyed by
    (seed, position) of each of the k + 1 positions (``sampling.position_noise``).
    """
    return _verify_by_tokens(draft_tokens, race(target_probs, noise), target_probs)


def _verify_by_tokens(
    draft_tokens: torch.Tensor, target_tokens: torch.Tensor, probs: torch.Tensor | None = None
) -> Verdict:
    """Keep drafts while they equal the target's chosen tokens [k + 1]; emit the target's next one."""
    k = draft_tokens.shape[0]
    n = _leading(draft_tokens.to(target_tokens.device) == target_tokens[:k])
    return _verdict(n, target_tokens.index_select(0, n.reshape(1)), probs)


def _leading(accepted: torch.Tensor) -> torch.Tensor:
    """How many of ``accepted`` [k] (bool) are true before the first false: a 0-dim tensor, on its device."""
    return accepted.long().cumprod(dim=0).sum()


def _verdict(n: torch.Tensor, next_token: torch.Tensor, probs: torch.Tensor | None = None) -> Verdict:
    """The verdict on the host: the round's one wait for the device. ``probs``: checked to be a distribution
    in the same wait (logits that were entirely -inf or NaN are the model's error, reported)."""
    values = [n.reshape(1), next_token.reshape(1).to(n.dtype)]
    if probs is not None:
        values.append(torch.isfinite(probs).all().reshape(1).to(n.dtype))
    host = torch.cat(values).tolist()
    if probs is not None and not host[2]:
        raise ValueError("the target's logits gave no distribution (a row entirely -inf, or NaN)")
    return Verdict(num_accepted=int(host[0]), next_token=int(host[1]))
