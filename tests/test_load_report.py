"""The concurrency benchmark's report: the rooflines it puts next to the measured rates."""

import argparse
import json

from benchmarks.common import roofline
from benchmarks.concurrency_report import write_load_reports


def test_roofline_turns_compute_bound_with_rows_and_verified_positions():
    # 1 GB of weights at 10 GB/s: 0.1 s per forward; 1 G params at 200 GFLOP/s: 0.01 s per position.
    alone = roofline(1, 10**9, 10**9, 10.0, 200.0)
    assert alone["bound"] == "memory" and abs(alone["tps"] - 10.0) < 1e-9
    many = roofline(32, 10**9, 10**9, 10.0, 200.0)
    assert many["bound"] == "compute" and abs(many["tps"] - 100.0) < 1e-9  # 32 rows take 0.32 s
    # Verifying 1 + 4 positions to emit 3 tokens: memory bound alone (3x), compute bound at 8 rows.
    spec = roofline(1, 10**9, 10**9, 10.0, 200.0, positions=5, tokens=3)
    assert spec["bound"] == "memory" and abs(spec["tps"] - 30.0) < 1e-9
    spec8 = roofline(8, 10**9, 10**9, 10.0, 200.0, positions=5, tokens=3)
    assert spec8["bound"] == "compute" and abs(spec8["tps"] - 8 * 3 / 0.4) < 1e-9


def test_report_is_rebuilt_from_saved_results(tmp_path):
    level = {
        "aggregate_tps": 12.0,
        "per_request_tps": 6.0,
        "ttft_p50": 0.5,
        "ttft_p95": 0.6,
        "itl_p50": 0.1,
        "itl_p95": 0.2,
        "acceptance": 0.5,
        "drafted_per_round": 4.0,
        "plain_round_share": 0.0,
        "per_class_tps": {"code": 6.0},
    }
    plain = dict(level, aggregate_tps=6.0, per_request_tps=3.0, acceptance=0.0, drafted_per_round=0.0)
    results = {
        "meta": {
            "hardware": {"cpu": "test", "cores": 2},
            "bandwidth_gbs": 10.0,
            "gflops": 200.0,
            "target": "/m/target",
            "drafter": "/m/drafter",
            "target_bytes": 10**9,
            "target_params": 10**9,
            "command": "specdec bench --concurrency 2",
        },
        "shared": {"2": {"specdec": level, "no-draft": plain}},
    }
    write_load_reports(results, argparse.Namespace(out=str(tmp_path), layouts=["shared"], max_new_tokens=64))
    report = (tmp_path / "load.md").read_text()
    assert "Command: `specdec bench --concurrency 2`" in report
    # specdec 12 vs no-draft 6; its roofline: 2 rows x 3 tokens per 0.1 s forward = 60 tok/s, 20% reached.
    assert "| 2 | 12.00 | 6.00 | – | 2.00x |" in report
    assert "| 60.00 (memory) | 20% |" in report
    assert json.loads((tmp_path / "load.json").read_text())["shared"]["2"]["specdec"]["aggregate_tps"] == 12.0
