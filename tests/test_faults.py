"""Faults at every step, with nothing lost: drafters killed, hung, late or sending garbage; the verifier killed
mid-stream; both down; client deadlines. Real processes where the fault is a process's (SIGKILL, SIGSTOP)."""

import contextlib
import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest
from test_batching import slow_down
from test_e2e import model_dirs  # noqa: F401 - the fixture (tiny models on disk)
from test_services import Pair
from tiny import hf_greedy, perturbed, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from client import SpecDecClient, SpecDecError
from client.local import free_port, launch
from specdec.config import VerifierConfig
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

PROMPT = "def add(a, b):\n"
IDS = tiny_tokenizer()(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.1)


# -- in process: late, hung-then-back and garbage drafters, client deadlines ---------------------------------
class Hangable:
    """Block the drafter's forwards until released (a drafter that hangs, then comes back)."""

    def __init__(self, runner):
        self.open = threading.Event()
        self.open.set()
        forward = runner.forward

        def gated(rows):
            self.open.wait()
            return forward(rows)

        runner.forward = gated


def test_a_hung_drafter_is_skipped_then_used_again_when_it_answers(models, caplog):
    caplog.set_level(logging.INFO)
    target, _ = models
    expected = hf_greedy(target, IDS, 150)
    p = Pair(*models)
    p.v_engine.config = VerifierConfig(**{**p.v_cfg.__dict__, "drafter_timeout_s": 0.3})
    slow_down(p.v_engine.runner, 0.01)  # a target slower than the tiny drafter, as on real pairs
    p.d_engine.scheduler.lease = contextlib.nullcontext()  # a drafter on a device of its own
    gate = Hangable(p.d_engine.runner)
    try:
        with SpecDecClient(p.verifier_addr, p.drafter_addr) as c:
            pieces = c.stream(PROMPT, max_new_tokens=150, num_draft_tokens=3, ignore_eos=True)
            ids, stats, t_hung = [], {}, None
            for piece in pieces:
                ids += piece.token_ids
                stats = piece.stats or stats
                if len(ids) >= 10 and t_hung is None:
                    gate.open.clear()  # the drafter hangs mid-generation...
                    t_hung = time.monotonic()
                if t_hung is not None and time.monotonic() - t_hung > 1.0:
                    gate.open.set()  # ...and comes back a second later
    finally:
        gate.open.set()
        p.stop()
    assert ids == expected
    assert stats["drafter_failures"] >= 1  # each late round counted
    assert "is back" in caplog.text  # health-checked with backoff and used again
    assert stats["drafted"] > 3 * 4  # drafted before the hang and after it


class GarbageDrafter(pb_grpc.DrafterServicer):
    """A drafter that answers every step with a block of tokens outside the vocabulary."""

    def Draft(self, request_iterator, context):
        for req in request_iterator:
            if req.HasField("step"):
                yield pb.DraftResponse(
                    tokens=[10**6], dists=[pb.SparseDistribution(token_ids=[10**6], probs=[1.0])]
                )

    def Info(self, request, context):  # passes the pairing check with the verifier's own fingerprint
        return self.info


def test_a_drafter_sending_garbage_is_a_failed_drafter(models):
    target, _ = models
    expected = hf_greedy(target, IDS, 30)
    garbage = GarbageDrafter()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_DrafterServicer_to_server(garbage, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    cfg = VerifierConfig(port=0, host="127.0.0.1", model="tiny", fast_verify="off", drafters=(address,))
    p = Pair(*models, verifier_cfg=cfg)
    e = p.v_engine
    garbage.info = pb.InfoResponse(
        model="garbage", vocab_fingerprint=e.fingerprint, vocab_size=e.runner.vocab_size
    )
    try:
        with SpecDecClient(p.verifier_addr, address) as c:
            r = c.generate(PROMPT, max_new_tokens=30, num_draft_tokens=3, ignore_eos=True)
    finally:
        p.stop()
        server.stop(0)
    assert r.token_ids == expected
    assert r.stats["drafter_failures"] >= 1 and r.stats["drafted"] == 0


def test_a_client_deadline_ends_the_generation_on_both_services(models):
    p = Pair(*models)
    slow_down(p.v_engine.runner, 0.02)
    try:
        with SpecDecClient(p.verifier_addr, p.drafter_addr) as c, pytest.raises(SpecDecError) as err:
            c.generate(PROMPT, max_new_tokens=400, num_draft_tokens=3, ignore_eos=True, timeout=0.8)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            p.v_engine.runner.active_sequences or p.d_engine.runner.active_sequences
        ):
            time.sleep(0.05)
        assert p.v_engine.runner.active_sequences == 0 and p.d_engine.runner.active_sequences == 0
        assert p.v_engine.admission.running == 0
    finally:
        p.stop()


