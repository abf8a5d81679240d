"""One short GPU check (issue #13): correctness on CUDA, eager vs static shapes + CUDA graphs on the real Qwen2.5
architectures, and one generation end to end through both services.

Usage: python -m benchmarks.gpu_check [--sections correctness,graphs,e2e,compile] [--out docs/gpu_check_<gpu>.json]
       python -m benchmarks.gpu_check --tiny --device cpu --out /tmp/dry.json   (a dry run on CPU, tiny shapes)

Sections (each one's results are written to ``--out`` as soon as it ends; a section that fails records its
error and the next one runs):

1. ``correctness``: speculative greedy == HF greedy on tiny Llama/Qwen2/GPT-2 (fp32 and bf16), seeded sampling
   reproducible, and one generation through both gRPC services in-process.
2. ``graphs``: the Qwen2.5 0.5B / 1.5B / 7B / 14B architectures (published shapes, random weights, bf16) on
   the dynamic runner (eager) and on the static runner with CUDA graphs (``specdec_core/runtime/backends/torch_static.py``),
   at batch 1 and 8: a 1-token step, an 8-position verify, and a drafter's block of 8 tokens in one call
   (``Row.pick``: one wait for the device); each model's weight-read time at the measured copy bandwidth;
   static-vs-dynamic logits and greedy ids in bf16; the projected speed-up of 0.5B -> 1.5B / 7B / 14B at the
   best k (k = 0, not drafting, counts as 1.0x) for ``--alpha``, the per-token acceptance of the real pair
   measured on CPU (0.78 in docs/results/lookup_qwen.json): random weights make acceptance meaningless here.
3. ``e2e``: the 1.5B architecture (over the tiny tokenizer's vocabulary, so the services can detokenize)
   served by both services in this process on this GPU, the target's own weights as the drafter: tokens/s
   drafting k tokens against the projection from the services' own runners' measured costs and the measured
   tokens per round; ``--no-draft`` against Hugging Face ``generate`` with its static cache (compiled by
   transformers on CUDA) and with its default dynamic cache.
4. ``compile``: the capture by hand against ``torch.compile(mode="reduce-overhead")`` of the same static
   forward, on the 0.5B shapes' 1-token step (last: a compile that runs long loses nothing else).

The first H100 check's eager cost curves (``docs/gpu_check_h100.json``, "costs") are the ``eager_b1``
columns of the ``graphs`` section now.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def check_correctness(device: str) -> dict:
    from tiny import FAMILIES, perturbed, tiny_model, tiny_tokenizer

    from specdec_core.decoder import SpeculativeDecoder
    from specdec_core.draft_length import FixedDraftLength
    from specdec_core.drafting import ModelDrafter
    from specdec_core.runtime.backends.torch_eager import ModelRunner
    from specdec_core.sampling import SamplingParams
    from specdec_core.stopping import StopCriteria

    prompt = tiny_tokenizer()("def add(a, b):\n")["input_ids"]
    out: dict = {}
    for family in FAMILIES:
        for dtype in (torch.float32, torch.bfloat16):
            target = tiny_model(family).to(device, dtype)
            drafter = perturbed(tiny_model(family), 0.1).to(device, dtype)
            x = torch.tensor([prompt], device=device)
            ref = target.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False, eos_token_id=None
            )[0, len(prompt) :].tolist()
            dec = SpeculativeDecoder(ModelRunner(target), tiny_tokenizer())

            def run(params, dec=dec, drafter=drafter, draft=True):
                return [
                    t
                    for c in dec.generate(
                        prompt,
                        params,
                        StopCriteria(max_new_tokens=48),
                        ModelDrafter(ModelRunner(drafter)) if draft else None,
                        FixedDraftLength(4),
                    )
                    for t in c.token_ids
                ]

            greedy = run(SamplingParams())
            seeded = SamplingParams(temperature=0.9, seed=3)
            s1, s2 = run(seeded), run(seeded)
            out[f"{family}/{str(dtype).split('.')[-1]}"] = {
                "greedy_equal": greedy == ref,
                "seeded_equal": s1 == s2,
                # without a drafter: plain decoding in blocks of the decoder's plain_steps (8 on CUDA)
                "plain_greedy_equal": run(SamplingParams(), draft=False) == ref,
                "plain_seeded_equal": run(seeded, draft=False) == s1,
                "first_diff": next((i for i, (a, b) in enumerate(zip(greedy, ref)) if a != b), None),
            }
    out["grpc"] = check_grpc(device)
    return out


def check_grpc(device: str) -> bool:
    from tiny import perturbed, tiny_model, tiny_tokenizer

    from client import SpecDecClient
    from drafter_service.server import start as start_drafter
    from drafter_service.sessions import DrafterEngine
    from specdec.config import DrafterConfig, VerifierConfig
    from verifier_service.server import start as start_verifier
    from verifier_service.verifier import VerifierEngine

    target = tiny_model("qwen2").to(device)
    drafter = perturbed(tiny_model("qwen2"), 0.1).to(device)
    d_engine = DrafterEngine(DrafterConfig(device=device, lookahead=True), drafter, tiny_tokenizer())
    d_srv, d_port, _ = start_drafter(DrafterConfig(port=0, host="127.0.0.1"), d_engine)
    v_cfg = VerifierConfig(port=0, host="127.0.0.1", device=device, drafters=(f"127.0.0.1:{d_port}",))
    v_engine = VerifierEngine(v_cfg, target, tiny_tokenizer())
    v_srv, v_port, _ = start_verifier(v_cfg, v_engine)
    try:
        with SpecDecClient(f"127.0.0.1:{v_port}") as c:
            spec = c.generate("def add(a, b):\n", max_new_tokens=32, ignore_eos=True, num_draft_tokens=4)
            adaptive = c.generate("def add(a, b):\n", max_new_tokens=32, ignore_eos=True, adaptive=True)
            base = c.generate("def add(a, b):\n", max_new_tokens=32, ignore_eos=True, no_draft=True)
        return spec.token_ids == base.token_ids == adaptive.token_ids and spec.stats["drafted"] > 0
    finally:
        v_srv.stop(0)
        d_srv.stop(0)
        v_engine.close()
        d_engine.close()


# published shapes of the Qwen2.5 family (the config.json of each release); weights are random here
QWEN25: dict[str, dict[str, Any]] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064),
}  # fmt: skip
TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)  # fmt: skip


def _median_ms(fn, device: str, repeats: int = 15) -> float:
    from .common import sync

    fn()  # warm
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _costs(runner, device: str, batch: int, prompt: int = 128, verify: int = 8, block: int = 8) -> dict:
    """Median ms with ``batch`` rows: a 1-token step, a ``verify``-position verify, and a drafter's block of
    ``block`` greedy tokens in one call (a stepped row: one wait for the device)."""
    from specdec_core.runtime.backends.torch_eager import Row

    seqs = [runner.new_sequence() for _ in range(batch)]
    for s in seqs:
        runner.prefill(s, [(1000 + i) % runner.vocab_size for i in range(prompt)])

    def forward(rows):
        runner.forward(rows)
        for s in seqs:
            runner.rollback(s, prompt)

    out = {
        "step_ms": _median_ms(lambda: forward([Row(s, [7], 1) for s in seqs]), device),
        f"verify{verify}_ms": _median_ms(
            lambda: forward([Row(s, [7] * verify, verify) for s in seqs]), device
        ),
        f"block{block}_ms": _median_ms(
            lambda: forward([Row(s, [7], 1, steps=block, pick=_argmax) for s in seqs]), device
        ),
    }
    for s in seqs:
        runner.release(s)
    return out


def _argmax(logits: torch.Tensor, step: int) -> tuple[torch.Tensor]:
    return (logits.argmax().reshape(1),)


def _speedup(alpha: float, t_draft: float, t_target: dict[int, float], k_max: int = 8) -> tuple[float, int]:
    """The best projected speed-up over target-only decoding, and its k (0: do not draft, 1.0x). The verify
    of k + 1 positions is interpolated between the measured 1 and 8 (verify cost is ~flat on GPUs)."""
    t1, t8 = t_target[1], t_target[8]
    best, best_k = 1.0, 0
    for k in range(1, k_max + 1):
        tk = t1 + (t8 - t1) * min(k, 7) / 7
        expected = (1 - alpha ** (k + 1)) / (1 - alpha)
        rate = expected * t1 / (k * t_draft + tk)
        if rate > best:
            best, best_k = rate, k
    return best, best_k


def _build(shape: dict[str, Any], device: str, dtype: torch.dtype):
    """A Qwen2 causal LM of ``shape`` with random weights, built in ``dtype`` on ``device`` (a 14B model
    built in fp32 first would not fit an 80 GB GPU)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def measure_graphs(device: str, alpha: float, tiny: bool, names: tuple[str, ...] = tuple(QWEN25)) -> dict:
    """Eager vs static shapes + CUDA graphs per architecture, equality checks, projections."""
    from specdec_core.runtime.backends.torch_eager import ModelRunner
    from specdec_core.runtime.backends.torch_static import Buckets, StaticRunner

    from .common import measure_bandwidth, weight_bytes

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    graphs = device.startswith("cuda")
    buckets = Buckets(rows=(1, 8), widths=(1, 8, 9, 16, 128), capacity=512)
    result: dict = {
        "alpha": alpha,
        "dtype": str(dtype),
        "bandwidth_gbs": measure_bandwidth(device),
        "models": {},
    }
    for name in names:
        shape = QWEN25[name]
        t0 = time.perf_counter()
        model = _build(TINY if tiny else shape, device, dtype)
        size = weight_bytes(model)
        row: dict = {"build_s": time.perf_counter() - t0, "weight_gb": size / 1e9}
        row["weight_read_ms"] = 1000 * size / (result["bandwidth_gbs"] * 1e9)
        eager = ModelRunner(model)
        t0 = time.perf_counter()
        static = StaticRunner(model, buckets=buckets, max_sequences=8, graphs=graphs)
        row["capture_s"], row["graphs"] = time.perf_counter() - t0, len(static._graphs)
        row["logits_max_diff"], row["greedy_equal"] = _compare(eager, static)
        for batch in (1, 8):
            row[f"eager_b{batch}"] = _costs(eager, device, batch)
            row[f"graphs_b{batch}"] = _costs(static, device, batch)
        b1 = row["graphs_b1"]
        row["graphs_step_over_weight_read"] = b1["step_ms"] / row["weight_read_ms"]
        row["graphs_verify8_over_step"] = b1["verify8_ms"] / b1["step_ms"]
        row["graphs_block_token_ms"] = b1["block8_ms"] / 8
        result["models"][name] = row
        print(name, json.dumps(row), flush=True)
        del eager, static, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "0.5b" in result["models"]:
        result["projected"] = _projections(result["models"], alpha)
    return result


