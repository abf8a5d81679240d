"""Multi-process end to end: real `specdec serve-*` processes and the real CLI."""

import json
import subprocess
import sys

import pytest
from tiny import hf_greedy, perturbed, save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from client.local import ROOT, launch


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    target = save_tiny("llama", base / "target", seed=0)
    draft = base / "drafter"
    perturbed(tiny_model("llama", seed=0), 0.1).save_pretrained(draft)
    tiny_tokenizer().save_pretrained(draft)
    return target, draft


def test_cli_generate_against_real_processes(model_dirs, tmp_path):
    target_dir, drafter_dir = model_dirs
    drafter = launch("drafter", str(drafter_dir), args=["--threads", "1"], timeout_s=120)
    verifier = None
    log = open(tmp_path / "verifier.log", "w")
    try:
        verifier = launch(
            "verifier",
            str(target_dir),
            args=["--threads", "1", "--fast-verify", "off", "--drafter", drafter.address],
            env={"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""},
            log_file=log,
            timeout_s=120,
        )
        prompt = "def add(a, b):\n"
        cmd = [
            sys.executable,
            "-m",
            "client.cli",
            "generate",
            "--verifier",
            verifier.address,
            "--drafter",
            drafter.address,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "32",
            "--num-draft-tokens",
            "3",
            "--ignore-eos",
            "--json",
        ]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
        result = json.loads(out.stdout)
        target = AutoModelForCausalLM.from_pretrained(target_dir)
        expected = hf_greedy(target, tiny_tokenizer()(prompt)["input_ids"], 32)
        assert result["token_ids"] == expected
        stats = result["stats"]
        for key in (
            "rounds",
            "drafted",
            "accepted",
            "acceptance_rate",
            "accepted_per_position",
            "target_passes",
            "draft_s",
            "verify_s",
            "network_s",
            "tokens_per_s",
        ):
            assert key in stats, key
        assert stats["drafted"] > 0 and stats["rounds"] < 32
        # the plain streaming mode prints the same text
        plain = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
        assert plain.stdout.rstrip("\n") == result["text"]
        # a server error: one line naming the code and the cause, a status of its own, no traceback
        other = [*cmd[:7], "127.0.0.1:9", *cmd[8:]]
        denied = subprocess.run(other, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 17  # 10 + PERMISSION_DENIED
        assert denied.stderr.strip().count("\n") == 0 and "Traceback" not in denied.stderr
        assert "PERMISSION_DENIED" in denied.stderr and "--allow-any-drafter" in denied.stderr
    finally:
        codes = [s.stop() for s in (verifier, drafter) if s is not None]
        log.close()
    assert codes == [0] * len(codes)  # SIGTERM -> graceful exit 0
    # the CLI chose the OpenMP policy for this layout before torch started (unpinned: a brief spin)
    started = (tmp_path / "verifier.log").read_text()
    assert "OpenMP wait policy PASSIVE, spin count 10000" in started or "OpenMP wait policy ACTIVE" in started


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--prompt", ""], "--prompt"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--top-k", "-1"], "--top-k"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(args, flag):
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "--verifier", "127.0.0.1:9", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith(f"specdec generate: error: {flag}: ") and out.stderr.count("\n") == 1


def test_cli_reports_an_unreachable_verifier_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "--verifier", "127.0.0.1:9", "--prompt", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 24  # 10 + UNAVAILABLE
    assert out.stderr.startswith("specdec generate: UNAVAILABLE: ") and "Traceback" not in out.stderr


def test_cli_reports_an_unreadable_token_file_in_one_line(tmp_path):
    missing = tmp_path / "no-such-token"
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "--prompt", "x", "--token-file", str(missing)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr == f"specdec generate: token file: cannot read {missing}: No such file or directory\n"
