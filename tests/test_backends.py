"""The runner contract (``runtime/interface.py``), the same cases against every backend: torch eager, torch
static shapes and llama.cpp (a tiny Qwen2 GGUF written by the ``gguf`` package); then the llama.cpp path
through both services (greedy = no-draft, seeded = no-draft seeded)."""

import pytest
import torch
from tiny import save_tiny_gguf, tiny_tokenizer

from client import SpecDecClient
from drafter_service.server import start as start_drafter
from drafter_service.sessions import DrafterEngine
from specdec.config import DrafterConfig, VerifierConfig
from specdec_core.runtime.backends import llamacpp
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.runtime.backends.torch_static import Buckets, StaticRunner
from specdec_core.runtime.factory import choose_backend
from specdec_core.runtime.interface import Row, Runner
from verifier_service.server import start as start_verifier
from verifier_service.verifier import VerifierEngine

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")
PROMPT = "def add(a, b):\n"
IDS = tiny_tokenizer()(PROMPT)["input_ids"] + [5, 17, 99, 120, 3, 44, 250, 301]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """(target path, its dense model, drafter path, Q4_1 target path): a tiny target and a perturbed
    drafter as Q4_0 GGUF files (repacked by llama.cpp, as the built-in Q4_K models are), and the target as
    Q4_1 (multiplied position by position even without the patch)."""
    root = tmp_path_factory.mktemp("gguf")
    target, dense = save_tiny_gguf("qwen2", root / "target" / "tiny.gguf", qtype="Q4_0")
    drafter, _ = save_tiny_gguf("qwen2", root / "drafter" / "tiny.gguf", noise=0.1, qtype="Q4_0")
    stock, _ = save_tiny_gguf("qwen2", root / "stock" / "tiny.gguf", qtype="Q4_1")
    return target, dense, drafter, stock


BACKENDS = [
    "torch",
    "static",
    pytest.param("llamacpp", marks=needs_llamacpp),
    pytest.param("llamacpp-stock", marks=needs_llamacpp),  # the settings for a build without the patch
]


def make(backend: str, gguf) -> Runner:
    path, dense, _, stock = gguf
    if backend == "torch":
        return ModelRunner(dense)
    if backend == "static":
        return StaticRunner(dense, buckets=Buckets(rows=(1, 2, 4), widths=(1, 4, 8, 32), capacity=128))
    if backend == "llamacpp-stock":
        return llamacpp.LlamaCppRunner(stock, slots=8, context=1024, patched=False)
    return llamacpp.LlamaCppRunner(path, slots=8, context=1024)


