"""Integration tests of the runner and the generation loop on tiny random models of each family."""

import time

import pytest
import torch
from tiny import FAMILIES, hf_greedy, perturbed, tiny_model, tiny_tokenizer

from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import PRIOR_POSITIONS, AdaptiveDraftLength, FixedDraftLength, LengthMemory
from specdec_core.drafting import EarlyStop, ModelDrafter
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria

PROMPT = tiny_tokenizer()("def add(a, b):\n")["input_ids"]


class SlowRunner(ModelRunner):
    """A target runner whose every forward takes at least 30 ms longer (sleeping, so the GIL is free)."""

    def forward(self, rows):
        time.sleep(0.03)
        return super().forward(rows)


def run(
    target, drafter_model, params, max_new=40, k=4, policy=None, stop=None, runner_cls=None, drafter_cls=None
):
    decoder = SpeculativeDecoder((runner_cls or ModelRunner)(target), tiny_tokenizer())
    drafter = ModelDrafter((drafter_cls or ModelRunner)(drafter_model)) if drafter_model is not None else None
    stats = GenerationStats()
    out = []
    for chunk in decoder.generate(
        PROMPT,
        params,
        stop or StopCriteria(max_new_tokens=max_new),
        drafter,
        policy or FixedDraftLength(k),
        stats,
    ):
        out.extend(chunk.token_ids)
    return out, stats, decoder


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_then_reextend_matches_fresh_prefill(family):
    runner = ModelRunner(tiny_model(family))
    ids = PROMPT + [5, 17, 42, 8, 99, 3]
    seq = runner.new_sequence()
    runner.extend(seq, ids[:4])
    runner.extend(seq, [200, 201, 202])  # a rejected block
    runner.rollback(seq, 4)
    assert len(seq) == 4
    resumed = runner.extend(seq, ids[4:])
    fresh = runner.extend(runner.new_sequence(), ids)[4:]
    torch.testing.assert_close(resumed, fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter_kind", ["perturbed", "same", "unrelated"])
def test_speculative_greedy_equals_target_greedy(family, drafter_kind):
    target = tiny_model(family, seed=0)
    drafter = {"perturbed": perturbed(target, 0.3), "same": target, "unrelated": tiny_model(family, seed=7)}[
        drafter_kind
    ]
    out, stats, _ = run(target, drafter, SamplingParams(), max_new=40, k=4)
    assert out == hf_greedy(target, PROMPT, 40)
    if drafter_kind == "same":
        assert stats.acceptance_rate == 1.0
        assert stats.rounds == 8  # 40 tokens at k + 1 = 5 per round


def test_target_only_equals_target_greedy():
    target = tiny_model("llama")
    out, stats, _ = run(target, None, SamplingParams(), max_new=20)
    assert out == hf_greedy(target, PROMPT, 20)
    assert stats.rounds == 19 and stats.drafted == 0  # the first token comes from the prefill


@pytest.mark.parametrize("family", FAMILIES)
def test_verifier_work_is_linear_not_quadratic(family):
    target = tiny_model(family)
    max_new = 60
    out, stats, decoder = run(target, perturbed(target, 0.3), SamplingParams(), max_new=max_new, k=4)
    runner = decoder.target
    # every position is processed once, plus each drafted token once: no re-prefill
    assert runner.tokens_processed == stats.target_tokens
    assert stats.target_tokens <= len(PROMPT) + len(out) + stats.drafted
    assert stats.target_passes == stats.rounds + 1  # one prefill + one pass per round


def test_sampled_generation_is_reproducible_with_seed():
    target = tiny_model("qwen2")
    drafter = perturbed(target, 0.3)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11)
    a, _, _ = run(target, drafter, params, max_new=30)
    b, _, _ = run(target, drafter, params, max_new=30)
    c, _, _ = run(target, drafter, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=12), max_new=30)
    assert a == b
    assert a != c
    # the coupled rule: the same tokens whatever was drafted, and what the target alone samples
    for drafter_, k in ((drafter, 2), (drafter, 6), (tiny_model("qwen2", seed=7), 4), (None, 4)):
        assert run(target, drafter_, params, max_new=30, k=k)[0] == a