# -- real processes: SIGKILL, SIGSTOP / SIGCONT, restart ------------------------------------------------------
@pytest.fixture(scope="module")
def expected_ids(model_dirs):  # noqa: F811
    target = AutoModelForCausalLM.from_pretrained(model_dirs[0])
    return hf_greedy(target, IDS, 120)


def stream_with(client, act_after: int, action, max_new_tokens=120, **kw):
    """Generate, calling ``action()`` once ``act_after`` tokens have arrived; returns (ids, stats)."""
    ids, stats, done = [], {}, False
    for piece in client.stream(
        PROMPT, max_new_tokens=max_new_tokens, num_draft_tokens=3, ignore_eos=True, **kw
    ):
        ids += piece.token_ids
        stats = piece.stats or stats
        if not done and len(ids) >= act_after:
            action()
            done = True
    return ids, stats


def start_pair(model_dirs, verifier_args=(), port=None):  # noqa: F811
    drafter = launch("drafter", str(model_dirs[1]), args=["--threads", "1"], timeout_s=120)
    verifier = launch(
        "verifier",
        str(model_dirs[0]),
        port=port,
        args=["--threads", "1", "--fast-verify", "off", "--drafter", drafter.address, *verifier_args],
        timeout_s=120,
    )
    return drafter, verifier


def test_drafter_killed_or_stopped_mid_generation_changes_nothing(model_dirs, expected_ids):  # noqa: F811
    # a drafter stopped mid-forward holds the compute lease of the shared cores: not waited for past 1 s
    drafter, verifier = start_pair(
        model_dirs, ["--drafter-timeout-s", "0.5", "--compute-lease-timeout-s", "1"]
    )
    try:
        with SpecDecClient(verifier.address, drafter.address) as c:
            # hung (SIGSTOP): its rounds time out, the generation goes on with the target alone
            ids, stats = stream_with(c, 10, lambda: os.kill(drafter.proc.pid, signal.SIGSTOP))
            assert ids == expected_ids and stats["drafter_failures"] >= 1
            os.kill(drafter.proc.pid, signal.SIGCONT)  # back: the next generation drafts again
            again = c.generate(PROMPT, max_new_tokens=40, num_draft_tokens=3, ignore_eos=True)
            assert again.token_ids == expected_ids[:40] and again.stats["drafted"] > 0
            assert again.stats["drafter_failures"] == 0
            # killed (SIGKILL)
            ids, stats = stream_with(c, 10, drafter.proc.kill)
            assert ids == expected_ids and stats["drafter_failures"] >= 1
    finally:
        os.kill(drafter.proc.pid, signal.SIGCONT) if drafter.proc.poll() is None else None
        verifier.stop()
        drafter.stop()


def test_verifier_killed_mid_stream_resumes_without_a_lost_or_repeated_token(model_dirs, expected_ids):  # noqa: F811
    port = free_port()
    drafter, verifier = start_pair(model_dirs, port=port)
    restarted = []
    threads = []

    def kill_and_restart():
        verifier.proc.kill()
        verifier.proc.wait()

        def restart():
            time.sleep(0.5)
            restarted.append(
                launch(
                    "verifier",
                    str(model_dirs[0]),
                    port=port,
                    args=["--threads", "1", "--fast-verify", "off", "--drafter", drafter.address],
                    timeout_s=120,
                )
            )

        threads.append(threading.Thread(target=restart, daemon=True))
        threads[-1].start()

    try:
        with SpecDecClient(verifier.address, drafter.address, retry_wait_s=60) as c:
            ids, _ = stream_with(c, 20, kill_and_restart)
            assert c.resumes >= 1
        assert ids == expected_ids  # no token lost, none repeated
    finally:
        for t in threads:  # the client may resume before launch() returns: wait for it, then stop them all
            t.join(150)
        for v in [verifier, *restarted]:
            v.stop()
        drafter.stop()


def test_both_down_is_a_clear_unavailable_within_the_deadline(model_dirs):  # noqa: F811
    drafter, verifier = start_pair(model_dirs)
    try:

        def kill_both():
            verifier.proc.kill()
            drafter.proc.kill()

        with SpecDecClient(verifier.address, drafter.address) as c:
            t0 = time.monotonic()
            with pytest.raises(SpecDecError) as err:
                stream_with(c, 5, kill_both, timeout=6.0)
            elapsed = time.monotonic() - t0
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Traceback" not in err.value.details()
        assert elapsed < 6.0 + 2.0
    finally:
        verifier.stop()
        drafter.stop()