def _projections(models: dict, alpha: float) -> dict:
    """0.5B drafting for each larger target, per mode and batch. The drafter's cost per token: a step with
    its wait (eager, one forward at a time) or an eighth of a block drafted in one call (graphs)."""
    projected = {}
    for target in [t for t in ("1.5b", "7b", "14b") if t in models]:
        for mode in ("eager", "graphs"):
            for batch in (1, 8):
                d, t = models["0.5b"][f"{mode}_b{batch}"], models[target][f"{mode}_b{batch}"]
                draft = d["step_ms"] if mode == "eager" else d["block8_ms"] / 8
                rate, k = _speedup(alpha, draft, {1: t["step_ms"], 8: t["verify8_ms"]})
                projected[f"0.5b->{target} {mode} batch {batch}"] = {
                    "speedup": rate,
                    "k": k,
                    "draft_ms": draft,
                }
    return projected


def _compare(eager, static, steps: int = 24) -> tuple[float, bool]:
    """Largest |logit| difference of a prefill + 8-position verify, and whether greedy decoding agrees."""
    prompt = [(1000 + i * 37) % eager.vocab_size for i in range(40)]
    a, b = eager.new_sequence(), static.new_sequence()
    la, lb = eager.extend(a, prompt, keep=8), static.extend(b, prompt, keep=8)
    diff = float((la - lb).abs().max())
    ids_a, ids_b = [int(la[-1].argmax())], [int(lb[-1].argmax())]
    for _ in range(steps):
        ids_a.append(int(eager.extend(a, ids_a[-1:], keep=1)[-1].argmax()))
        ids_b.append(int(static.extend(b, ids_b[-1:], keep=1)[-1].argmax()))
    eager.release(a)
    static.release(b)
    return diff, ids_a == ids_b


