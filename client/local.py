"""Start the services as local processes (demo, benchmark, end-to-end tests) and wait for them to serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout_s: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until the server reports SERVING (or the process exits, or time runs out)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server for {address} exited with code {proc.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f}s")


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    """Poll ``url`` until it answers 200 (an HTTP server started as ``proc``, e.g. llama-server's
    /health); raise if the process exits or the time runs out."""
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


@dataclass
class LocalService:
    role: str
    address: str
    proc: subprocess.Popen

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, wait for a graceful exit, kill if it overstays."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(
    role: str,
    model: str,
    port: int | None = None,
    args: tuple[str, ...] | list[str] = (),
    env: dict | None = None,
    cpus: list[int] | None = None,
    log_file=None,
    timeout_s: float = 600.0,
    root: Path = ROOT,
) -> LocalService:
    """Run ``specdec serve-<role>`` in a subprocess and wait until it is SERVING.

    ``cpus`` pins the process to those cores (the layout of a drafter on its own small device); ``root``
    runs the services of another checkout (a benchmark's baseline).
    """
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "client.cli",
        f"serve-{role}",
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *args,
    ]
    proc_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(
        cmd,
        env=proc_env,
        cwd=root,
        stdout=log_file or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log_file else None,
        preexec_fn=preexec,
    )
    service = LocalService(role, f"127.0.0.1:{port}", proc)
    try:
        wait_serving(service.address, timeout_s, proc)
    except Exception:
        service.stop(2)
        raise
    return service
