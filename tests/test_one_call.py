"""A drafter's whole block in one call of the runner (``Row.pick``: stepped rows, each token picked on the
device and fed back without the host reading it): the same drafts and the same cache as drafting one forward
at a time, alone, batched with other rows and through both services; the unseeded draw's distribution."""

import threading

import pytest
import torch
from tiny import FAMILIES, hf_greedy, perturbed, tiny_model, tiny_tokenizer

from specdec_core.drafting import EarlyStop, ModelDrafter
from specdec_core.runtime.backends.torch_eager import PENDING, ModelRunner, Row
from specdec_core.runtime.backends.torch_static import Buckets, StaticRunner
from specdec_core.sampling import SamplingParams, draft_pick, picked

BUCKETS = Buckets(rows=(1, 2, 4), widths=(1, 2, 4, 8, 16), capacity=128)
PROMPT = tiny_tokenizer()("def add(a, b):\n")["input_ids"]
PARAMS = {
    "greedy": SamplingParams(),
    "seeded": SamplingParams(temperature=0.9, seed=3),
    "unseeded": SamplingParams(temperature=0.8, top_p=0.9),
}
RUNNERS = {
    "dynamic": lambda m: ModelRunner(m),
    "static": lambda m: StaticRunner(m, buckets=BUCKETS, max_sequences=4),
}


def argmax_pick(logits, step):
    return (logits.argmax().reshape(1), logits.max().reshape(1))


@pytest.mark.parametrize("kind", RUNNERS)
def test_stepped_rows_decode_what_single_steps_decode(kind):
    """Two stepped rows of different lengths beside a prompt row, in one call: each returns its picks on
    the host, its cache holds the picked tokens (none left pending), and the logits match step by step."""
    model = tiny_model("llama")

    def stepwise():
        runner = RUNNERS[kind](model)
        a, b, c = runner.new_sequence(), runner.new_sequence(), runner.new_sequence()
        runner.extend(a, PROMPT[:5], keep=0)
        picks = {}
        for seq, feed, steps in ((a, PROMPT[5:7], 4), (b, PROMPT[:3], 2)):
            out, fed = [], feed
            for _ in range(steps):
                out.append(argmax_pick(runner.extend(seq, fed, keep=1)[-1], 0))
                fed = [int(out[-1][0])]
            picks[id(seq)] = out
        runner.extend(c, PROMPT, keep=0)
        return [list(s.tokens) for s in (a, b, c)], [picks[id(a)], picks[id(b)]]

    def one_call():
        runner = RUNNERS[kind](model)
        a, b, c = runner.new_sequence(), runner.new_sequence(), runner.new_sequence()
        runner.extend(a, PROMPT[:5], keep=0)
        out = runner.forward(
            [
                Row(a, PROMPT[5:7], 1, steps=4, pick=argmax_pick),
                Row(b, PROMPT[:3], 1, steps=2, pick=argmax_pick),
                Row(c, PROMPT, 0),
            ]
        )
        assert out[2].shape == (0, runner.vocab_size)  # a plain row still returns its logits
        assert all(t.device.type == "cpu" for p in out[0] + out[1] for t in p)
        return [list(s.tokens) for s in (a, b, c)], [out[0], out[1]]

    (tokens_a, picks_a), (tokens_b, picks_b) = stepwise(), one_call()
    assert all(PENDING not in tokens for tokens in tokens_b)
    assert tokens_b == tokens_a  # the cache: each feed, then every pick but the last (never fed)
    for rows_a, rows_b in zip(picks_a, picks_b):
        assert [int(p[0]) for p in rows_a] == [int(p[0]) for p in rows_b]
        torch.testing.assert_close(
            torch.cat([p[1] for p in rows_b]), torch.cat([p[1] for p in rows_a]), atol=1e-4, rtol=0
        )


def draft_script(drafter):
    """Blocks with partial, full and no acceptance, then one cut by an early stop; the blocks made and the
    drafter's cache at the end."""
    drafter.start(PROMPT, drafter._params)
    blocks = []
    for k, accepted in ((4, 2), (6, 6), (3, 0), (8, 5)):
        b = drafter.propose(k)
        blocks.append(
            (b.tokens, [d.token_ids.tolist() for d in b.dists], [round(c, 4) for c in b.confidences])
        )
        drafter.accept(accepted, 7)
    blocks.append(drafter.propose(8, EarlyStop(below=0.5)).tokens)
    cache = list(drafter._seq.tokens)
    drafter.close()
    return blocks, cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", RUNNERS)