def measure_e2e(
    device: str, tiny: bool, k: int = 4, tokens: int = 128, repeats: int = 3, plain_steps: int = 0
) -> dict:
    """Both services on this device, the target's own weights as the drafter (module docstring, 3.)."""
    from tiny import tiny_tokenizer

    from client import SpecDecClient
    from drafter_service.server import start as start_drafter
    from drafter_service.sessions import DrafterEngine
    from specdec.config import DrafterConfig, VerifierConfig
    from verifier_service.server import start as start_verifier
    from verifier_service.verifier import VerifierEngine

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    vocab = len(tiny_tokenizer())
    model = _build({**(TINY if tiny else QWEN25["1.5b"]), "vocab_size": vocab}, device, dtype)
    prompt = [(7 + 13 * i) % vocab for i in range(64)]
    result: dict = {"model": "qwen2.5-1.5b shapes" if not tiny else "tiny", "k": k, "tokens": tokens}

    common = dict(device=device, max_batch_rows=8, max_sessions=8, kv_capacity=1024, prefill_chunk=64)
    t0 = time.perf_counter()
    ids: dict[str, list[int]] = {}
    d_engine = DrafterEngine(DrafterConfig(quantization="none", **common), model, tiny_tokenizer())  # type: ignore[arg-type]
    d_srv, d_port, _ = start_drafter(DrafterConfig(port=0, host="127.0.0.1"), d_engine)
    v_cfg = VerifierConfig(
        port=0,
        host="127.0.0.1",
        drafters=(f"127.0.0.1:{d_port}",),
        max_running=8,
        plain_steps=plain_steps,
        **common,  # type: ignore[arg-type]
    )
    v_engine = VerifierEngine(v_cfg, model, tiny_tokenizer())
    v_srv, v_port, _ = start_verifier(v_cfg, v_engine)
    result["services_start_s"] = time.perf_counter() - t0
    result["runners"] = [type(v_engine.runner).__name__, type(d_engine.runner).__name__]
    try:
        with SpecDecClient(f"127.0.0.1:{v_port}") as c:

            def run(**kw):
                t = time.perf_counter()
                r = c.generate(prompt, max_new_tokens=tokens, ignore_eos=True, **kw)
                return r, time.perf_counter() - t

            plain = v_engine.decoder.plain_steps
            result["plain_steps"] = plain
            for name, kw in (
                ("no_draft_plain_steps_1", {"no_draft": True}),
                ("no_draft", {"no_draft": True}),
                ("draft", {"num_draft_tokens": k}),
            ):
                v_engine.decoder.plain_steps = 1 if name.endswith("_1") else plain  # what --plain-steps sets
                run(**kw)  # warm-up
                runs = [run(**kw) for _ in range(repeats)]
                wall = statistics.median(t for _, t in runs)
                r = runs[0][0]
                ids[name] = r.token_ids
                result[f"specdec_{name}_tok_s"] = tokens / wall
                result[f"specdec_{name}_stats"] = {
                    key: r.stats.get(key) for key in ("rounds", "drafted", "accepted", "target_passes")
                }
                print(name, result[f"specdec_{name}_tok_s"], result[f"specdec_{name}_stats"], flush=True)
        result["draft_equals_no_draft"] = ids["draft"] == ids["no_draft"]
        # the projection, from the services' own runners (idle now), on their compute threads
        target = v_engine.scheduler.call(_costs, v_engine.runner, device, 1, len(prompt), k + 1, k)
        drafter = d_engine.scheduler.call(_costs, d_engine.runner, device, 1, len(prompt), k + 1, k)
        t1, tv, td = target["step_ms"], target[f"verify{k + 1}_ms"], drafter[f"block{k}_ms"]
        stats = result["specdec_draft_stats"]
        per_round = (tokens - 1) / (stats["rounds"] or 1)  # the first token comes with the prefill
        result["costs_ms"] = {"target_step": t1, f"target_verify{k + 1}": tv, f"drafter_block{k}": td}
        result["tokens_per_round"] = per_round
        result["projected_draft_tok_s"] = 1000 * per_round / (td + tv)
        result["projected_no_draft_tok_s"] = 1000 / t1
        result["draft_over_projection"] = result["specdec_draft_tok_s"] / result["projected_draft_tok_s"]
        result["no_draft_over_projection"] = (
            result["specdec_no_draft_tok_s"] / result["projected_no_draft_tok_s"]
        )
    finally:
        v_srv.stop(0)
        d_srv.stop(0)
        v_engine.close()
        d_engine.close()
    # after the services are gone: on a CPU, torch's OpenMP pool on this thread beside the services' compute
    # threads halved their throughput (see runtime/scheduler.py)
    # the peer: Hugging Face generate, static cache (compiled by transformers on CUDA) and dynamic
    x = torch.tensor([prompt], device=device)
    for name, cache in (("hf_static_compiled", "static"), ("hf_dynamic", None)):
        t0 = time.perf_counter()

        def hf(cache=cache):
            return model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                cache_implementation=cache,
            )

        try:
            hf()  # warm-up (the compile, for the static cache)
            out = hf()[0, len(prompt) :].tolist()
            # greedy ids equal to specdec's (bf16: kernels that differ may part at a near tie of random weights)
            result[f"{name}_equals_specdec"] = out == ids["no_draft"]
            result[f"{name}_warmup_s"] = time.perf_counter() - t0
            result[f"{name}_tok_s"] = tokens / (_median_ms(hf, device, repeats) / 1000)
        except Exception as exc:  # noqa: BLE001 - the peer's failure is a result too; specdec's stand
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        print(name, result.get(f"{name}_tok_s"), flush=True)

    for name in ("no_draft", "draft"):
        if "hf_static_compiled_tok_s" in result:
            result[f"{name}_over_hf_static_compiled"] = (
                result[f"specdec_{name}_tok_s"] / result["hf_static_compiled_tok_s"]
            )
    return result


