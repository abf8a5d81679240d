"""Speed options: the fast verify path, a quantized drafter and the adaptive draft length change nothing
that is generated, and the cost model picks the k that maximises throughput."""

import copy
from dataclasses import replace

import pytest
import torch
from tiny import FAMILIES, hf_greedy, perturbed, tiny_model, tiny_tokenizer

from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import AdaptiveDraftLength, FixedDraftLength, Load, Peer
from specdec_core.drafting import ModelDrafter
from specdec_core.optimize import FAST_MAX_ROWS, enable_fast_linear, prepare_drafter
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stopping import StopCriteria

PROMPT = tiny_tokenizer()("for i in range(10):\n")["input_ids"]
# fp32 logits of a 2-layer model: reassociating the dot products moves them by ~1e-6
TOLERANCE = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture
def onednn_everywhere(monkeypatch):
    """Tiny layers are far below the size where oneDNN pays off; route them through it anyway."""
    from specdec_core import optimize

    monkeypatch.setattr(optimize, "ONEDNN_MIN_PARAMS", 0)


@pytest.mark.parametrize("mode", ["transpose", "onednn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_logits_match_stock_path(family, mode, onednn_everywhere):
    stock = tiny_model(family)
    fast = copy.deepcopy(stock)
    assert enable_fast_linear(fast, mode) == mode
    ids = PROMPT + [7, 11, 13]
    for block in (1, 3, 5, 9, FAST_MAX_ROWS + 2):  # last one falls back to the stock GEMM
        s_run, f_run = ModelRunner(stock), ModelRunner(fast)
        s_seq, f_seq = s_run.new_sequence(), f_run.new_sequence()
        s_run.prefill(s_seq, ids)
        f_run.prefill(f_seq, ids)
        new = [(3 * i + 5) % 300 for i in range(block)]
        torch.testing.assert_close(f_run.extend(f_seq, new), s_run.extend(s_seq, new), **TOLERANCE)


@pytest.mark.parametrize("mode", ["transpose", "onednn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_and_int8_drafter_leave_greedy_output_unchanged(family, mode, onednn_everywhere):
    target = tiny_model(family)
    expected = hf_greedy(target, PROMPT, 40)
    enable_fast_linear(target, mode)
    drafter = prepare_drafter(perturbed(tiny_model(family), 0.1), "int8")
    out = [
        t
        for c in SpeculativeDecoder(ModelRunner(target)).generate(
            PROMPT,
            SamplingParams(),
            StopCriteria(max_new_tokens=40),
            ModelDrafter(ModelRunner(drafter)),
            FixedDraftLength(4),
        )
        for t in c.token_ids
    ]
    assert out == expected


def test_fast_path_off_and_auto_probe():
    model = tiny_model("llama")
    forwards = [m.forward for m in model.modules()]
    assert enable_fast_linear(model, "off") == "off"
    assert [m.forward for m in model.modules()] == forwards
    installed = enable_fast_linear(model, "auto")  # the probe decides; either way the model still works
    assert installed in ("off", "transpose", "onednn")
    if installed != "off":  # a prepared model is not probed or prepared again (its dense weights may be gone)
        assert enable_fast_linear(model, "transpose" if installed == "onednn" else "onednn") == installed
    with pytest.raises(ValueError):
        enable_fast_linear(model, "sometimes")


def test_drafter_precision_options():
    model = tiny_model("qwen2")
    assert prepare_drafter(model, "none") is model
    q = prepare_drafter(model, "int8")
    assert any("quantized" in type(m).__module__ for m in q.modules())
    assert prepare_drafter(model, "auto") is not None
    with pytest.raises(ValueError):
        prepare_drafter(model, "int3")


def simulate(policy, alpha, t_draft, verify_cost, rounds, overhead=0.0, seed=0):
    """Feed the policy rounds from a synthetic pair: geometric acceptance, linear verify cost."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        k = policy.next_length()
        n = 0
        while n < k and torch.rand(1, generator=gen).item() < alpha:
            n += 1
        policy.update(k, n, verify_cost(k + 1), draft_s=k * t_draft, network_s=overhead)


def expected_rate(alpha, k, t_draft, verify_cost, overhead=0.0):
    return (1 - alpha ** (k + 1)) / (1 - alpha) / (k * t_draft + verify_cost(k + 1) + overhead)


@pytest.mark.parametrize("alpha,t_draft,slope", [(0.9, 0.05, 0.02), (0.6, 0.3, 0.1), (0.95, 0.02, 0.0)])
def test_adaptive_length_finds_the_throughput_optimum(alpha, t_draft, slope):
    def verify_cost(m):
        return 1.0 + slope * m

    policy = AdaptiveDraftLength(k_max=8)
    simulate(policy, alpha, t_draft, verify_cost, rounds=400)
    best = max(range(1, 9), key=lambda k: expected_rate(alpha, k, t_draft, verify_cost))
    chosen = policy.next_length()
    # within 3% of the best fixed k's throughput (estimates are noisy, the objective is flat near the top)
    assert expected_rate(alpha, chosen, t_draft, verify_cost) >= 0.97 * expected_rate(
        alpha, best, t_draft, verify_cost
    )


# a staircase shaped like the 1.5B target's verify times on llama.cpp's invariant kernels before the Q6_K
# kernel and padding: 1, 2, 4 and 8 positions as measured then (69 / 106 / 116 / 192 ms, 2 cores,
# docs/results/slope_qwen1.5b_gemm.json), the widths between them interpolated. Positions go through the
# GEMM in groups of 4 and the rest one by one, so the cost climbs in steps. (Today's padded costs, and a
# session that explores widths it never tried: test_a_lone_session_drafts_where_padded_llamacpp_costs_pay.)
LLAMACPP_STEPS = {1: 0.069, 2: 0.106, 3: 0.111, 4: 0.116, 5: 0.150, 6: 0.170, 7: 0.185, 8: 0.192, 9: 0.225}


@pytest.mark.parametrize("alpha,t_draft", [(0.5, 0.0), (0.7, 0.0), (0.5, 0.002)])
def test_adaptive_length_prices_a_stepped_verify_cost_by_size(alpha, t_draft):
    """A lookup drafter (free drafts) over a verifier whose cost is a staircase, not a line: the policy
    prices the block sizes it measured by their own times, so it finds the step's far edge (k = 3)."""

    def verify_cost(m):
        return LLAMACPP_STEPS[m]

    policy = AdaptiveDraftLength(k_max=8)
    simulate(policy, alpha, t_draft, verify_cost, rounds=400)
    best = max(range(1, 9), key=lambda k: expected_rate(alpha, k, t_draft, verify_cost))
    chosen = policy.next_length()
    assert expected_rate(alpha, chosen, t_draft, verify_cost) >= 0.97 * expected_rate(
        alpha, best, t_draft, verify_cost
    )


# the 1.5B target's padded forwards on llama.cpp, one session through gRPC on 2 cores (2026-12-04: 57 ms a
# plain step, 86 ms a verify of 4, 117 of 5; docs/benchmarks.md): 2 to 4 positions cost about the same, 5
# jumps, 5 to 8 cost about the same again (docs/results/padding_qwen1.5b.json)
PADDED_STEPS = {1: 0.057, 2: 0.087, 3: 0.087, 4: 0.087, 5: 0.117, 6: 0.135, 7: 0.150, 8: 0.150, 9: 0.170}


def lone_rounds(policy, load, rounds, gen, fresh=True, t_draft=0.024, net=0.002, room=1000):
    """``rounds`` rounds of one session on ``PADDED_STEPS`` with a drafter that reports confidences (9 tokens
    in 10 sure and right 97% of the time, the rest unsure and right 30%); its first round carries the
    drafter's start (70 ms more network time) when ``fresh``. Returns (tokens, seconds) per round."""
    out = []
    for r in range(rounds):
        snap = load.snapshot(policy)
        k, stop = min(policy.next_length(snap), room), policy.early_stop(snap)
        confidences: list[float] = []
        chance = 1.0
        while len(confidences) < k and not (confidences and stop is not None and chance < stop.below):
            confidences.append(0.95 if torch.rand(1, generator=gen).item() < 0.9 else 0.3)
            chance *= stop.chance(confidences[-1]) if stop is not None else confidences[-1]
        accepted = 0
        while accepted < len(confidences) and torch.rand(1, generator=gen).item() < (
            0.97 if confidences[accepted] > 0.5 else 0.3
        ):
            accepted += 1
        drafted, start = len(confidences), fresh and r == 0
        verify_s = PADDED_STEPS[drafted + 1]
        load.on_forward([drafted + 1], verify_s)
        network_s = (0.07 if start else net) if drafted else 0.0
        policy.update(drafted, accepted, verify_s, draft_s=t_draft * drafted, network_s=network_s,
                      confidences=confidences, costs_valid=not start)  # fmt: skip
        out.append((accepted + 1, verify_s + (t_draft * drafted + network_s if drafted else 0.0)))
    return out


def test_a_lone_session_plans_with_acceptance_raised_by_its_error():
    """Two learning rounds judge a dozen positions: a session alone plans with the acceptance one standard
    error up, a bonus that fades as positions are judged; a batch plans with the plain estimate."""
    from specdec_core.draft_length.measurements import Measurements

    m = Measurements(k_max=8)
    m.record_positions(8, 6)
    m.record_positions(7, 6)
    few = m.optimistic_acceptance(0) - m.acceptance(0)
    assert 0.05 < few < 0.15
    assert m.member().gains[0] == pytest.approx(m.acceptance(0))
    assert m.member(optimistic=True).gains[0] == pytest.approx(m.optimistic_acceptance(0))
    for _ in range(200):
        m.record_positions(4, 3)
    assert m.optimistic_acceptance(0) - m.acceptance(0) < 0.03


def test_a_lone_session_drafts_where_padded_llamacpp_costs_pay():
    """What the 1-client benchmark does: a short first generation (8 tokens: two rounds, the first carrying
    the drafter's start), then a session warm-started from it, both on the verifier's measured forwards.
    The session must draft, near the best fixed length's rate. Before, the start's 70 ms stood for every
    round's network cost, the two rounds' acceptance was taken at face value, a width never tried was
    priced on a line through the others, and plain decoding won every plan from then on."""
    from specdec_core.draft_length.memory import LengthMemory
    from specdec_core.runtime.batch_costs import BatchLoad

    gen, load, memory = torch.Generator().manual_seed(0), BatchLoad(), LengthMemory()
    first = memory.policy("drafter")
    lone_rounds(first, load, 2, gen, room=4)
    assert first.measured.t_network() == pytest.approx(0.002)  # the start's round stood in, then went
    memory.remember("drafter", first)
    rounds = lone_rounds(memory.policy("drafter"), load, 120, gen)[10:]
    rate = sum(t for t, _ in rounds) / sum(s for _, s in rounds)
    a = 0.9 * 0.97
    fixed3 = (1 + a + a**2 + a**3) / (PADDED_STEPS[4] + 3 * 0.024 + 0.002)
    assert rate > 1.15 / PADDED_STEPS[1] and rate > 0.9 * fixed3


def roofline_forward(tokens: float) -> float:
    """A forward that reads the weights (0.3 s) and turns compute bound past 8 tokens (10 ms a token, as the
    1.5B target on the 2-core CPU)."""
    return 0.3 + 0.01 * max(tokens - 8.0, 0.0)


def trained_policy(acceptance=0.8, t_draft=0.03, rounds=300):
    """A policy that measured a cheap drafter (c = 0.1) on its own."""
    policy = AdaptiveDraftLength(k_max=8)
    gen = torch.Generator().manual_seed(0)
    light = Load(forward_s=roofline_forward)
    for _ in range(rounds):
        k = max(policy.next_length(light), 1)
        n = 0
        while n < k and torch.rand(1, generator=gen).item() < acceptance:
            n += 1
        policy.update(k, n, roofline_forward(k + 1), draft_s=t_draft * k)
    return policy


def test_draft_length_shrinks_under_load_and_stops_where_drafting_cannot_pay():
    policy = trained_policy()
    alone = policy.next_length(Load(forward_s=roofline_forward))
    alike = Peer(acceptance=0.8, t_draft=0.03)
    batch16 = Load(peers=(alike,) * 15, forward_s=roofline_forward)
    loaded = policy.next_length(batch16)
    assert alone >= 4  # verify blocks are nearly free while memory bound
    assert 1 <= loaded < alone  # each drafted token now costs compute that 16 rows wait for
    plan = policy.plan(batch16)
    assert plan.rate > policy._plain_plan(batch16).rate  # drafting together still pays
    # compute bound all the way: a drafted token costs a decoded token's compute and gains less
    crushing = Load(peers=(alike,) * 63, forward_s=lambda n: 0.05 * n)
    assert policy.next_length(crushing) == 0


def test_one_session_does_not_make_a_plain_batch_wait_for_its_drafts():
    policy = trained_policy()
    # seven sessions that cannot draft (no drafter): drafting alone would stall them for a token or two
    plain_peers = Load(peers=(Peer(fixed=0),) * 7, forward_s=roofline_forward)
    assert policy.next_length(plain_peers) == 0
    # seven sessions like this one: they draft together, one drafting phase for all
    alike = Load(peers=(Peer(acceptance=0.8, t_draft=0.03),) * 7, forward_s=roofline_forward)
    assert policy.next_length(alike) > 0
    # seven adaptive sessions whose text the drafter does not predict: drafting would make them slower
    # than decoding plainly (they would wait for the drafts), so nobody drafts
    unpredictable = Load(peers=(Peer(acceptance=0.15, t_draft=0.03),) * 7, forward_s=roofline_forward)
    assert trained_policy().next_length(unpredictable) == 0


def test_a_drafter_as_costly_as_its_target_is_not_used_but_probed():
    policy = AdaptiveDraftLength(k_max=8)
    load = Load(forward_s=roofline_forward)
    plain, drafted = 0, 0
    for _ in range(200):
        k = policy.next_length(load)
        n = min(k, 3)  # it agrees often...
        policy.update(k, n, roofline_forward(k + 1), draft_s=0.4 * k)  # ...but costs more than a target step
        drafted, plain = drafted + (k > 0), plain + (k == 0)
    assert plain > 0.9 * 200 and 0 < drafted  # it learnt, then only probes now and then


def test_a_drafter_start_is_paid_from_the_tokens_left():
    policy = trained_policy()
    alike = Load(peers=(Peer(acceptance=0.8, t_draft=0.03),) * 7, forward_s=roofline_forward)
    assert policy.next_length(alike) > 0  # drafting pays per round...
    # ...and a start is priced from measured catching-up rounds: a round that prefilled 200 context tokens
    # took 2 s more than a normal round of its length (10 ms a token)
    policy.update(3, 3, roofline_forward(4), draft_s=3 * 0.03 + 2.0, costs_valid=False, start_tokens=200)
    assert policy.start_cost(replace(alike, start_tokens=300)) == pytest.approx(3.0, rel=0.05)
    # a drafter that must first prefill 300 tokens (3 s) does not pay back over the last 8 tokens...
    assert policy.next_length(replace(alike, start_tokens=300, remaining=8)) == 0
    # ...but does over 2000 of them, and a started drafter has nothing to pay
    assert policy.next_length(replace(alike, start_tokens=300, remaining=2000)) > 0
    assert policy.next_length(replace(alike, start_tokens=0, remaining=8)) > 0
    # a warm start carries the price to the next session
    assert AdaptiveDraftLength(prior=policy).start_cost(replace(alike, start_tokens=100)) == pytest.approx(
        1.0, rel=0.05
    )


def test_a_session_decoding_plainly_counts_as_plain_for_its_peers():
    policy = trained_policy()
    assert policy.peer().fixed is None  # drafting (or not decided yet): planned with as adaptive
    crushing = Load(peers=(Peer(acceptance=0.8, t_draft=0.03),) * 63, forward_s=lambda n: 0.05 * n)
    assert policy.next_length(crushing) == 0
    assert policy.peer().fixed == 0  # decoding plainly: its peers do not plan a drafting phase it skips
    # fourteen peers that decode plainly: drafting now would make them all wait for this session's drafts
    other = trained_policy()
    mixed = Load(
        peers=(Peer(acceptance=0.8, t_draft=0.03),) + (policy.peer(),) * 14, forward_s=roofline_forward
    )
    assert other.next_length(mixed) == 0


def test_the_batch_prices_the_starts_of_every_session_that_would_draft():
    policy = trained_policy()
    policy.update(3, 3, roofline_forward(4), draft_s=3 * 0.03 + 2.0, costs_valid=False, start_tokens=200)
    short = Peer(acceptance=0.8, t_draft=0.03, start_tokens=20)
    long = Peer(acceptance=0.8, t_draft=0.03, start_tokens=2000)
    # its own start is short, but drafting means seven long starts too: it stays plain, as they will
    costly = Load(peers=(long,) * 7, forward_s=roofline_forward, start_tokens=20, remaining=60)
    assert policy.next_length(costly) == 0
    cheap = Load(peers=(short,) * 7, forward_s=roofline_forward, start_tokens=20, remaining=60)
    assert policy.next_length(cheap) > 0
    assert policy.peer().start_tokens == 0  # drafting: its drafter has caught up


def test_a_free_source_measured_only_by_observation_reports_itself_to_its_peers():
    """A lookup policy can stop learning from observed rounds alone (it never drafted): its peer entry
    and its debug description must not divide by its zero drafted tokens."""
    policy = AdaptiveDraftLength(k_max=16)
    for _ in range(4):
        policy.observe(judged=3, num_accepted=2, block=1, verify_s=0.1)
    policy.update(0, 0, 0.1)  # a plain round: a verify cost, no drafted token
    assert not policy.learning
    assert policy.peer().t_draft == 0.0
    assert "t_draft 0 ms" in policy.describe(Load())


def test_a_first_session_prices_plain_decoding_by_a_plain_round():
    """On cores the drafter shares, drafted rounds' forwards carry the drafter's turns (150-260 ms here,
    where one plain token takes 62 ms): a line through them alone prices a plain token at 140 ms, and a
    drafter agreeing 80% of the time looks worth it for the whole first generation. One plain round,
    asked once after learning, measures it; then the policy decodes plainly but for its probes."""

    def drafted_forward(m: int) -> float:
        return 0.14 + 0.015 * (m - 1)

    policy = AdaptiveDraftLength(k_max=8)
    chosen = []
    for _ in range(40):
        k = policy.next_length()
        chosen.append(k)
        accepted = int(0.8 * k)
        forward = 0.062 if k == 0 else drafted_forward(k + 1)
        policy.update(k, accepted, verify_s=forward, draft_s=0.039 * k)
    assert chosen[:2] != [0, 0] and 0 in chosen[2:4]  # learning, then the plain round
    assert chosen[10:].count(0) >= 25  # then plain: 16 tok/s against 9 drafting


def test_the_plain_round_is_asked_once_and_not_when_a_prior_measured_it():
    policy = AdaptiveDraftLength(k_max=8)
    for _ in range(4):
        policy.update(4, 3, verify_s=0.2, draft_s=0.04)
    assert policy.next_length() == 0
    policy.update(4, 3, verify_s=0.2, draft_s=0.04)  # the caller drafted anyway: not asked again
    assert policy.next_length() > 0
    policy.update(0, 0, verify_s=0.15)  # plain 6.7 tok/s, drafting 11: drafting pays
    assert AdaptiveDraftLength(k_max=8, prior=policy).next_length() > 0  # block 1 came with the prior