@pytest.mark.parametrize("params", PARAMS)
def test_one_call_drafter_makes_the_stepwise_drafts(family, kind, params):
    model = tiny_model(family)
    results = []
    for one_call in (False, True):
        drafter = ModelDrafter(RUNNERS[kind](model), one_call=one_call)
        drafter._params = PARAMS[params]
        results.append(draft_script_seeded(drafter))
    assert results[0] == results[1]


def draft_script_seeded(drafter):
    """``draft_script`` with the per-generation seed of an unseeded generation fixed after ``start``."""
    start = drafter.start

    def fixed_start(context, params):
        start(context, params)
        drafter._seed = 42

    drafter.start = fixed_start
    return draft_script(drafter)


def test_unseeded_draw_follows_the_truncated_distribution():
    """The inverse-CDF draw keyed by (seed, position): frequencies within 4 sigma of the truncated q."""
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    params = SamplingParams(temperature=1.0, top_k=6)
    n = 6000
    counts = torch.zeros(50)
    for position in range(n):
        token, dist, _ = picked(draft_pick(logits, params, position, seed=11, max_support=4))
        counts[token] += 1
    _, dist, _ = picked(draft_pick(logits, params, 0, seed=11, max_support=4))
    assert len(dist.token_ids) == 4 and set(torch.nonzero(counts).flatten().tolist()) <= set(
        dist.token_ids.tolist()
    )
    for token, q in zip(dist.token_ids.tolist(), dist.probs.tolist()):
        sigma = (q * (1 - q) / n) ** 0.5
        assert abs(counts[token] / n - q) < 4 * sigma


