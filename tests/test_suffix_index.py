"""The cross-request lookup index (``suffix_index.py``): it proposes what earlier texts of the same scope
continued with, frequency-weighted, within its budget, never across scopes; prompt lookup turns to it
only where the current text has no match of its own; through the verifier a tenant's second request
drafts from its first, another tenant's does not."""

import random

from specdec_core.ngram import NgramDrafter
from specdec_core.sampling import SamplingParams
from specdec_core.suffix_index import SuffixIndex

JSON_A = [10, 11, 12, 13, 50, 14, 15, 16, 51, 17]  # the same shape around different values (50, 51 ...)
JSON_B = [10, 11, 12, 13, 60, 14, 15, 16, 61, 17]


def test_it_proposes_an_earlier_texts_continuation():
    index = SuffixIndex(budget=1000)
    index.add("t", [1, 2, 3] + JSON_A)
    assert index.propose("t", [7, 8, 10, 11], k=3) == [12, 13, 50]
    assert index.propose("t", [7, 8, 10, 11], k=2) == [12, 13]
    assert index.propose("t", [7, 8, 9], k=3) == []  # no n-gram of the context occurred


def test_proposals_follow_the_most_frequent_continuation_and_stop_where_texts_disagree():
    index = SuffixIndex(budget=1000)
    for value in (50, 50, 60):
        index.add("t", [10, 11, 12, 13, value, 14, 15])
    assert index.propose("t", [11, 12], k=5) == [13, 50, 14, 15]  # 50: two of three
    for value in (70, 80, 90):
        index.add("t", [10, 11, 12, 13, value, 14])
    assert index.propose("t", [11, 12], k=5) == [13]  # no value holds a third of them any more


def test_a_proposal_stops_before_a_value_the_earlier_request_took_from_its_own_prompt():
    """Request 1's prompt named 50 and its output copied it; request 2's prompt names 60: its drafts carry
    the keys around the value (11-14, in both prompts or in neither) but not request 1's value."""
    index = SuffixIndex(budget=1000)
    prompt_a = [1, 2, 11, 50, 51]  # "... keys ... values 50 and 51"
    index.add("t", prompt_a + JSON_A, prompt_len=len(prompt_a))
    assert index.propose("t", [7, 10, 11], k=5, prompt=frozenset([1, 2, 11, 60])) == [12, 13]
    assert index.propose("t", [7, 10, 11], k=5, prompt=frozenset([1, 2, 11, 50])) == [12, 13, 50, 14, 15]
    assert index.propose("t", [7, 10, 11], k=5) == [12, 13, 50, 14, 15]  # no prompt given: as before
    prompt_b = [1, 2, 11, 60]
    index.add("t", prompt_b + JSON_B, prompt_len=len(prompt_b))
    # past the value, the keys again (15, 16), not request 1's second value (51, in its prompt only)
    assert index.propose("t", [50, 14], k=5, prompt=frozenset([1, 2, 70])) == [15, 16]
    drafter = NgramDrafter(shared=index, cache_salt="t")  # the drafter passes its request's prompt
    drafter.start([3, 4, 5, 6, 70, 10, 11], SamplingParams())
    assert drafter.proposal(5) == [12, 13]


def test_the_budget_drops_the_least_recently_used_texts():
    index = SuffixIndex(budget=25)
    index.add("t", [1, 2] + JSON_A)  # 12 tokens
    index.add("t", [3, 4] + JSON_B)  # 24
    assert index.propose("t", [1, 2], k=3) == [10, 11, 12]  # proposed from: the first is recent again
    index.add("t", [5, 6, 7, 8, 9, 20, 21])  # 31 > 25: the least recently used (the second) goes
    assert index.tokens <= 25 and len(index) == 2
    assert index.propose("t", [3, 4], k=3) == []
    assert index.propose("t", [1, 2], k=3) == [10, 11, 12]
    SuffixIndex(budget=0).add("t", JSON_A)  # off: nothing kept, nothing proposed


def test_scopes_never_share():
    index = SuffixIndex(budget=1000)
    index.add("tenant-a", JSON_A)
    assert index.propose("tenant-b", [10, 11], k=3) == []
    assert not index.has_match("tenant-b", [10, 11]) and index.has_match("tenant-a", [10, 11])


def test_the_lookup_takes_the_longer_match_its_own_text_first():
    index = SuffixIndex(budget=1000)
    index.add("t", JSON_A)
    lookup = NgramDrafter(shared=index, cache_salt="t")
    lookup.start([90, 91, 10, 11], SamplingParams())
    assert lookup.has_match and lookup.proposal(3) == [12, 13, 50]  # from the earlier text
    lookup.extend([12, 13, 77, 90, 91])  # now its own text repeats (90, 91): its own continuation wins
    assert lookup.proposal(2) == [10, 11]
    # a value that also occurs earlier (12, 13 below) matches 2 tokens of its own text; the earlier
    # generation matches 3 (11, 12, 13): its continuation drafts
    lookup.start([12, 13, 5, 6, 11, 12, 13], SamplingParams())
    assert lookup.proposal(3) == [50, 14, 15]
    assert NgramDrafter(shared=index, cache_salt="other").proposal(3) == []


def test_through_the_verifier_a_tenant_drafts_from_its_earlier_request_only():
    from tiny import hf_greedy, tiny_model, tiny_tokenizer

    from client import SpecDecClient
    from specdec.config import VerifierConfig
    from verifier_service.server import start as start_verifier
    from verifier_service.verifier import VerifierEngine

    target = tiny_model("qwen2", seed=0)
    cfg = VerifierConfig(port=0, host="127.0.0.1", model="tiny", fast_verify="off", drafters=("ngram",))
    engine = VerifierEngine(cfg, target, tiny_tokenizer())
    server, port, _ = start_verifier(cfg, engine)
    prompt = random.Random(1).sample(range(3, 390), 40)  # no n-gram repeats inside the prompt
    try:
        with SpecDecClient(f"127.0.0.1:{port}") as c:
            kw = {"max_new_tokens": 24, "ignore_eos": True, "num_draft_tokens": 8}
            first = c.generate(prompt, tenant="a", **kw)
            again = c.generate(prompt, tenant="a", **kw)
            other = c.generate(prompt, tenant="b", **kw)
    finally:
        server.stop(0)
        engine.close()
    assert first.token_ids == again.token_ids == other.token_ids == hf_greedy(target, prompt, 24)
    assert again.stats["accepted"] >= 16  # the first request's output, drafted back
    assert again.stats["accepted"] > other.stats["accepted"] + 8