def test_eos_and_stop_strings():
    tok = tiny_tokenizer()
    target = tiny_model("llama")
    full, _, _ = run(target, target, SamplingParams(), max_new=30)
    eos = full[5]
    out, _, _ = run(
        target, target, SamplingParams(), stop=StopCriteria(max_new_tokens=30, eos_token_ids=frozenset({eos}))
    )
    assert out == full[: full.index(eos) + 1]
    text = tok.decode(full)
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    out, _, _ = run(
        target, target, SamplingParams(), stop=StopCriteria(max_new_tokens=30, stop_strings=(needle,))
    )
    assert needle in tok.decode(out) and needle not in tok.decode(out[:-1])


def test_per_position_statistics():
    target = tiny_model("gpt2")
    _, stats, _ = run(target, perturbed(target, 0.3), SamplingParams(), max_new=40, k=3)
    d = stats.to_dict()
    assert len(d["accepted_per_position"]) == 3
    rates = d["accepted_per_position"]
    assert rates[0] >= rates[1] >= rates[2]  # accepting position i+1 needs position i accepted
    assert stats.accepted == sum(stats.accepted_per_position)
    assert d["draft_s"] > 0 and d["verify_s"] > 0


def test_adaptive_draft_length_is_lossless_and_moves():
    target = tiny_model("llama")
    policy = AdaptiveDraftLength(k_max=8, k_start=2)
    out, stats, _ = run(target, target, SamplingParams(), max_new=60, policy=policy, runner_cls=SlowRunner)
    assert out == hf_greedy(target, PROMPT, 60)
    assert max(stats.draft_lengths) > 2  # a perfect drafter, cheap next to a slow target: k grows


def test_adaptive_policy_stops_drafting_where_the_drafter_costs_what_the_target_does():
    target = tiny_model("llama")
    policy = AdaptiveDraftLength(k_max=8, k_start=4)
    # the drafter is the target itself: every drafted token costs a target step, so drafting cannot pay
    out, stats, _ = run(target, target, SamplingParams(), max_new=80, policy=policy, drafter_cls=SlowRunner)
    assert out == hf_greedy(target, PROMPT, 80)
    assert stats.plain_rounds >= 0.75 * stats.rounds  # learnt within a few rounds, then probes only


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=21)])
def test_lookahead_drafter_changes_nothing_but_hides_drafting(params):
    target = tiny_model("qwen2")
    drafter_model = perturbed(target, 0.05)
    outputs = {}
    for lookahead in (False, True):
        # a verifier slower than the drafter, as on real pairs: the background thread then has time to
        # draft (a tiny target verifies faster than a thread switch, so without this no block is early)
        decoder = SpeculativeDecoder(SlowRunner(target), tiny_tokenizer())
        drafter = ModelDrafter(ModelRunner(drafter_model), lookahead=lookahead)
        stop = StopCriteria(max_new_tokens=50)
        outputs[lookahead] = [
            t
            for c in decoder.generate(PROMPT, params, stop, drafter, FixedDraftLength(3))
            for t in c.token_ids
        ]
        if lookahead and params.greedy:
            assert drafter.lookahead_hits > 0  # some blocks were ready before they were asked for
    # drafts are keyed by (seed, position), so the background thread cannot change a seeded generation
    assert outputs[True] == outputs[False]
    if params.greedy:
        assert outputs[True] == hf_greedy(target, PROMPT, 50)


class AlternatingStop(FixedDraftLength):
    """Every other round asks the drafter to stop once its raw confidence product drops below 0.9."""

    def __init__(self, k):
        super().__init__(k)
        self.rounds = 0

    def early_stop(self, load=None):
        self.rounds += 1
        return EarlyStop(below=0.9) if self.rounds % 2 else None


