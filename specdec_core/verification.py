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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    target_tokens = target_logits.argmax(dim=-1)  # [k + 1]
    k = draft_tokens.shape[0]
    mismatch = (draft_tokens.to(target_tokens.device) != target_tokens[:k]).nonzero()
    n = int(mismatch[0, 0].item()) if mismatch.numel() else k
    return Verdict(num_accepted=n, next_token=int(target_tokens[n].item()))


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
    rejected = (uniforms * p_draft >= p_target).nonzero()
    n = int(rejected[0, 0].item()) if rejected.numel() else k
    if n == k:
        next_probs = target_probs[k]  # bonus
    else:
        next_probs = (target_probs[n] - draft_probs[n]).clamp_min(0.0)  # recovered
        total = next_probs.sum()
        # total == 0 only when target == draft at n, where a rejection has probability 0; guard rounding.
        next_probs = next_probs / total if total > 0 else target_probs[n]
    next_token = int(torch.multinomial(next_probs, 1, generator=generator).item())
    return Verdict(num_accepted=n, next_token=next_token)
