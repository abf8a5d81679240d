"""Static-shape forwards (runtime/backends/torch_static.py): the same logits as the dynamic runner (fp32, atol 1e-4) over
prefill chunks, verify blocks, rollbacks and mixed batches; the same greedy ids through the decoding loop;
fixed slots and capacity."""

import pytest
import torch
from tiny import FAMILIES, hf_greedy, perturbed, tiny_model, tiny_tokenizer

from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import FixedDraftLength
from specdec_core.drafting import ModelDrafter
from specdec_core.runtime.backends.torch_eager import ModelRunner, Row
from specdec_core.runtime.backends.torch_static import Buckets, StaticRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stopping import StopCriteria

BUCKETS = Buckets(rows=(1, 2, 4), widths=(1, 2, 4, 8, 16), capacity=96)


def script(runner):
    """Prefill chunks, verify blocks with rollbacks, and forwards of several rows of unequal widths."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 400, (n,), generator=g).tolist()  # noqa: E731
    a, b, c = runner.new_sequence(), runner.new_sequence(), runner.new_sequence()
    out = [runner.extend(a, ids(13), keep=1), runner.extend(a, ids(16))]  # a prompt in two chunks
    out += runner.forward([Row(b, ids(7), 7), Row(c, ids(3), 1)])  # two rows, padded to 8 tokens
    runner.rollback(a, 20)  # a rejected tail
    out += runner.forward([Row(a, ids(5), 5), Row(b, ids(1), 1), Row(c, ids(1), 1)])  # verify + 2 steps
    runner.rollback(b, 6)
    out += runner.forward([Row(b, ids(2), 2)])
    out.append(runner.extend(c, ids(20), keep=2))  # past the widest bucket: the dynamic path
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_static_forwards_give_the_dynamic_logits(family):
    model = tiny_model(family)
    dynamic = script(ModelRunner(model))
    static = script(StaticRunner(model, buckets=BUCKETS, max_sequences=4))
    assert len(dynamic) == len(static)
    for d, s in zip(dynamic, static, strict=True):
        assert d.shape == s.shape
        torch.testing.assert_close(s, d, atol=1e-4, rtol=0)


def test_static_runners_decode_the_targets_greedy_ids():
    target = tiny_model("qwen2")
    drafter = perturbed(target, 0.2)
    prompt = tiny_tokenizer()("def add(a, b):\n")["input_ids"]
    decoder = SpeculativeDecoder(StaticRunner(target, buckets=BUCKETS, max_sequences=4), tiny_tokenizer())
    out = []
    for chunk in decoder.generate(
        prompt,
        SamplingParams(),
        StopCriteria(max_new_tokens=40),
        ModelDrafter(StaticRunner(drafter, buckets=BUCKETS, max_sequences=4)),
        FixedDraftLength(5),
    ):
        out.extend(chunk.token_ids)
    assert out == hf_greedy(target, prompt, 40)


def test_slots_and_capacity_are_fixed():
    runner = StaticRunner(tiny_model("llama"), buckets=BUCKETS, max_sequences=2)
    first, second = runner.new_sequence(), runner.new_sequence()
    with pytest.raises(RuntimeError, match="slots"):
        runner.new_sequence()
    runner.release(second)
    runner.new_sequence()  # a released slot is reused
    runner.extend(first, list(range(90)), keep=1)
    with pytest.raises(ValueError, match="capacity"):
        runner.extend(first, list(range(8)))
    assert runner.max_positions == BUCKETS.capacity


def test_services_run_static_shapes_when_asked():
    """`--static-shapes on` (auto: CUDA only) through both services: the target's greedy ids."""
    from test_services import Pair

    from client import SpecDecClient
    from specdec.config import VerifierConfig
    from specdec_core.runtime.backends.torch_static import make_runner

    target = tiny_model("llama")
    assert type(make_runner(target, static="auto")) is ModelRunner  # CPU: the dynamic runner
    assert isinstance(make_runner(target, static="on", max_sequences=2, capacity=64), StaticRunner)
    pair = Pair(target, perturbed(target, 0.2))
    try:
        pair.v_server.stop(0)
        pair.v_engine.close()
        pair.v_cfg = VerifierConfig(**{**pair.v_cfg.__dict__, "static_shapes": "on", "kv_capacity": 256})
        pair.start_verifier(0)
        assert isinstance(pair.v_engine.runner, StaticRunner)
        prompt = tiny_tokenizer()("def add(a, b):\n")["input_ids"]
        with SpecDecClient(pair.verifier_addr) as c:
            r = c.generate("def add(a, b):\n", max_new_tokens=30, ignore_eos=True, num_draft_tokens=4)
        assert r.token_ids == hf_greedy(target, prompt, 30) and r.stats["drafted"] > 0
    finally:
        pair.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_static_forward_traces_as_one_graph(family):
    """What a CUDA graph captures (``StaticRunner._base``) reads nothing back on the host: TorchDynamo traces
    it whole, without a graph break (an ``.item()``, a ``.tolist()`` or a branch on a tensor's value would
    break it, and would stop a capture on CUDA). A CPU stand-in for the capture the GPU check makes."""
    import torch._dynamo as dynamo

    runner = StaticRunner(
        tiny_model(family), buckets=Buckets(rows=(1, 2), widths=(1, 4), capacity=64), max_sequences=2
    )
    inputs = {k: v.to(runner.device) for k, v in runner._inputs([], 2, 4).items()}
    dynamo.reset()
    try:
        explained = dynamo.explain(runner._base)(inputs)
    finally:
        dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