def test_services_draft_in_one_call_batched():
    """`--draft-in-one-call on` with static shapes through both services, three clients at once: greedy gives
    the target's own ids, a seeded sample gives what the target alone samples (`--no-draft`)."""
    from test_services import Pair

    from client import SpecDecClient

    target = tiny_model("llama")
    pair = Pair(target, perturbed(target, 0.2), draft_in_one_call="on", static_shapes="on", kv_capacity=256)
    try:
        assert pair.d_engine.open_session().one_call
        results: dict = {}

        def run(name, **kw):
            with SpecDecClient(pair.verifier_addr) as c:
                results[name] = c.generate("def add(a, b):\n", max_new_tokens=30, ignore_eos=True, **kw)

        threads = [
            threading.Thread(target=run, args=("greedy",), kwargs={"num_draft_tokens": 4}),
            threading.Thread(target=run, args=("adaptive",), kwargs={}),
            threading.Thread(
                target=run, args=("seeded",), kwargs={"temperature": 0.8, "seed": 5, "num_draft_tokens": 3}
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        run("plain", temperature=0.8, seed=5, no_draft=True)
        expected = hf_greedy(target, PROMPT, 30)
        assert results["greedy"].token_ids == expected and results["adaptive"].token_ids == expected
        assert results["greedy"].stats["drafted"] > 0 and results["seeded"].stats["drafted"] > 0
        assert results["seeded"].token_ids == results["plain"].token_ids
    finally:
        pair.stop()


@pytest.mark.parametrize("params", PARAMS)
def test_plain_decoding_in_blocks_is_plain_decoding(params):
    """A generation without a drafter, alone on the target, decodes `plain_steps` tokens per runner call:
    greedy gives the target's own ids, a seeded sample the same tokens as one token per call, and the
    stop conditions cut a block where they fall (max_new_tokens not a multiple of the block, an EOS)."""
    from specdec_core.decoder import SpeculativeDecoder
    from specdec_core.stopping import StopCriteria

    target = tiny_model("qwen2")

    def run(steps, stop=StopCriteria(max_new_tokens=29), sampling=PARAMS[params]):
        decoder = SpeculativeDecoder(ModelRunner(target), tiny_tokenizer(), plain_steps=steps)
        chunks = list(decoder.generate(PROMPT, sampling, stop))
        return [t for c in chunks for t in c.token_ids], chunks

    blocks, chunks = run(8)
    assert len(blocks) == 29 and max(len(c.token_ids) for c in chunks) == 8
    if params == "greedy":
        assert blocks == hf_greedy(target, PROMPT, 29)
    if params != "unseeded":
        assert blocks == run(1)[0]
        eos = blocks[12]
        cut, chunks = run(8, StopCriteria(max_new_tokens=29, eos_token_ids=frozenset({eos})))
        assert cut == blocks[: blocks.index(eos) + 1] and chunks[-1].finish_reason == "eos"


def test_a_block_past_the_static_capacity_is_refused_before_it_starts():
    runner = StaticRunner(tiny_model("llama"), buckets=BUCKETS, max_sequences=2)
    seq = runner.new_sequence()
    runner.extend(seq, (PROMPT * 30)[: BUCKETS.capacity - 3], keep=0)
    assert len(seq) + 8 > BUCKETS.capacity >= len(seq) + 1
    held = list(seq.tokens)
    with pytest.raises(ValueError, match="capacity"):
        runner.forward([Row(seq, [7], 1, steps=8, pick=argmax_pick)])
    assert seq.tokens == held  # nothing fed, nothing pending


class Cycle:
    """A length policy that drafts 0, 0, then 3 tokens, over and over (plain blocks between drafted rounds)."""

    def __init__(self):
        from specdec_core.draft_length import FixedDraftLength

        self.base, self.n, self.updates = FixedDraftLength(0), 0, []

    def __getattr__(self, name):
        return getattr(self.base, name)

    def next_length(self, load=None):
        self.n += 1
        return 3 if self.n % 3 == 0 else 0

    def update(self, k, num_accepted, verify_s, *args, **kwargs):
        self.updates.append((k, verify_s))


def test_rounds_without_drafts_decode_in_blocks_beside_a_drafter():
    """With a drafter, rounds the policy leaves undrafted decode `plain_steps` tokens in one call; the
    drafter catches up on them before its next block; greedy stays the target's; the policy hears of each
    plain token as a round of its own."""
    from specdec_core.decoder import SpeculativeDecoder
    from specdec_core.stats import GenerationStats
    from specdec_core.stopping import StopCriteria

    target = tiny_model("qwen2")
    drafter = ModelDrafter(ModelRunner(perturbed(target, 0.1)))
    policy, stats = Cycle(), GenerationStats()
    decoder = SpeculativeDecoder(ModelRunner(target), tiny_tokenizer(), plain_steps=8)
    chunks = list(
        decoder.generate(PROMPT, SamplingParams(), StopCriteria(max_new_tokens=60), drafter, policy, stats)
    )
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == hf_greedy(target, PROMPT, 60)
    assert max(len(c.token_ids) for c in chunks) == 8 and stats.drafted > 0 and stats.accepted > 0
    plain = [v for k, v in policy.updates if k == 0]
    assert len(plain) == stats.plain_rounds >= 16  # two blocks of 8 per cycle at least once


@pytest.mark.parametrize("params", ["greedy", "seeded"])
def test_lookahead_in_one_call_through_the_services(params):
    """A one-call drafter with lookahead (its background blocks in calls of LOOKAHEAD_CHUNK steps) through
    both services: the target's greedy ids, or the seeded sample the target alone draws."""
    from test_services import Pair

    from client import SpecDecClient

    target = tiny_model("llama")
    pair = Pair(target, perturbed(target, 0.05), lookahead=True, draft_in_one_call="on")
    kw = {} if params == "greedy" else {"temperature": 0.8, "seed": 4}
    try:
        with SpecDecClient(pair.verifier_addr) as c:
            r = c.generate("def add(a, b):\n", max_new_tokens=40, ignore_eos=True, num_draft_tokens=3, **kw)
            plain = c.generate("def add(a, b):\n", max_new_tokens=40, ignore_eos=True, no_draft=True, **kw)
        assert r.token_ids == plain.token_ids and r.stats["drafted"] > 0
        if params == "greedy":
            assert r.token_ids == hf_greedy(target, PROMPT, 40)
    finally:
        pair.stop()


def test_a_pick_that_fails_leaves_no_pending_token():
    runner = ModelRunner(tiny_model("llama"))
    seq = runner.new_sequence()

    def failing(logits, step):
        if step == 2:
            raise RuntimeError("the pick broke")
        return argmax_pick(logits, step)

    with pytest.raises(RuntimeError, match="broke"):
        runner.forward([Row(seq, PROMPT[:4], 1, steps=5, pick=failing)])
    assert seq.tokens == PROMPT[:4]
