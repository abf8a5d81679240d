"""Slow: the real Qwen2.5-Coder pair (0.5B drafter, 1.5B target), fetched through `specdec models fetch`."""

import pytest
import torch

from specdec_core import models
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import FixedDraftLength
from specdec_core.drafting import ModelDrafter
from specdec_core.optimize import enable_fast_linear, prepare_drafter
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria

pytestmark = pytest.mark.slow

CODE_PROMPTS = [
    "def fibonacci(n: int) -> int:\n",
    "# Merge two sorted lists into one sorted list\ndef merge(a, b):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\n\ndef list_python_files(root):\n",
    "def is_palindrome(s: str) -> bool:\n",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def pair():
    target, tok = models.load_model(models.DEFAULT_TARGET, "cpu", "float32")
    drafter, dtok = models.load_model(models.DEFAULT_DRAFTER, "cpu", "float32")
    models.check_tokenizer_pair(dtok, tok)
    return target, drafter, tok


def speculative(target, drafter, tok, ids, k=5, lookahead=False):
    stats = GenerationStats()
    out = []
    for chunk in SpeculativeDecoder(ModelRunner(target), tok).generate(
        ids,
        SamplingParams(),
        StopCriteria(max_new_tokens=NEW_TOKENS),
        ModelDrafter(ModelRunner(drafter), lookahead=lookahead),
        FixedDraftLength(k),
        stats,
    ):
        out.extend(chunk.token_ids)
    return out, stats


def reference(target, ids):
    gc = target.generation_config
    gc.eos_token_id = None
    x = torch.tensor([ids])
    return target.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False, generation_config=gc
    )[0, len(ids) :].tolist()


def test_speculative_greedy_equals_target_generate(pair):
    target, drafter, tok = pair
    refs = {}
    for prompt in CODE_PROMPTS:
        ids = tok(prompt)["input_ids"]
        refs[prompt] = reference(target, ids)
        out, stats = speculative(target, drafter, tok, ids)
        assert out == refs[prompt], prompt
        print(f"{prompt!r}: acceptance {stats.acceptance_rate:.2f}, {stats.rounds} rounds")
    pair[0]._refs = refs


def test_onednn_verify_int8_lookahead_drafter_leave_output_unchanged(pair):
    target, drafter, tok = pair
    refs = getattr(target, "_refs", None) or {p: reference(target, tok(p)["input_ids"]) for p in CODE_PROMPTS}
    assert enable_fast_linear(target, "onednn") == "onednn"
    q_drafter = prepare_drafter(drafter, "int8")
    for prompt in CODE_PROMPTS:
        out, stats = speculative(target, q_drafter, tok, tok(prompt)["input_ids"], lookahead=True)
        assert out == refs[prompt], prompt
        print(f"{prompt!r} int8 lookahead drafter + oneDNN verify: acceptance {stats.acceptance_rate:.2f}")


def test_four_concurrent_generations_over_grpc_equal_target_greedy(pair):
    """Both services in process on the real pair, 4 clients at once (batched rows, the adaptive default)."""
    import threading

    from client import SpecDecClient
    from drafter_service.server import start as start_drafter
    from drafter_service.sessions import DrafterEngine
    from specdec.config import DrafterConfig, VerifierConfig
    from verifier_service.server import start as start_verifier
    from verifier_service.verifier import VerifierEngine

    target, drafter, tok = pair
    d_engine = DrafterEngine(DrafterConfig(model="qwen-0.5b", quantization="int8"), drafter, tok)
    d_srv, d_port, _ = start_drafter(DrafterConfig(port=0, host="127.0.0.1"), d_engine)
    v_cfg = VerifierConfig(port=0, host="127.0.0.1", model="qwen-1.5b", drafters=(f"127.0.0.1:{d_port}",))
    v_engine = VerifierEngine(v_cfg, target, tok)
    v_srv, v_port, _ = start_verifier(v_cfg, v_engine)
    prompts = CODE_PROMPTS[:4]
    results: dict = {}
    try:

        def gen(prompt):
            with SpecDecClient(f"127.0.0.1:{v_port}") as c:
                results[prompt] = c.generate(tok(prompt)["input_ids"], max_new_tokens=48, ignore_eos=True)

        threads = [threading.Thread(target=gen, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        rows_per_forward = v_engine.scheduler.rows_run / v_engine.scheduler.forwards
    finally:
        v_srv.stop(0)
        d_srv.stop(0)
        v_engine.close()
        d_engine.close()
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        expected = reference(target, ids)[:48]
        assert results[prompt].token_ids == expected, prompt
        s = results[prompt].stats
        print(
            f"{prompt!r}: acceptance {s['acceptance_rate']:.2f}, {s['rounds']} rounds, {s['plain_rounds']} plain"
        )
    assert rows_per_forward > 2.0  # the four generations shared their forwards
    assert sum(results[p].stats["drafted"] for p in prompts) > 0