def exact(backend: str) -> dict:
    """llama.cpp's runner computes each position alone (bit-identical); torch's GEMMs vary by shape."""
    return {"atol": 0.0, "rtol": 0.0} if backend.startswith("llamacpp") else {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_rows_equal_each_row_alone(backend, gguf):
    runner = make(backend, gguf)
    assert isinstance(runner, Runner)
    a, b, c = (runner.new_sequence() for _ in range(3))
    runner.prefill(a, IDS[:10])
    runner.prefill(b, IDS[:3])
    batched = runner.forward([Row(a, IDS[10:13], keep=3), Row(b, IDS[3:12], keep=2), Row(c, IDS[:1])])
    for n_before, fed, keep, out in ((10, IDS[10:13], 3, batched[0]), (3, IDS[3:12], 2, batched[1])):
        alone = runner.new_sequence()
        runner.prefill(alone, IDS[:n_before])
        torch.testing.assert_close(out, runner.extend(alone, fed, keep=keep), **exact(backend))
    alone = runner.new_sequence()
    torch.testing.assert_close(batched[2], runner.extend(alone, IDS[:1]), **exact(backend))
    assert len(a) == 13 and len(b) == 12 and len(c) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_at_a_time_equals_a_block(backend, gguf):
    """What losslessness rests on: a verify of k + 1 positions gives the logits of k + 1 decoding steps."""
    runner = make(backend, gguf)
    block, steps = runner.new_sequence(), runner.new_sequence()
    runner.prefill(block, IDS[:8])
    runner.prefill(steps, IDS[:8])
    wide = runner.extend(block, IDS[8:14])
    narrow = torch.cat([runner.extend(steps, [t]) for t in IDS[8:14]])
    torch.testing.assert_close(wide, narrow, **exact(backend))


@pytest.mark.parametrize("backend", ["llamacpp", "llamacpp-stock"])
def test_long_attention_ignores_width_and_where_the_cells_lie(backend, gguf):
    """Past flash attention's tile sizes (64 queries, 64 cells; a lone query's KV split from 512 cells on a
    stock build): a sequence whose cells lie interleaved with another's in the unified cache, fed in
    ragged chunks of every width, gets the logits of the same text prefilled alone in one chunk and then
    decoded one token at a time."""
    if backend == "llamacpp" and not llamacpp._patched():
        pytest.skip("needs the patched build (make setup)")
    path, _, _, stock = gguf
    runner = llamacpp.LlamaCppRunner(
        stock if backend == "llamacpp-stock" else path, slots=4, context=2048, patched=backend == "llamacpp"
    )
    text = [3 + (i * 37) % 290 for i in range(600)]
    other = [3 + (i * 11) % 290 for i in range(400)]
    a, b = runner.new_sequence(), runner.new_sequence()
    runner.prefill(b, other[:70])
    done = 0
    for width in (90, 1, 5, 130, 2, 70, 3, 200):  # a's chunks, each beside a few of b's tokens
        fed = text[done : done + width]
        got = runner.forward(
            [Row(a, fed, keep=min(4, width)), Row(b, other[70 + done // 2 : 73 + done // 2])]
        )
        done += width
    assert done == len(a) == 501
    alone = runner.new_sequence()
    runner.prefill(alone, text[:497])
    steps = torch.cat([runner.extend(alone, [t]) for t in text[497:501]])
    torch.testing.assert_close(got[0][-4:], steps, **exact(backend))


@needs_llamacpp
def test_llamacpp_padding_to_a_group_of_four_changes_no_logits(gguf):
    """Forwards of 2, 3 and 7 positions are fed with scratch tokens up to 4 and 8 (``padded_width``): the
    logits are the same bits as unpadded, and the scratch tokens leave no cell behind."""
    assert [llamacpp.padded_width(n) for n in range(1, 13)] == [1, 4, 4, 4, 5, 6, 8, 8, 9, 10, 12, 12]
    runner = make("llamacpp", gguf)
    base = runner.new_sequence()
    runner.prefill(base, IDS[:5])
    held = runner.kv_tokens_held
    for width in (2, 3, 7):
        got = {}
        for pad in (True, False):
            runner.pad = pad
            got[pad] = runner.extend(base, IDS[5 : 5 + width], keep=width)
            runner.rollback(base, 5)
        torch.testing.assert_close(got[True], got[False], atol=0.0, rtol=0.0)
    seqs = [runner.new_sequence() for _ in range(3)]  # three sequences' lone tokens: one forward of 3
    runner.pad = True
    together = runner.forward([Row(s, IDS[i : i + 1]) for i, s in enumerate(seqs)])
    runner.pad = False
    for i, (s, out) in enumerate(zip(seqs, together)):
        runner.rollback(s, 0)
        torch.testing.assert_close(out, runner.extend(s, IDS[i : i + 1]), atol=0.0, rtol=0.0)
    assert runner.kv_tokens_held == held + 3


@needs_llamacpp
def test_drafting_file_cuts_the_head_to_its_frequent_tokens(gguf, tmp_path, monkeypatch):
    """A drafting file (``draft_file.py``): Q4_0 weights, the head's rows in frequency order, and llama.cpp
    computes only the first ``head_rows`` of them: those tokens' logits are the very bits the same file gets
    with its whole head, every other token's are -inf, and the control tokens are always among them."""
    from specdec_core.runtime.backends import draft_file
    from specdec_core.runtime.factory import drafting_file

    if not draft_file.head_rows_supported():
        pytest.skip("this llama.cpp build lacks scripts/patch_llama_head_rows.py (make setup builds it)")
    _, _, drafter, _ = gguf
    corpus = tmp_path / "corpus.py"
    corpus.write_text(PROMPT * 20 + "def sub(a, b):\n    return a - b\n" * 5)
    monkeypatch.setattr(draft_file, "corpus_files", lambda: [corpus])
    cut = draft_file.derive(drafter, tmp_path / "cache", head_rows=64)
    whole = draft_file.derive(drafter, tmp_path / "cache", head_rows=0)
    assert draft_file.derive(drafter, tmp_path / "cache", head_rows=64) == cut  # made once
    assert drafting_file(drafter, "none", 64) == drafter
    head = draft_file.head_ids(cut)
    assert head is not None and draft_file.head_ids(whole) is None
    tok = tiny_tokenizer()
    assert len(head) == 64 and len(set(head.tolist())) == 64
    control = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    assert control <= set(head.tolist())
    assert set(tok(PROMPT)["input_ids"]) <= set(head.tolist())  # the corpus's tokens rank first
    with monkeypatch.context() as m:  # a build that computes every row: they come in the file's order
        m.setattr(draft_file, "head_rows_supported", lambda: False)
        order = draft_file.head_ids(cut)
        assert (
            order is not None
            and sorted(order.tolist()) == list(range(len(tok)))
            and (order[:64] == head).all()
        )
    runners = [llamacpp.LlamaCppRunner(p, slots=2, context=256, invariant=False) for p in (cut, whole)]
    assert "Q4_0" in runners[0].describe()["dtype"]
    got = [r.extend(r.new_sequence(), IDS, keep=len(IDS)) for r in runners]
    torch.testing.assert_close(got[0][:, head], got[1][:, head], atol=0.0, rtol=0.0)
    rest = torch.ones(got[0].shape[-1], dtype=torch.bool)
    rest[head] = False
    assert torch.isneginf(got[0][:, rest]).all() and torch.isfinite(got[0][:, head]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_and_reused_slots(backend, gguf):
    runner = make(backend, gguf)
    seq = runner.new_sequence()
    first = runner.extend(seq, IDS[:12], keep=1)
    runner.rollback(seq, 6)
    runner.extend(seq, [7, 8, 9])  # other tokens where the rolled-back ones were
    runner.rollback(seq, 6)
    again = runner.extend(seq, IDS[6:12], keep=1)
    torch.testing.assert_close(first, again, **exact(backend))
    runner.release(seq)
    assert runner.active_sequences == (1 if backend == "static" else 0)  # static: the scratch slot
    fresh = runner.new_sequence()  # the released slot, its cache cleared
    torch.testing.assert_close(runner.extend(fresh, IDS[:12], keep=1), first, **exact(backend))
    assert runner.kv_tokens_held == 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepped_rows_decode_what_single_steps_decode(backend, gguf):
    runner = make(backend, gguf)

    def greedy(logits, step):
        return (logits.argmax().reshape(1),)

    seqs = [runner.new_sequence() for _ in range(2)]
    out = runner.forward(
        [Row(seqs[0], IDS[:5], steps=4, pick=greedy), Row(seqs[1], IDS[:9], steps=2, pick=greedy)]
    )
    picked = [[int(p[0]) for p in o] for o in out]
    for seq, n, steps, got in ((seqs[0], 5, 4, picked[0]), (seqs[1], 9, 2, picked[1])):
        ref = runner.new_sequence()
        logits = runner.extend(ref, IDS[:n], keep=1)
        want = []
        for _ in range(steps):
            want.append(int(logits[-1].argmax()))
            logits = runner.extend(ref, [want[-1]])
        assert got == want
        assert seq.tokens == IDS[:n] + want[:-1]  # every pick but the last is cached


@needs_llamacpp
def test_llamacpp_logits_match_the_dense_model_within_its_quantization(gguf):
    path, dense, _, _ = gguf
    runner, reference_runner = llamacpp.LlamaCppRunner(path, slots=2, context=512), ModelRunner(dense)
    quantized = runner.extend(runner.new_sequence(), IDS)
    reference = reference_runner.extend(reference_runner.new_sequence(), IDS)
    # the same Q4_1 weights; llama.cpp quantizes activations to 8 bits per block of 32 and caches f16 KV
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@needs_llamacpp
def test_backend_choice(gguf, tmp_path):
    path = str(gguf[0])
    assert choose_backend("auto", path, "cpu") == "llamacpp"
    assert choose_backend("torch", path, "cpu") == "torch"
    assert choose_backend("auto", str(tmp_path), "cpu") == "torch"  # a checkpoint directory
    with pytest.raises(ValueError, match="GGUF"):
        choose_backend("llamacpp", str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("onnx", path, "cpu")


@pytest.fixture(scope="module")
def gguf_services(gguf):
    """Both services on llama.cpp (no model objects passed: the services load the GGUF files themselves)."""
    target, _, drafter, _ = gguf
    d_cfg = DrafterConfig(port=0, host="127.0.0.1", model=str(drafter), max_sessions=4)
    d_engine = DrafterEngine(d_cfg)
    d_server, d_port, _ = start_drafter(d_cfg, d_engine)
    v_cfg = VerifierConfig(
        port=0,
        host="127.0.0.1",
        model=str(target),
        max_sessions=4,
        max_running=4,
        drafters=(f"127.0.0.1:{d_port}",),
    )
    v_engine = VerifierEngine(v_cfg)
    v_server, v_port, _ = start_verifier(v_cfg, v_engine)
    yield v_engine, d_engine, f"127.0.0.1:{v_port}", f"127.0.0.1:{d_port}"
    v_server.stop(0)
    d_server.stop(0)
    v_engine.close()
    d_engine.close()


@needs_llamacpp
def test_llamacpp_services_greedy_equals_no_draft(gguf_services):
    v_engine, d_engine, verifier, drafter = gguf_services
    assert v_engine.backend == d_engine.backend == "llamacpp"
    with SpecDecClient(verifier, drafter) as c:
        plain = c.generate(PROMPT, max_new_tokens=40, no_draft=True, ignore_eos=True)
        drafted = c.generate(PROMPT, max_new_tokens=40, num_draft_tokens=4, ignore_eos=True)
    assert drafted.token_ids == plain.token_ids and len(plain.token_ids) == 40
    assert drafted.stats["drafted"] > 0 and drafted.stats["accepted"] > 0
    assert "Q4_0" in v_engine.runner.describe()["dtype"]


@needs_llamacpp
def test_llamacpp_services_seeded_sampling_equals_no_draft(gguf_services):
    _, _, verifier, drafter = gguf_services
    kw = dict(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    with SpecDecClient(verifier, drafter) as c:
        plain = c.generate(PROMPT, no_draft=True, **kw)
        drafted = c.generate(PROMPT, num_draft_tokens=4, **kw)
        again = c.generate(PROMPT, num_draft_tokens=4, **kw)
    assert drafted.token_ids == again.token_ids
    assert drafted.stats["drafted"] > 0
    # seeded sampling is keyed by position (the coupled race), so drafting does not change the draw
    assert drafted.token_ids == plain.token_ids


@needs_llamacpp
def test_llamacpp_forward_that_runs_out_of_cells_leaves_every_sequence_as_it_was(gguf):
    runner = llamacpp.LlamaCppRunner(gguf[0], slots=4, context=1024)
    held, a, b = runner.new_sequence(), runner.new_sequence(), runner.new_sequence()
    runner.prefill(held, [i % 400 for i in range(400)])
    first = runner.extend(a, IDS, keep=1)
    runner.rollback(a, 0)
    # 700 positions in two llama_decode calls: the first (512) fits, the second finds no cells left
    with pytest.raises(MemoryError):
        runner.forward([Row(a, [i % 400 for i in range(300)]), Row(b, [i % 400 for i in range(400)])])
    assert (len(held), len(a), len(b)) == (400, 0, 0)
    torch.testing.assert_close(runner.extend(a, IDS, keep=1), first, atol=0.0, rtol=0.0)