@pytest.mark.parametrize("lookahead", [False, True])
def test_early_stopped_blocks_keep_the_drafter_cache_consistent(lookahead):
    target = tiny_model("llama")
    decoder = SpeculativeDecoder(ModelRunner(target), tiny_tokenizer())
    drafter = ModelDrafter(ModelRunner(target), lookahead=lookahead)  # a perfect drafter, unsure of itself
    stats = GenerationStats()
    stop = StopCriteria(max_new_tokens=40)
    out = [
        t
        for c in decoder.generate(PROMPT, SamplingParams(), stop, drafter, AlternatingStop(4), stats)
        for t in c.token_ids
    ]
    assert out == hf_greedy(target, PROMPT, 40)
    assert 1 in stats.draft_lengths and 4 in stats.draft_lengths  # stopped early, and not


def test_adaptive_policy_calibrates_confidence_and_stops_by_cost():
    policy = AdaptiveDraftLength(k_max=8)
    assert policy.early_stop() is None  # nothing measured yet
    for _ in range(50):  # confident tokens are accepted, unsure ones rejected
        policy.update(3, 2, verify_s=0.5, draft_s=0.15, confidences=[0.95, 0.92, 0.15])
    assert policy.next_length() == 0  # one plain round first: plain decoding priced by its own forward
    policy.update(0, 0, verify_s=0.3)
    assert policy.next_length() == policy.plan().k > 0  # drafts, up to the plan's length
    stop = policy.early_stop()
    table = stop.acceptance
    assert table[9] > 0.9 and table[1] < 0.1  # bins of 0.95 / 0.15
    assert 0.0 < stop.below <= 0.95
    assert stop.chance(0.15) < stop.below  # an unsure token ends the block


def test_adaptive_policy_starts_from_the_last_session_of_its_kind():
    memory = LengthMemory()
    cold = memory.policy(("drafter", 0.0))
    assert cold.early_stop() is None  # nothing measured for this kind yet
    for _ in range(200):
        cold.update(3, 2, verify_s=0.5, draft_s=0.15, confidences=[0.95, 0.92, 0.15])
    memory.remember(("drafter", 0.0), cold)

    warm = memory.policy(("drafter", 0.0))
    stop = warm.early_stop()  # stops by confidence from its first round
    assert stop is not None
    assert stop.acceptance == pytest.approx(cold.acceptance_by_confidence(), abs=0.05)
    assert stop.below == pytest.approx(cold.early_stop().below, rel=0.02)
    assert sum(warm.bin_tried) == pytest.approx(PRIOR_POSITIONS)  # weighted down: its own rounds take over
    assert memory.policy(("drafter", 0.8)).early_stop() is None  # another sampling setting starts cold
    for _ in range(60):  # the new session's text: the drafter's unsure tokens are now accepted
        warm.update(3, 3, verify_s=0.5, draft_s=0.15, confidences=[0.95, 0.92, 0.15])
    assert warm.acceptance_by_confidence()[1] > 0.5


@pytest.mark.parametrize("overlap", [True, False])
def test_drafter_starts_before_or_after_the_target_prefill(overlap):
    target = tiny_model("llama", seed=0)
    runner = ModelRunner(target)
    seen = []

    class Recording(ModelDrafter):
        def start(self, context, params):
            seen.append(runner.forward_passes)  # target forwards done when the drafter starts
            super().start(context, params)

    decoder = SpeculativeDecoder(runner, tiny_tokenizer(), overlap_prefill=overlap)
    drafter = Recording(ModelRunner(perturbed(target, 0.05)))
    out = [
        t
        for c in decoder.generate(PROMPT, SamplingParams(), StopCriteria(max_new_tokens=20), drafter)
        for t in c.token_ids
    ]
    assert seen == [0 if overlap else 1]
    assert out == hf_greedy(target, PROMPT, 20)
