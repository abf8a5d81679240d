"""The prefix cache (``runtime/prefix_cache.py``) on every backend: a new sequence takes a finished one's
prefix without computing it and its logits equal the uncached ones (bit for bit on llama.cpp), partial
blocks match, salts never cross, the budget and the slots evict the oldest entries while sequences run,
and a rollback inside a reused prefix leaves the cached entry intact."""

import random

import pytest
import torch
from tiny import save_tiny_gguf

from specdec_core.runtime.backends import llamacpp
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.runtime.backends.torch_static import Buckets, StaticRunner
from specdec_core.runtime.interface import Runner
from specdec_core.runtime.prefix_cache import BLOCK, PrefixCache

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")
BACKENDS = ["torch", "static", pytest.param("llamacpp", marks=needs_llamacpp)]
IDS = random.Random(0).choices(range(3, 390), k=80)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return save_tiny_gguf("qwen2", root / "target" / "tiny.gguf", qtype="Q4_0")  # (path, dense model)


def make(backend: str, gguf, budget: int = 4096, slots: int = 4) -> Runner:
    path, dense = gguf
    if backend == "torch":
        return ModelRunner(dense, slots=slots, prefix_cache_tokens=budget)
    if backend == "static":
        buckets = Buckets(rows=(1, 2, 4), widths=(1, 4, 8, 32, 64, 128), capacity=256)
        return StaticRunner(dense, buckets=buckets, max_sequences=slots, prefix_cache_tokens=budget)
    return llamacpp.LlamaCppRunner(path, slots=slots, context=1024, prefix_cache_tokens=budget)


def exact(backend: str) -> dict:
    return {"atol": 0.0, "rtol": 0.0} if backend.startswith("llamacpp") else {"atol": 1e-4, "rtol": 1e-4}


def fresh_logits(backend, gguf, tokens, keep=1):
    """What an uncached runner computes for ``tokens``."""
    runner = make(backend, gguf, budget=0)
    return runner.extend(runner.new_sequence(), tokens, keep=keep)


def finish(runner: Runner, tokens: list[int], salt: str = "") -> None:
    """A sequence over ``tokens``, then released: its KV goes into the prefix cache."""
    seq = runner.new_sequence(salt)
    runner.prefill(seq, tokens)
    runner.release(seq)


