"""Prompt-lookup drafting and the hybrid drafter: lookup correctness, an incremental index, lossless
output (greedy, seeded and sampled) in process and over gRPC, and the per-source stats."""

import time

import pytest
from test_services import Pair
from tiny import hf_greedy, perturbed, tiny_model, tiny_tokenizer

from client import SpecDecClient
from specdec.config import VerifierConfig
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import AdaptiveDraftLength, FixedDraftLength
from specdec_core.drafting import ModelDrafter
from specdec_core.hybrid import HybridDrafter
from specdec_core.ngram import NgramDrafter, NgramIndex
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria

# an input-grounded prompt: the continuation repeats the prompt's own text
CODE = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"


def test_lookup_takes_the_longest_match_at_its_most_recent_occurrence():
    index = NgramIndex(min_ngram=1, max_ngram=3)
    index.extend([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # suffix [5, 2, 3]: no earlier 3-gram; [2, 3] occurred at 1-2 and 5-6: the later one is followed by 7, 8
    assert index.match() == (2, 6)
    assert index.lookup(3) == [7, 8, 5]
    index.extend([7])  # suffix [2, 3, 7] occurred at 5-7
    assert index.match() == (3, 7) and index.lookup(2) == [8, 5]


def test_no_match_gives_an_empty_block():
    drafter = NgramDrafter(min_ngram=2, max_ngram=4)
    drafter.start([1, 2, 3, 4, 5], SamplingParams())
    block = drafter.propose(4)
    assert block.tokens == [] and block.dists == []
    drafter.extend([1, 2])  # now [1, 2] ends the text and occurred at the start, followed by 3, 4, 5
    block = drafter.propose(8)
    assert block.tokens == [3, 4, 5, 1, 2, 3, 4, 5]  # it runs into the repeat itself and copies on over it
    assert all(float(d.probs.sum()) == 1.0 and len(d.token_ids) == 1 for d in block.dists)  # one-hot


def test_the_suffix_never_matches_itself():
    index = NgramIndex(min_ngram=1, max_ngram=2)
    index.extend([4, 5])
    assert index.match() is None  # [5] and [4, 5] occur only as the suffix
    index.extend([5])
    assert index.lookup(1) == [5]  # [5] occurred at 1, followed by the current last token


def test_the_index_is_incremental():
    """Appending a token costs the same at 2k and at 64k tokens of text (no scan)."""

    def per_token(index, n=4000):
        tokens = [(i * 7919) % 503 for i in range(n)]
        t0 = time.perf_counter()
        index.extend(tokens)
        index.lookup(8)
        return (time.perf_counter() - t0) / n

    small = NgramIndex(1, 4)
    small.extend([(i * 31) % 503 for i in range(2000)])
    large = NgramIndex(1, 4)
    large.extend([(i * 31) % 503 for i in range(64000)])
    a = min(per_token(small) for _ in range(3))
    b = min(per_token(large) for _ in range(3))
    assert b < 3 * a, (a, b)


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", seed=0)
    return target, perturbed(target, 0.3)


def generate(target, drafter, params, max_new=40, policy=None, ngram_length=None):
    decoder = SpeculativeDecoder(ModelRunner(target), tiny_tokenizer())
    stats = GenerationStats()
    out = []
    prompt = tiny_tokenizer()(CODE)["input_ids"]
    for chunk in decoder.generate(
        prompt, params, StopCriteria(max_new_tokens=max_new), drafter, policy or AdaptiveDraftLength(), stats,
        ngram_length=ngram_length,
    ):  # fmt: skip
        out.extend(chunk.token_ids)
    return out, stats, prompt


@pytest.mark.parametrize("policy", [lambda: FixedDraftLength(4), lambda: AdaptiveDraftLength()])
def test_ngram_and_hybrid_greedy_equal_target_greedy(models, policy):
    target, drafter_model = models
    ngram_out, ngram_stats, prompt = generate(target, NgramDrafter(1, 3), SamplingParams(), policy=policy())
    expected = hf_greedy(target, prompt, 40)
    assert ngram_out == expected
    assert ngram_stats.drafted > 0 and set(ngram_stats.sources) == {"ngram"}
    hybrid = HybridDrafter(ModelDrafter(ModelRunner(drafter_model)), NgramDrafter(1, 3))
    hybrid_out, hybrid_stats, _ = generate(
        target, hybrid, SamplingParams(), policy=policy(), ngram_length=policy()
    )
    assert hybrid_out == expected
    sources = hybrid_stats.to_dict()["drafter_source"]
    assert sum(s["accepted"] for s in sources.values()) == hybrid_stats.accepted
    assert sum(s["rounds"] for s in sources.values()) == hybrid_stats.rounds - hybrid_stats.plain_rounds


def test_a_copying_stretch_is_weighed_apart_and_copied_past_its_period():
    """This tiny random Qwen2's greedy text falls into a 4-token cycle: the lookup proposes the committed
    tokens, the generation enters the copying state, and a lookup block runs on over its own output
    (8 tokens of a 4-token cycle are accepted in one round)."""
    target = tiny_model("qwen2", seed=1)
    out, stats, prompt = generate(target, NgramDrafter(1, 3), SamplingParams(), max_new=80)
    assert out == hf_greedy(target, prompt, 80)
    copying = stats.to_dict()["lookup_copying"]
    # most of the cycle is copied by lookups (block lengths depend on timings: a long block at the cycle's
    # end can lose most of itself; 20 runs with a busy core beside them: 0.66-0.98 accepted, 40-49 tokens)
    assert copying["rounds"] > 0 and copying["accepted"] >= max(20, 0.5 * copying["drafted"]), copying
    assert copying["rounds"] < stats.sources["ngram"][0]  # the first lookups came before any copying
    out, stats, _ = generate(
        target, NgramDrafter(1, 3), SamplingParams(), max_new=80, policy=FixedDraftLength(12)
    )
    assert out == hf_greedy(target, prompt, 80)
    assert len(stats.accepted_per_position) >= 8 and stats.accepted_per_position[7] > 0


def test_seeded_sampling_with_lookup_is_the_targets_own(models):
    """The coupled rule: the same tokens with prompt lookup, the hybrid, the model drafter and none."""
    target, drafter_model = models
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    alone, _, _ = generate(target, None, params, policy=FixedDraftLength(0))
    assert generate(target, NgramDrafter(1, 3), params)[0] == alone
    hybrid = HybridDrafter(ModelDrafter(ModelRunner(drafter_model)), NgramDrafter(1, 3))
    assert generate(target, hybrid, params, ngram_length=AdaptiveDraftLength())[0] == alone


def test_unseeded_sampling_with_one_hot_drafts_runs_the_rejection_rule(models):
    target, _ = models
    # unseeded draws differ run to run, and a sampled text from a random model rarely repeats: 30 tokens
    # had no lookup match at all about one run in eight; by 120 tokens one is near certain (0 in 100 runs)
    out, stats, _ = generate(target, NgramDrafter(1, 3), SamplingParams(temperature=0.8), max_new=120)
    assert len(out) == 120 and stats.drafted > 0  # the rule's exactness is tested on distributions below


def test_rejection_rule_with_one_hot_drafts_emits_the_target_distribution():
    """The statistical check of test_verification, with a one-hot draft (what prompt lookup sends)."""
    import torch
    from test_verification import tv_bound

    from specdec_core.sampling import make_generator
    from specdec_core.verification import verify_sampled

    vocab = 8
    target = torch.softmax(torch.randn(2, vocab, generator=torch.Generator().manual_seed(5)) * 1.5, -1)
    draft = torch.zeros(1, vocab)
    draft[0, 3] = 1.0  # the lookup always proposes token 3
    counts = torch.zeros(vocab)
    rng = make_generator(11)
    draws = 20000
    for _ in range(draws):
        verdict = verify_sampled(torch.tensor([3]), draft, target, rng)
        counts[3 if verdict.num_accepted else verdict.next_token] += 1
    tv = 0.5 * (counts / draws - target[0]).abs().sum().item()
    assert tv < tv_bound(target[0], draws)


# -- over gRPC: the verifier drafts by lookup itself ---------------------------------------------------


@pytest.fixture(scope="module")
def pair(models):
    p = Pair.__new__(Pair)
    Pair.__init__(p, *models)
    p.v_server.stop(0)  # again with 1-grams looked up too (tiny random models rarely repeat 2-grams)
    p.v_cfg = VerifierConfig(**{**p.v_cfg.__dict__, "ngram_min": 1, "ngram_max": 3})
    p.start_verifier(0)
    yield p
    p.stop()


@pytest.mark.parametrize("name", ["ngram", "hybrid"])
def test_ngram_and_hybrid_through_the_verifier(pair, name):
    prompt = tiny_tokenizer()(CODE)["input_ids"]
    with SpecDecClient(pair.verifier_addr, drafter=name) as c:
        r = c.generate(CODE, max_new_tokens=30, ignore_eos=True)
        seeded = c.generate(CODE, max_new_tokens=20, temperature=0.9, seed=9, ignore_eos=True)
    with SpecDecClient(pair.verifier_addr) as c:
        plain_seeded = c.generate(
            CODE, max_new_tokens=20, temperature=0.9, seed=9, ignore_eos=True, no_draft=True
        )
    assert r.token_ids == hf_greedy(pair.target, prompt, 30)
    assert seeded.token_ids == plain_seeded.token_ids
    sources = r.stats["drafter_source"]
    assert r.stats["drafted"] > 0 and "ngram" in sources
    assert sum(s.get("accepted", 0) for s in sources.values()) == r.stats["accepted"]


def test_a_drafter_service_serves_prompt_lookup(models):
    """`serve-drafter --source ngram`: no model, any vocabulary; a verifier drafts through it losslessly
    and counts its rounds as lookup rounds."""
    import grpc

    from drafter_service.server import start as start_drafter
    from drafter_service.sessions import DrafterEngine
    from specdec.config import DrafterConfig
    from specdec.v1 import specdec_pb2 as pb
    from specdec.v1 import specdec_pb2_grpc as pb_grpc
    from verifier_service.server import start as start_verifier
    from verifier_service.verifier import VerifierEngine

    target, _ = models
    d_cfg = DrafterConfig(port=0, host="127.0.0.1", source="ngram", ngram_min=1, ngram_max=3)
    d_engine = DrafterEngine(d_cfg)
    d_server, d_port, _ = start_drafter(d_cfg, d_engine)
    address = f"127.0.0.1:{d_port}"
    v_cfg = VerifierConfig(
        port=0, host="127.0.0.1", model="tiny-target", fast_verify="off", drafters=(address,)
    )
    v_engine = VerifierEngine(v_cfg, target, tiny_tokenizer())
    v_server, v_port, _ = start_verifier(v_cfg, v_engine)
    try:
        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.DrafterStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.drafter_source == "ngram" and info.vocab_fingerprint == "" and info.vocab_size == 0
        with SpecDecClient(f"127.0.0.1:{v_port}") as c:
            r = c.generate(CODE, max_new_tokens=30, ignore_eos=True)
        assert r.token_ids == hf_greedy(target, tiny_tokenizer()(CODE)["input_ids"], 30)
        assert r.stats["drafted"] > 0 and set(r.stats["drafter_source"]) == {"ngram"}
    finally:
        v_server.stop(0)
        d_server.stop(0)
        v_engine.close()
        d_engine.close()
    with pytest.raises(ValueError, match="source"):
        DrafterEngine(DrafterConfig(source="lookup"))
