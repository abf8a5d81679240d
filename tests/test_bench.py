"""``specdec bench`` end to end on tiny models saved to disk: every system row, interleaved repeats, the
adaptive-vs-fixed comparison, and greedy ids checked against the baseline."""

import json

from tiny import perturbed, tiny_model, tiny_tokenizer

from benchmarks import bench


def test_bench_runs_every_in_process_system_and_compares_adaptive_with_fixed_k(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    target = tiny_model("llama", seed=0)
    for name, model in (("target", target), ("drafter", perturbed(target, 0.05))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    args = f"--target-model {tmp_path / 'target'} --drafter-model {tmp_path / 'drafter'} --prompts 2 --ks 2,3"
    args += " --temperatures 0,0.8 --max-new-tokens 12 --repeats 2 --systems hf,assisted,core,grpc-shared --adaptive"
    args += f" --drafter-quantization none --fast-verify off --out {out}"
    assert bench.main(args.split()) == 0

    result = json.loads((out / "results.json").read_text())
    rows = {(r["system"], r["temperature"], r["k"]) for r in result["rows"]}
    for t in (0.0, 0.8):
        assert {
            ("hf", t, 1),
            ("assisted", t, 2),
            ("core", t, 2),
            ("core", t, 3),
            ("core", t, "adaptive"),
        } <= rows
        assert {("grpc-shared", t, 2), ("grpc-shared", t, "adaptive")} <= rows
    for r in result["rows"]:
        assert r["tokens"] == 2 * 12 and r["mismatches"] == []  # exact length; greedy ids == HF generate
        assert r["ids_compared_with"] == ("hf" if r["temperature"] == 0 else "")
    for run in result["runs"]:
        assert len(run["per_prompt_s"]) == 2
    md = (out / "results.md").read_text()
    assert "core T=0.0: adaptive" in md and "grpc-shared T=0.8: adaptive" in md


def test_without_an_hf_row_greedy_ids_are_checked_against_the_first_row():
    b = bench.Bench(bench.parse_args(["--repeats", "1"]))
    b.record("core", 0.0, 4, [(1.0, 3)], ids_by_prompt={"p": [1, 2, 3]})
    same = b.record("core", 0.0, "adaptive", [(1.0, 3)], ids_by_prompt={"p": [1, 2, 3]})
    other = b.record("core", 0.0, 5, [(1.0, 3)], ids_by_prompt={"p": [1, 2, 4]})
    assert same.ids_compared_with == "core k=4" and same.mismatches == []
    assert other.mismatches == ["p: differs from the baseline at generated token 2"]
