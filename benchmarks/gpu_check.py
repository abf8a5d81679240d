"""One short GPU check: CUDA correctness on tiny models, then cost curves of the real Qwen architectures.

Usage: python -m benchmarks.gpu_check [--configs DIR] [--out FILE.json]

1. Losslessness on CUDA: speculative greedy == HF greedy on tiny Llama/Qwen2/GPT-2 (fp32 and bf16), seeded
   sampling reproducible, and one generation through both gRPC services in-process.
2. Costs on the real architectures (Qwen2.5-Coder 0.5B / 1.5B configs, random weights, bf16): target
   forward time by block size, drafter step time, the fast-path probe, and the projected speed-up
   E[tokens](alpha, k) * t_target(1) / (k * t_draft + t_target(k + 1)) for the acceptance rates measured on
   the real pair on CPU. Random weights make acceptance meaningless, so acceptance is an input here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def check_correctness(device: str) -> dict:
    from tiny import FAMILIES, perturbed, tiny_model, tiny_tokenizer

    from specdec_core.draft_length import FixedDraftLength
    from specdec_core.drafting import ModelDrafter
    from specdec_core.engine import SpeculativeDecoder, StopCriteria
    from specdec_core.runtime.runner import ModelRunner
    from specdec_core.sampling import SamplingParams

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

            def run(params, dec=dec, drafter=drafter):
                return [
                    t
                    for c in dec.generate(
                        prompt,
                        params,
                        StopCriteria(max_new_tokens=48),
                        ModelDrafter(ModelRunner(drafter)),
                        FixedDraftLength(4),
                    )
                    for t in c.token_ids
                ]

            greedy = run(SamplingParams())
            s1, s2 = (
                run(SamplingParams(temperature=0.9, seed=3)),
                run(SamplingParams(temperature=0.9, seed=3)),
            )
            out[f"{family}/{str(dtype).split('.')[-1]}"] = {
                "greedy_equal": greedy == ref,
                "seeded_equal": s1 == s2,
                "first_diff": next((i for i, (a, b) in enumerate(zip(greedy, ref)) if a != b), None),
            }
    out["grpc"] = check_grpc(device)
    return out


def check_grpc(device: str) -> bool:
    from tiny import perturbed, tiny_model, tiny_tokenizer

    from client import SpecDecClient
    from drafter_service.engine import DrafterEngine
    from drafter_service.server import start as start_drafter
    from specdec.config import DrafterConfig, VerifierConfig
    from verifier_service.engine import VerifierEngine
    from verifier_service.server import start as start_verifier

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


def timed_forward(runner, seq, block: int, repeats: int = 20) -> float:
    times = []
    base = len(seq)
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.extend(seq, [100 + i for i in range(block)], keep=block)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        runner.rollback(seq, base)
    return statistics.median(times)


def measure_costs(config_dir: Path, device: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from specdec_core.optimize import probe_fast_linear
    from specdec_core.runtime.runner import ModelRunner

    result: dict = {}
    runners = {}
    for role, name in (("target", "qwen2.5-coder-1.5b-instruct"), ("drafter", "qwen2.5-coder-0.5b-instruct")):
        cfg = AutoConfig.from_pretrained(config_dir / name)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        runners[role] = ModelRunner(model)
        result[f"{role}_fast_path_probe"] = probe_fast_linear(model)
    prompt = list(range(1000, 1128))
    curves = {}
    for role, runner in runners.items():
        seq = runner.new_sequence()
        runner.prefill(seq, prompt)
        blocks = (1, 2, 3, 5, 7, 9) if role == "target" else (1,)
        curves[role] = {b: timed_forward(runner, seq, b) for b in blocks}
    result["target_ms_by_block"] = {b: 1000 * t for b, t in curves["target"].items()}
    result["drafter_step_ms"] = 1000 * curves["drafter"][1]
    t1, td = curves["target"][1], curves["drafter"][1]
    result["cost_ratio_c"] = td / t1
    projected = {}
    for alpha in (0.8, 0.9):
        for k in (2, 4, 6, 8):
            expected = (1 - alpha ** (k + 1)) / (1 - alpha)
            tk = curves["target"].get(k + 1) or curves["target"][9]
            projected[f"alpha={alpha},k={k}"] = expected * t1 / (k * td + tk)
    result["projected_speedup"] = projected
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=str(ROOT / ".devcarry"))
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--correctness-only", action="store_true")
    a = p.parse_args()
    import transformers

    device = a.device
    report: dict = {
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "none",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    t0 = time.time()
    report["correctness"] = check_correctness(device)
    report["correctness_s"] = time.time() - t0
    print(json.dumps(report, indent=1), flush=True)
    if a.correctness_only:
        return 0
    report["costs"] = measure_costs(Path(a.configs), device)
    print(json.dumps(report["costs"], indent=1), flush=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
