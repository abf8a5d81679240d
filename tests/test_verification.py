"""The rejection rule on hand-made distributions, including the statistical losslessness check."""

import math

import pytest
import torch

from specdec_core.sampling import (
    SamplingParams,
    logits_to_probs,
    make_generator,
    position_noise,
    race,
    sample_sparse,
    truncate_support,
)
from specdec_core.verification import Verdict, verify_coupled, verify_greedy, verify_sampled


def one_hot_logits(token_ids, vocab=6):
    logits = torch.full((len(token_ids), vocab), -1.0)
    logits[torch.arange(len(token_ids)), torch.tensor(token_ids)] = 5.0
    return logits


def test_greedy_all_accepted_gives_k_plus_one_tokens():
    verdict = verify_greedy(torch.tensor([1, 2, 3]), one_hot_logits([1, 2, 3, 4]))
    assert verdict == Verdict(num_accepted=3, next_token=4)


def test_greedy_rejection_at_position_zero():
    verdict = verify_greedy(torch.tensor([5, 2, 3]), one_hot_logits([1, 2, 3, 4]))
    assert verdict == Verdict(num_accepted=0, next_token=1)


def test_greedy_rejection_in_the_middle_and_k_zero():
    assert verify_greedy(torch.tensor([1, 2, 0]), one_hot_logits([1, 2, 3, 4])) == Verdict(2, 3)
    assert verify_greedy(torch.tensor([], dtype=torch.long), one_hot_logits([4])) == Verdict(0, 4)


def test_greedy_with_neg_inf_logits():
    logits = torch.full((2, 4), float("-inf"))
    logits[0, 2] = 0.0
    logits[1, 3] = -1.0
    assert verify_greedy(torch.tensor([2]), logits) == Verdict(1, 3)


def test_sampled_identical_distributions_accept_everything():
    probs = torch.softmax(torch.randn(4, 10), dim=-1)
    gen = make_generator(0)
    for _ in range(50):
        tokens = torch.multinomial(probs[:3], 1, generator=gen).squeeze(1)
        assert verify_sampled(tokens, probs[:3], probs, gen).num_accepted == 3


def test_sampled_token_impossible_under_target_is_rejected_at_zero():
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    draft = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    for seed in range(20):
        verdict = verify_sampled(torch.tensor([0]), draft, target, make_generator(seed))
        assert verdict.num_accepted == 0 and verdict.next_token in (1, 2)


def test_sampled_all_accepted_draws_bonus_from_last_row():
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    verdict = verify_sampled(torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.0]]), target, make_generator(3))
    assert verdict == Verdict(1, 2)


def test_sampled_seeded_determinism():
    target = torch.softmax(torch.randn(5, 30), -1)
    draft = torch.softmax(torch.randn(4, 30), -1)
    tokens = torch.multinomial(draft, 1).squeeze(1)
    runs = [
        [verify_sampled(tokens, draft, target, g) for _ in range(10)]
        for g in (make_generator(9), make_generator(9))
    ]
    assert runs[0] == runs[1]


def reference_verify(draft_tokens, draft_probs, target_probs, uniforms, final_draw):
    """Plain loop of the rule, driven by given random numbers (compared with the vectorised one)."""
    for i, tok in enumerate(draft_tokens.tolist()):
        if uniforms[i] < min(1.0, (target_probs[i, tok] / draft_probs[i, tok]).item()):
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        return i, final_draw(residual / residual.sum())
    return len(draft_tokens), final_draw(target_probs[len(draft_tokens)])


def test_vectorised_rule_matches_reference_loop():
    torch.manual_seed(0)
    for seed in range(200):
        target = torch.softmax(torch.randn(4, 12) * 2, -1)
        draft = torch.softmax(torch.randn(3, 12) * 2, -1)
        tokens = torch.multinomial(draft, 1).squeeze(1)
        g_fast, g_ref = make_generator(seed), make_generator(seed)
        fast = verify_sampled(tokens, draft, target, g_fast)
        uniforms = torch.rand(3, generator=g_ref).tolist()
        n, nxt = reference_verify(
            tokens, draft, target, uniforms, lambda p: int(torch.multinomial(p, 1, generator=g_ref).item())
        )
        assert (fast.num_accepted, fast.next_token) == (n, nxt)


