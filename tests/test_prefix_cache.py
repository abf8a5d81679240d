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
