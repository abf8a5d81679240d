"""Slow: the batch-invariant llama.cpp verifier on the real 1.5B target's Q4_K_M GGUF (the kernels the tiny
Q4_0 files of test_backends.py do not reach): a position's logits are the same bits whatever its forward's
width, one sequence or many."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdec_core import models
from specdec_core.runtime.backends import llamacpp
from specdec_core.runtime.interface import Row

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed"),
]


@pytest.fixture(scope="module")
def runner():
    path = models.gguf_source(models.DEFAULT_TARGET, download=False)
    if path is None:
        pytest.skip("the built-in target's GGUF is not fetched (specdec models fetch)")
    return llamacpp.LlamaCppRunner(path, slots=8, context=4096)


def test_widths_and_batches_give_the_same_bits(runner):
    tok = models.load_tokenizer(models.DEFAULT_TARGET)
    ids = tok("def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n")["input_ids"] * 3
    block, steps = runner.new_sequence(), runner.new_sequence()
    runner.prefill(block, ids[:40])
    runner.prefill(steps, ids[:40])
    wide = runner.extend(block, ids[40:49])  # 9 positions: two groups of 4 and one left over
    narrow = torch.cat([runner.extend(steps, [t]) for t in ids[40:49]])
    assert torch.equal(wide, narrow)
    # four sequences' rows in one forward, each as it is alone
    seqs = [runner.new_sequence() for _ in range(4)]
    for i, s in enumerate(seqs):
        runner.prefill(s, ids[i : i + 30])
    rows = [Row(s, ids[30 + i : 30 + i + 1 + i], keep=1 + i) for i, s in enumerate(seqs)]
    together = runner.forward(rows)
    for i in range(4):
        alone = runner.new_sequence()
        runner.prefill(alone, ids[i : i + 30])
        assert torch.equal(together[i], runner.extend(alone, ids[30 + i : 30 + i + 1 + i]))


def test_q6k_four_position_kernel_changes_no_bits(tmp_path):
    """scripts/patch_ggml_q6k_columns.py multiplies the Q6_K tensors 4 positions at a time: the logits of a
    prompt, a ragged batch and single steps are the same bits with it on and off (each its own process:
    ggml reads the switch once)."""
    path = models.gguf_source(models.DEFAULT_TARGET, download=False)
    if path is None:
        pytest.skip("the built-in target's GGUF is not fetched (specdec models fetch)")
    script = (
        "import sys, torch\n"
        "from specdec_core.runtime.backends.llamacpp import LlamaCppRunner\n"
        "from specdec_core.runtime.interface import Row\n"
        f"r = LlamaCppRunner({str(path)!r}, slots=4, context=2048)\n"
        "ids = [100 + (i * 7919) % 20000 for i in range(400)]\n"
        "a, b = r.new_sequence(), r.new_sequence()\n"
        "out = [r.extend(a, ids[:157], keep=5)]\n"
        "out += r.forward([Row(a, ids[157:164], keep=7), Row(b, ids[:6], keep=6)])\n"
        "out.append(torch.cat([r.extend(a, [t]) for t in ids[164:169]]))\n"
        "torch.save(out, sys.argv[1])\n"
    )
    results = []
    for on in ("1", "0"):
        out = tmp_path / f"x4_{on}.pt"
        env = {**os.environ, "GGML_CPU_Q6K_X4": on}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=ROOT)
        results.append(torch.load(out))
    for x, y in zip(*results):
        assert torch.equal(x, y)