# --- statistical losslessness ------------------------------------------------------------------------

VOCAB = 8
K = 3
DRAWS = 12000


def wrong_rule(draft_tokens, draft_probs, target_probs, generator):
    """A plausible bug: resample from the target itself instead of the residual max(0, target - draft)."""
    verdict = verify_sampled(draft_tokens, draft_probs, target_probs, generator)
    if verdict.num_accepted == len(draft_tokens):
        return verdict
    tok = int(torch.multinomial(target_probs[verdict.num_accepted], 1, generator=generator).item())
    return Verdict(verdict.num_accepted, tok)


def emitted_histograms(params, rule, max_support):
    """Empirical distribution of emitted tokens at positions 0 and 1 over many seeded rounds.

    Each position's target and draft rows are fixed (independent of the prefix), so a lossless rule
    emits position j's token distributed exactly as the processed target row j.
    """
    gen = torch.Generator().manual_seed(1234)
    target_logits = torch.randn(K + 1, VOCAB, generator=gen) * 1.5
    draft_logits = target_logits[:K] + torch.randn(K, VOCAB, generator=gen) * 1.5
    target_probs = logits_to_probs(target_logits, params)  # [K + 1, VOCAB]
    dists = [truncate_support(p, max_support) for p in logits_to_probs(draft_logits, params)]
    draft_probs = torch.stack([d.to_dense(VOCAB) for d in dists])  # [K, VOCAB]
    counts = torch.zeros(2, VOCAB)
    rng = make_generator(params.seed or 0)
    for _ in range(DRAWS):
        tokens = torch.tensor([sample_sparse(d, rng) for d in dists])
        verdict = rule(tokens, draft_probs, target_probs, rng)
        emitted = tokens[: verdict.num_accepted].tolist() + [verdict.next_token]
        for pos in range(min(2, len(emitted))):
            counts[pos, emitted[pos]] += 1
    return counts, target_probs[:2]


def tv_bound(probs, n):
    """~4 sigma above the expected total-variation distance of an n-draw empirical distribution."""
    return 4 * 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in probs.tolist()) + 1e-9


@pytest.mark.parametrize(
    "params,max_support",
    [
        (SamplingParams(temperature=1.0, seed=1), 64),
        (SamplingParams(temperature=0.7, seed=2), 64),
        (SamplingParams(temperature=1.3, top_k=5, seed=3), 64),
        (SamplingParams(temperature=1.0, top_p=0.85, seed=4), 64),
        (SamplingParams(temperature=1.0, seed=5), 3),  # support cap smaller than the draft's support
    ],
)
def test_emitted_tokens_follow_target_distribution(params, max_support):
    counts, target_rows = emitted_histograms(params, verify_sampled, max_support)
    for pos in range(2):
        n = counts[pos].sum().item()
        tv = 0.5 * (counts[pos] / n - target_rows[pos]).abs().sum().item()
        assert tv < tv_bound(target_rows[pos], n), f"position {pos}: TV {tv:.4f}"


def test_statistical_check_detects_a_wrong_rule():
    params = SamplingParams(temperature=1.0, seed=1)
    counts, target_rows = emitted_histograms(params, wrong_rule, 64)
    n = counts[0].sum().item()
    tv = 0.5 * (counts[0] / n - target_rows[0]).abs().sum().item()
    assert tv > tv_bound(target_rows[0], n)


# --- the coupled rule of seeded generations ----------------------------------------------------------