def reuse_then_extend(runner: Runner, tokens: list[int], keep: int = 1, salt: str = ""):
    """A new sequence over ``tokens`` as a session opens one: (reused, logits of the last ``keep``)."""
    seq = runner.new_sequence(salt)
    reused = runner.reuse_prefix(seq, tokens, keep)
    return reused, runner.extend(seq, tokens[reused:], keep=keep), seq


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cached_prefix_gives_the_uncached_logits(backend, gguf):
    runner = make(backend, gguf)
    finish(runner, IDS[:50])
    tokens = IDS[:50] + [7, 8, 9, 10]
    reused, logits, seq = reuse_then_extend(runner, tokens, keep=4)
    assert reused == 50
    assert runner.prefix.hits == 50 and runner.prefix.queries == len(tokens) - 4
    assert runner.tokens_processed == 50 + 4  # the first sequence's prefill, then only the new tokens
    torch.testing.assert_close(logits, fresh_logits(backend, gguf, tokens, keep=4), **exact(backend))
    assert seq.tokens == tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_blocks_and_the_last_positions(backend, gguf):
    runner = make(backend, gguf)
    finish(runner, IDS[: 2 * BLOCK + 5])  # two whole blocks and five tokens
    diverging = IDS[: 2 * BLOCK + 3] + [1, 2, 3]
    reused, logits, _ = reuse_then_extend(runner, diverging)
    assert reused == 2 * BLOCK + 3  # past the last whole block, token by token
    torch.testing.assert_close(logits, fresh_logits(backend, gguf, diverging), **exact(backend))
    # the whole cached text asked for again: its last position is computed, for its logits
    reused, logits, _ = reuse_then_extend(runner, IDS[: 2 * BLOCK + 5])
    assert reused == 2 * BLOCK + 4
    torch.testing.assert_close(logits, fresh_logits(backend, gguf, IDS[: 2 * BLOCK + 5]), **exact(backend))
    # a prefix shorter than one block matches too (an entry shares its first tokens)
    reused, _, _ = reuse_then_extend(runner, IDS[:9] + [1, 2])
    assert reused == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_salts_never_share(backend, gguf):
    runner = make(backend, gguf)
    finish(runner, IDS[:40], salt="tenant-a")
    assert reuse_then_extend(runner, IDS[:48], salt="tenant-b")[0] == 0
    assert reuse_then_extend(runner, IDS[:48], salt="")[0] == 0
    assert reuse_then_extend(runner, IDS[:48], salt="tenant-a")[0] == 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rollback_inside_a_reused_prefix_leaves_the_entry_intact(backend, gguf):
    runner = make(backend, gguf)
    finish(runner, IDS[:60])
    reused, _, seq = reuse_then_extend(runner, IDS[:64])
    assert reused == 60
    runner.rollback(seq, 20)  # inside the shared prefix (llama.cpp shares those cells)
    runner.extend(seq, [5] * 30)  # other tokens over the positions the entry holds
    reused, logits, _ = reuse_then_extend(runner, IDS[:64])
    assert reused == 60
    torch.testing.assert_close(logits, fresh_logits(backend, gguf, IDS[:64]), **exact(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_budget_and_the_slots_evict_the_oldest_while_sequences_run(backend, gguf):
    runner = make(backend, gguf, budget=3 * BLOCK + 10, slots=3)
    live = runner.new_sequence()
    before = runner.extend(live, IDS[:20])
    finish(runner, IDS[: BLOCK + 4])
    finish(runner, IDS[40 : 40 + BLOCK + 4])  # both fit: 40 tokens of 58
    assert len(runner.prefix) == 2 and runner.active_sequences == 1 + (backend == "static")
    finish(runner, IDS[20 : 20 + BLOCK + 4])  # over the budget: the oldest entry goes
    assert len(runner.prefix) == 2 and runner.prefix.tokens <= runner.prefix.budget
    assert runner.prefix.match(IDS[: BLOCK + 4], "", limit=99).length == 0
    # every slot taken (the live one, two entries): a new sequence takes the least recently used entry's
    other = runner.new_sequence()
    assert len(runner.prefix) == 1
    runner.extend(other, IDS[60:70])
    assert runner.prefix.match(IDS[20 : 20 + BLOCK + 4], "", limit=99).length == BLOCK + 4  # the newest
    # the live sequence never depended on any of it
    again = runner.new_sequence()
    torch.testing.assert_close(runner.extend(again, IDS[:20]), before, **exact(backend))
    runner.release(live)
    torch.testing.assert_close(
        runner.extend(runner.new_sequence(), IDS[:20]), before, **exact(backend)
    )  # a slot freed from the cache computes from scratch


def test_a_sequence_shorter_than_a_block_or_with_no_cache_is_freed():
    cache = PrefixCache(0)
    assert cache.retain(3, IDS[:40], "") == [3] and len(cache) == 0
    cache = PrefixCache(1000)
    assert cache.retain(3, IDS[: BLOCK - 1], "") == [3] and len(cache) == 0
    assert cache.retain(4, IDS[:40], "") == [] and len(cache) == 1
    assert cache.match(IDS[:40], "", limit=39).length == 39
    assert cache.clear() == [4] and cache.tokens == 0


# -- through both services ---------------------------------------------------------------------------------


@pytest.fixture
def services():
    from tiny import perturbed, tiny_model, tiny_tokenizer

    from drafter_service.server import start as start_drafter
    from drafter_service.sessions import DrafterEngine
    from specdec.config import DrafterConfig, VerifierConfig
    from verifier_service.server import start as start_verifier
    from verifier_service.verifier import VerifierEngine

    target = tiny_model("qwen2", seed=0)
    d_engine = DrafterEngine(
        DrafterConfig(model="tiny-drafter", quantization="none"), perturbed(target, 0.1), tiny_tokenizer()
    )
    d_server, d_port, _ = start_drafter(
        DrafterConfig(port=0, host="127.0.0.1", model="tiny-drafter"), d_engine
    )
    v_cfg = VerifierConfig(
        port=0, host="127.0.0.1", model="tiny-target", fast_verify="off", drafters=(f"127.0.0.1:{d_port}",)
    )
    v_engine = VerifierEngine(v_cfg, target, tiny_tokenizer())
    v_server, v_port, _ = start_verifier(v_cfg, v_engine)
    yield target, f"127.0.0.1:{v_port}", v_engine, d_engine
    v_server.stop(0)
    d_server.stop(0)
    v_engine.close()
    d_engine.close()


def test_a_second_turn_reuses_the_first_ones_prefix_on_both_roles_and_tenants_never_share(services):
    from tiny import hf_greedy

    from client import SpecDecClient

    target, address, v_engine, d_engine = services
    history = IDS[:60]
    with SpecDecClient(address) as c:
        first = c.generate(history, max_new_tokens=12, ignore_eos=True, num_draft_tokens=3, tenant="a")
        turn = history + first.token_ids + IDS[60:70]
        again = c.generate(turn, max_new_tokens=12, ignore_eos=True, num_draft_tokens=3, tenant="a")
        other = c.generate(turn, max_new_tokens=12, ignore_eos=True, num_draft_tokens=3, tenant="b")
        plain = c.generate(turn, max_new_tokens=12, ignore_eos=True, no_draft=True, tenant="c")
    assert first.stats["cached_tokens"] == 0
    # the first generation's sequence held its prompt and every generated token but the last
    assert again.stats["cached_tokens"] == len(history) + len(first.token_ids) - 1
    assert other.stats["cached_tokens"] == 0 and plain.stats["cached_tokens"] == 0
    assert again.token_ids == other.token_ids == plain.token_ids == hf_greedy(target, turn, 12)
    assert v_engine.runner.prefix.hits == again.stats["cached_tokens"]
    assert d_engine.runner.prefix.hits > 0  # the drafter started from its own cached context, same tenant
