"""Unit tests of logits -> probabilities on hand-made logits."""

import math

import pytest
import torch

from specdec_core.sampling import SamplingParams, logits_to_probs, make_generator, sample, truncate_support

NEG = float("-inf")


def test_greedy_is_one_hot_at_argmax():
    probs = logits_to_probs(torch.tensor([[0.1, 3.0, -2.0], [5.0, 1.0, 4.9]]), SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_temperature_scales_softmax():
    logits = torch.tensor([1.0, 2.0, 3.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(probs, torch.softmax(logits / 2.0, dim=-1))


def test_neg_inf_logits_get_zero_probability():
    probs = logits_to_probs(torch.tensor([NEG, 0.0, NEG, 1.0]), SamplingParams(temperature=1.0))
    assert probs[0] == 0 and probs[2] == 0
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)
    assert not torch.isnan(probs).any()


def test_all_neg_inf_row_is_an_error():
    with pytest.raises(ValueError, match="-inf"):
        logits_to_probs(torch.full((4,), NEG), SamplingParams(temperature=1.0))


def test_greedy_with_neg_inf_picks_finite_max():
    assert logits_to_probs(torch.tensor([NEG, -5.0, NEG]), SamplingParams()).argmax().item() == 1


def test_top_k_keeps_k_most_probable():
    probs = logits_to_probs(torch.tensor([0.0, 3.0, 1.0, 2.0]), SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [False, True, False, True]
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_top_k_larger_than_vocab_is_noop():
    logits = torch.tensor([0.0, 1.0])
    assert torch.allclose(
        logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=10)), torch.softmax(logits, -1)
    )


def test_top_p_tiny_keeps_only_the_best_token():
    probs = logits_to_probs(torch.tensor([0.0, 3.0, 1.0]), SamplingParams(temperature=1.0, top_p=1e-6))
    assert probs.tolist() == [0.0, 1.0, 0.0]


def test_top_p_keeps_smallest_prefix_reaching_mass():
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(base.log(), SamplingParams(temperature=1.0, top_p=0.8))
    # 0.5 < 0.8, 0.5 + 0.3 = 0.8 reaches it: keep exactly the first two
    assert (probs > 0).tolist() == [True, True, False, False]
    assert torch.allclose(probs[:2], torch.tensor([0.5, 0.3]) / 0.8)


def test_top_p_one_is_noop_and_top_k_then_top_p_compose():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(
        logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=1.0)), torch.softmax(logits, -1)
    )
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.5))
    assert (probs > 0).tolist() == [False, False, False, True]


def test_invalid_params_rejected():
    for kwargs in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_truncate_support_caps_and_renormalises():
    probs = torch.softmax(torch.arange(100, dtype=torch.float32) / 10, dim=-1)
    dist = truncate_support(probs, max_support=8)
    assert dist.token_ids.tolist() == list(range(99, 91, -1))
    assert math.isclose(dist.probs.sum().item(), 1.0, rel_tol=1e-6)
    dense = dist.to_dense(100)
    assert torch.allclose(dense[92:], probs[92:] / probs[92:].sum())


def test_truncate_support_drops_zeros():
    dist = truncate_support(torch.tensor([0.0, 1.0, 0.0]), max_support=64)
    assert dist.token_ids.tolist() == [1] and dist.probs.tolist() == [1.0]


def test_seeded_sampling_is_reproducible():
    probs = torch.softmax(torch.randn(50), dim=-1)
    a = [sample(probs, make_generator(7)) for _ in range(3)]
    g1, g2 = make_generator(7), make_generator(7)
    assert [sample(probs, g1) for _ in range(20)] == [sample(probs, g2) for _ in range(20)]
    assert len(set(a)) == 1