def coupled_rounds(params, max_support, draws=DRAWS):
    """Rounds of the coupled rule over seeds 0..draws-1 on the fixed rows of ``emitted_histograms``: the
    drafter races its truncated distribution against the same noise as the target.

    Returns (histograms of emitted tokens at positions 0 and 1, accepted-at-position-0 rate, the rejection
    rule's 1 - TV at position 0, target rows)."""
    gen = torch.Generator().manual_seed(1234)
    target_logits = torch.randn(K + 1, VOCAB, generator=gen) * 1.5
    draft_logits = target_logits[:K] + torch.randn(K, VOCAB, generator=gen) * 1.5
    target_probs = logits_to_probs(target_logits, params)
    dists = [truncate_support(p, max_support) for p in logits_to_probs(draft_logits, params)]
    counts, first_accepted = torch.zeros(2, VOCAB), 0
    for seed in range(draws):
        noise = torch.stack([position_noise(seed, 40 + pos, VOCAB) for pos in range(K + 1)])  # [K + 1, V]
        tokens = torch.tensor(
            [int(d.token_ids[race(d.probs, noise[j][d.token_ids])]) for j, d in enumerate(dists)]
        )
        verdict = verify_coupled(tokens, target_probs, noise)
        emitted = tokens[: verdict.num_accepted].tolist() + [verdict.next_token]
        first_accepted += int(verdict.num_accepted > 0)
        if len(emitted) < 2:  # the next round samples position 1 from the target with the same noise
            emitted.append(int(race(target_probs[1], noise[1])))
        for pos in range(2):
            counts[pos, emitted[pos]] += 1
    one_minus_tv = 1 - 0.5 * (dists[0].to_dense(VOCAB) - target_probs[0]).abs().sum().item()
    return counts, first_accepted / draws, one_minus_tv, target_probs[:2]


@pytest.mark.parametrize(
    "params,max_support",
    [(SamplingParams(temperature=1.0, seed=1), 64), (SamplingParams(temperature=0.7, top_p=0.9, seed=2), 3)],
)
def test_coupled_rule_emits_the_target_distribution(params, max_support):
    counts, accepted, one_minus_tv, target_rows = coupled_rounds(params, max_support, draws=6000)
    for pos in range(2):
        n = counts[pos].sum().item()
        tv = 0.5 * (counts[pos] / n - target_rows[pos]).abs().sum().item()
        assert tv < tv_bound(target_rows[pos], n), f"position {pos}: TV {tv:.4f}"
    # a drafter racing the same noise matches at least (1 - TV) / (1 + TV) of the time (Daliri et al. 2024),
    # and never more than the rejection rule's optimum 1 - TV
    tv0 = 1 - one_minus_tv
    assert (1 - tv0) / (1 + tv0) - 0.03 < accepted <= one_minus_tv + 0.03


def test_coupled_noise_is_keyed_by_seed_and_position_only():
    a = position_noise(5, 100, 1000)
    assert torch.equal(a, position_noise(5, 100, 1000))
    assert torch.equal(a[:300], position_noise(5, 100, 300))  # a shorter vocabulary races a prefix
    assert not torch.equal(a, position_noise(5, 101, 1000)) and not torch.equal(
        a, position_noise(6, 100, 1000)
    )
    assert (a > 0).all()
    # the race over a one-hot row picks its token whatever the noise; a zero-probability token never wins
    one_hot = torch.zeros(1000)
    one_hot[17] = 1.0
    assert int(race(one_hot, a)) == 17


def test_a_target_without_a_distribution_is_reported_by_the_verdict():
    """The probabilities are checked in the verdict's one wait for the device: NaN rows raise, not emit."""
    probs = torch.full((2, 4), float("nan"))
    with pytest.raises(ValueError, match="no distribution"):
        verify_coupled(torch.tensor([1]), probs, torch.ones(2, 4))
    with pytest.raises((ValueError, RuntimeError)):  # the CPU's multinomial refuses NaN on its own
        verify_sampled(torch.tensor([1]), torch.full((1, 4), 0.25), probs, make_generator(0))
