"""What the coupled rule of seeded generations costs in acceptance, on a real pair.

For each benchmark prompt the target samples a continuation (temperature T); target and drafter then see
that text in one forward each, giving p (target) and q (drafter, truncated to its support cap as the
drafter sends it) at every position. Per position:

* the rejection rule accepts a drafted token with probability ``1 - TV(p, q)`` (exact);
* the coupled rule accepts when the drafter's race winner over q equals the target's over p, both against
  the same Exp(1) noise; estimated from ``--draws`` noise draws per position, exactly simulated: tokens in
  q's support and p's top 512 get their own draw, the rest of p's mass races as one Exp(p_rest) draw.

    python -m benchmarks.coupling [--temperatures 0.8,1.0] [--prompts 4] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from specdec_core import models
from specdec_core.sampling import DEFAULT_MAX_SUPPORT, SamplingParams, logits_to_probs, truncate_support

from .common import load_prompts

TOP = 512


def coupled_match(p: torch.Tensor, q_ids: torch.Tensor, q_probs: torch.Tensor, draws: int, gen) -> float:
    """Estimated P(race winner over q == race winner over p) for one position (p dense [V], q sparse)."""
    top = torch.topk(p, TOP).indices
    ids = torch.unique(torch.cat([top, q_ids]))  # tokens that race on their own
    p_own = p[ids]  # [S]
    p_rest = float(max(1.0 - p_own.sum().item(), 0.0))
    q_dense = torch.zeros_like(p_own)
    where = {int(t): i for i, t in enumerate(ids.tolist())}
    for t, w in zip(q_ids.tolist(), q_probs.tolist(), strict=True):
        q_dense[where[t]] = w
    noise = torch.empty(draws, len(ids)).exponential_(generator=gen)  # [draws, S]
    target_time = noise / p_own  # arrival times E / p (inf where p = 0)
    best_own, winner = target_time.min(dim=1)
    if p_rest > 0:  # the rest of p's tokens: the first of them arrives after Exp(p_rest)
        rest = torch.empty(draws).exponential_(generator=gen) / p_rest
        winner = torch.where(rest < best_own, torch.full_like(winner, -1), winner)
    draft_winner = (noise / q_dense).argmin(dim=1)  # q's support lies inside ids
    return (draft_winner == winner).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default=models.DEFAULT_DRAFTER)
    ap.add_argument("--target", default=models.DEFAULT_TARGET)
    ap.add_argument("--temperatures", default="0.8,1.0")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    target, tok = models.load_model(args.target)
    drafter, _ = models.load_model(args.drafter)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for temperature in (float(t) for t in args.temperatures.split(",")):
        params = SamplingParams(temperature=temperature)
        rejection, coupled = [], []
        for name, ids in load_prompts(tok, args.prompts):
            with torch.no_grad():
                out = target.generate(
                    torch.tensor([ids]),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    max_new_tokens=args.max_new_tokens,
                    pad_token_id=tok.eos_token_id,
                )
                full = out[:, : len(ids) + args.max_new_tokens]
                positions = slice(len(ids) - 1, full.shape[1] - 1)  # logits that predict each new token
                p_all = logits_to_probs(target(full).logits[0, positions], params)
                q_all = logits_to_probs(drafter(full).logits[0, positions], params)
            vocab = min(p_all.shape[-1], q_all.shape[-1])
            r_prompt, c_prompt = [], []
            for p, q in zip(p_all[:, :vocab], q_all[:, :vocab], strict=True):
                sparse = truncate_support(q, DEFAULT_MAX_SUPPORT)
                r_prompt.append(1.0 - 0.5 * (sparse.to_dense(vocab) - p).abs().sum().item())
                c_prompt.append(coupled_match(p, sparse.token_ids, sparse.probs, args.draws, gen))
            rejection += r_prompt
            coupled += c_prompt
            print(
                f"T={temperature} {name}: rejection {statistics.mean(r_prompt):.3f} "
                f"coupled {statistics.mean(c_prompt):.3f} ({len(r_prompt)} positions)",
                flush=True,
            )
        row = {
            "temperature": temperature,
            "positions": len(rejection),
            "rejection_rule": statistics.mean(rejection),
            "coupled_rule": statistics.mean(coupled),
            "ratio": statistics.mean(coupled) / statistics.mean(rejection),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"drafter": args.drafter, "target": args.target, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