def measure_compile(device: str, tiny: bool) -> dict:
    """How to capture: this project's CUDA graph per bucket by hand against ``torch.compile(mode=
    "reduce-overhead")`` of the same static forward (``StaticRunner._base``), on the 0.5B shapes' 1-token step
    at batch 1 (a drafter's step): the base model's time alone, each way, and the compile's time."""
    from specdec_core.runtime.backends.torch_eager import Row
    from specdec_core.runtime.backends.torch_static import Buckets, StaticRunner

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = _build(TINY if tiny else QWEN25["0.5b"], device, dtype)
    buckets = Buckets(rows=(1,), widths=(1,), capacity=512)
    runner = StaticRunner(model, buckets=buckets, max_sequences=1, graphs=device.startswith("cuda"))
    seq = runner.new_sequence()
    runner.prefill(seq, [(1000 + i) % runner.vocab_size for i in range(128)])
    inputs = runner._inputs([Row(seq, [7], 1)], 1, 1)
    on = {k: v.to(runner.device) for k, v in inputs.items()}
    result: dict = {"shape": "tiny" if tiny else "0.5b", "by_hand_graphs": len(runner._graphs)}
    by_hand = runner._graphs.get((1, 1))
    result["by_hand_base_ms"] = _median_ms(
        (lambda: by_hand.run(inputs)) if by_hand is not None else (lambda: runner._base(on)), device, 50
    )
    t0 = time.perf_counter()
    compiled = torch.compile(runner._base, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # the compile, then the graph's recording
        compiled(on)
    result["compile_s"] = time.perf_counter() - t0
    result["compiled_base_ms"] = _median_ms(lambda: compiled(on), device, 50)
    return result


SECTIONS = ("correctness", "graphs", "e2e", "compile")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--sections", default="correctness,graphs,e2e,compile", help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    p.add_argument("--graphs", action="store_true", help="the graphs section alone (--sections graphs)")
    p.add_argument("--alpha", type=float, default=0.78, help="per-token acceptance of the real pair (CPU)")
    p.add_argument("--k", type=int, default=4, help="draft length of the e2e section")
    p.add_argument("--models", default=",".join(QWEN25), help="architectures of the graphs section")
    p.add_argument(
        "--plain-steps", type=int, default=0, help="the verifier's --plain-steps in the e2e section"
    )
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run on CPU (no graphs there)")
    a = p.parse_args()
    import transformers

    sections = ["graphs"] if a.graphs else [x for x in a.sections.split(",") if x]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    device = a.device
    report: dict = {
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "none",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(sys.argv),
    }
    runs = {
        "correctness": lambda: check_correctness(device),
        "graphs": lambda: measure_graphs(device, a.alpha, a.tiny, tuple(a.models.split(","))),
        "e2e": lambda: measure_e2e(device, a.tiny, a.k, plain_steps=a.plain_steps),
        "compile": lambda: measure_compile(device, a.tiny),
    }
    failed = False
    for name in sections:
        t0 = time.time()
        try:
            report[name] = runs[name]()
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            import traceback

            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        report[f"{name}_s"] = time.time() - t0
        print(name, json.dumps(report[name].get("projected", report[name]), indent=1), flush=True)
        Path(a.out).write_text(json.dumps(report, indent=1))  # what ran so far, if the machine goes
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
