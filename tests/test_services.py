"""In-process gRPC tests: both services on port 0 with tiny models, driven through the client library."""

import copy
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny import hf_greedy, perturbed, tiny_model, tiny_tokenizer

from client import SpecDecClient
from drafter_service.server import start as start_drafter
from drafter_service.sessions import DrafterEngine
from specdec.config import DrafterConfig, VerifierConfig
from specdec.rpc import channel
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.runtime.admission import Cancellation
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stopping import Chunk
from specdec_core.target import TargetSession
from verifier_service.server import start as start_verifier
from verifier_service.verifier import VerifierEngine

PROMPT = "def add(a, b):\n"
PROMPT_IDS = tiny_tokenizer()(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.1)


class Pair:
    def __init__(
        self, target, drafter, verifier_cfg=None, drafter_tokenizer=None, lookahead=False, **drafter_options
    ):
        self.target, self.drafter = target, drafter
        self.d_engine = DrafterEngine(
            DrafterConfig(model="tiny-drafter", quantization="none", lookahead=lookahead, **drafter_options),
            drafter,
            drafter_tokenizer or tiny_tokenizer(),
        )
        self.d_server, d_port, _ = start_drafter(
            DrafterConfig(port=0, host="127.0.0.1", model="tiny-drafter"), self.d_engine
        )
        self.drafter_addr = f"127.0.0.1:{d_port}"
        self.v_cfg = verifier_cfg or VerifierConfig(
            port=0, host="127.0.0.1", model="tiny-target", fast_verify="off", drafters=(self.drafter_addr,)
        )
        self.start_verifier(0)

    def start_verifier(self, port):
        self.v_engine = VerifierEngine(self.v_cfg, self.target, tiny_tokenizer())
        cfg = VerifierConfig(**{**self.v_cfg.__dict__, "port": port})
        self.v_server, self.v_port, self.v_health = start_verifier(cfg, self.v_engine)
        self.verifier_addr = f"127.0.0.1:{self.v_port}"

    def stop(self):
        self.v_server.stop(0)
        self.d_server.stop(0)
        self.v_engine.close()
        self.d_engine.close()


@pytest.fixture
def pair(models):
    p = Pair(*models)
    yield p
    p.stop()


def test_generation_through_both_services_equals_target_greedy(pair, models):
    with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
        r = c.generate(PROMPT, max_new_tokens=40, num_draft_tokens=4, ignore_eos=True)
    assert r.token_ids == hf_greedy(models[0], PROMPT_IDS, 40)
    assert r.finish_reason == "length"
    s = r.stats
    assert s["drafted"] > 0 and s["rounds"] < 40 and s["target_passes"] == s["rounds"] + 1
    assert r.text == tiny_tokenizer().decode(r.token_ids, skip_special_tokens=True)
    for key in (
        "acceptance_rate",
        "accepted_per_position",
        "draft_s",
        "verify_s",
        "network_s",
        "tokens_per_s",
    ):
        assert key in s


def test_adaptive_generations_are_lossless_and_start_from_the_last_one(pair, models):
    expected = hf_greedy(models[0], PROMPT_IDS, 40)
    # a target slower than its drafter, as on real pairs (the tiny drafter costs what the target does, and
    # the adaptive policy would rightly stop drafting)
    forward = pair.v_engine.runner.forward
    pair.v_engine.runner.forward = lambda rows: (time.sleep(0.02), forward(rows))[1]
    with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
        first = c.generate(PROMPT, max_new_tokens=40, adaptive=True, ignore_eos=True)
        assert len(pair.v_engine.length_memory._last) == 1  # remembered for (drafter, greedy)
        (key,) = pair.v_engine.length_memory._last
        warm = pair.v_engine.length_memory.policy(key)
        assert warm.early_stop() is not None  # the next one stops by confidence from its first round
        second = c.generate(PROMPT, max_new_tokens=40, adaptive=True, ignore_eos=True)
    assert first.token_ids == expected and second.token_ids == expected
    assert first.stats["drafted"] > 0 and second.stats["drafted"] > 0


def test_no_draft_and_default_drafter(pair, models):
    expected = hf_greedy(models[0], PROMPT_IDS, 20)
    with SpecDecClient(pair.verifier_addr, drafter="") as c:
        baseline = c.generate(PROMPT, max_new_tokens=20, no_draft=True, ignore_eos=True)
        # the verifier's configured drafter (a fixed k: on tiny models the adaptive default may not draft)
        via_default = c.generate(PROMPT, max_new_tokens=20, num_draft_tokens=4, ignore_eos=True)
    assert baseline.token_ids == expected and baseline.stats["drafted"] == 0
    assert via_default.token_ids == expected and via_default.stats["drafted"] > 0


def test_sampled_generation_is_seeded_over_the_wire(pair):
    # a fixed k: the realised tokens of a seeded generation depend on where blocks end
    kw = dict(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True, num_draft_tokens=4)
    with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
        a, b = c.generate(PROMPT, **kw), c.generate(PROMPT, **kw)
        other = c.generate(PROMPT, **{**kw, "seed": 6})
    assert a.token_ids == b.token_ids and a.token_ids != other.token_ids
    assert a.stats["drafted"] > 0


def test_restarted_verifier_resumes_from_client_history(pair, models):
    expected = hf_greedy(models[0], PROMPT_IDS, 40)
    with SpecDecClient(pair.verifier_addr, pair.drafter_addr, retry_wait_s=10) as c:
        ids = []
        for i, piece in enumerate(c.stream(PROMPT, max_new_tokens=40, num_draft_tokens=2, ignore_eos=True)):
            ids.extend(piece.token_ids)
            if i == 2:  # kill the verifier mid-generation: its sessions are gone
                pair.v_server.stop(0).wait()
                pair.start_verifier(pair.v_port)
        assert c.resumes == 1
    assert ids == expected


def test_generation_carries_on_when_the_drafter_dies(pair, models):
    expected = hf_greedy(models[0], PROMPT_IDS, 40)
    with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
        ids, stats = [], {}
        for i, piece in enumerate(c.stream(PROMPT, max_new_tokens=40, num_draft_tokens=2, ignore_eos=True)):
            ids.extend(piece.token_ids)
            stats = piece.stats or stats
            if i == 1:
                pair.d_server.stop(0).wait()
    assert ids == expected
    assert stats["drafter_failures"] == 1


def test_tokenizer_mismatch_is_refused_naming_the_difference(models):
    other = copy.deepcopy(tiny_tokenizer())
    other.add_tokens(["zzz_not_in_target"])
    p = Pair(*models, drafter_tokenizer=other)
    try:
        with SpecDecClient(p.verifier_addr, p.drafter_addr) as c, pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPT, max_new_tokens=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "token id 400" in err.value.details() and "zzz_not_in_target" in err.value.details()
    finally:
        p.stop()


def test_verify_rpc_sessions_rebuild_and_match_core(pair, models):
    stub = pb_grpc.VerifierStub(channel(pair.verifier_addr))
    greedy = pb.SamplingParams()
    r1 = stub.Verify(
        pb.VerifyRequest(
            session_id="s1",
            reset=True,
            tokens=PROMPT_IDS,
            sampling=greedy,
            draft_tokens=[5, 6, 7],
            return_logprobs=True,
        )
    )
    local = TargetSession(ModelRunner(models[0]), PROMPT_IDS, SamplingParams())
    verdict, logprobs = local.verify([5, 6, 7], want_logprobs=True)
    assert (r1.num_accepted, r1.next_token) == (verdict.num_accepted, verdict.next_token)
    assert r1.logprobs == pytest.approx(logprobs, abs=1e-4)
    history = PROMPT_IDS + [5, 6, 7][: r1.num_accepted] + [r1.next_token]
    assert r1.context_length == len(history)
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(pb.VerifyRequest(session_id="unknown", draft_tokens=[1]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    rebuilt = stub.Verify(pb.VerifyRequest(session_id="s2", reset=True, tokens=history, sampling=greedy))
    cont = stub.Verify(pb.VerifyRequest(session_id="s1"))
    assert (rebuilt.num_accepted, rebuilt.next_token) == (cont.num_accepted, cont.next_token)
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(
            pb.VerifyRequest(
                session_id="s3",
                reset=True,
                tokens=PROMPT_IDS,
                sampling=pb.SamplingParams(temperature=1.0),
                draft_tokens=[1],
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # sampled verification without draft dists


def test_session_limits_are_enforced(models):
    cfg = VerifierConfig(
        port=0, host="127.0.0.1", model="tiny", fast_verify="off", max_sessions=1, max_session_tokens=64
    )
    p = Pair(*models, verifier_cfg=cfg)
    try:
        stub = pb_grpc.VerifierStub(channel(p.verifier_addr))
        stub.Verify(pb.VerifyRequest(session_id="a", reset=True, tokens=PROMPT_IDS))
        with pytest.raises(grpc.RpcError) as err:
            stub.Verify(pb.VerifyRequest(session_id="b", reset=True, tokens=PROMPT_IDS))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub.CloseSession(pb.CloseSessionRequest(session_id="a"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Verify(pb.VerifyRequest(session_id="b", reset=True, tokens=list(range(100))))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        p.stop()


def test_health_and_graceful_shutdown(pair):
    stub = health_pb2_grpc.HealthStub(channel(pair.verifier_addr))
    for service in ("", "specdec.v1.Generation", "specdec.v1.Verifier"):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    pair.v_health.enter_graceful_shutdown()
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_bad_input_maps_to_invalid_argument(pair):
    stub = pb_grpc.GenerationStub(channel(pair.verifier_addr))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(text="")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**7]))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingParams(temperature=-1))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_lookahead_drafter_service_is_lossless_and_each_model_runs_on_one_thread(models):
    # one thread per process runs every forward (gRPC handler threads never do): see runtime/scheduler.py
    expected = hf_greedy(models[0], PROMPT_IDS, 40)
    threads: dict[str, set[int]] = {"target": set(), "drafter": set()}
    hooks = [
        m.base_model.register_forward_pre_hook(lambda *_, name=name: threads[name].add(threading.get_ident()))
        for name, m in zip(("target", "drafter"), models, strict=True)
    ]
    p = Pair(*models, lookahead=True)
    try:
        with SpecDecClient(p.verifier_addr, p.drafter_addr) as c:
            r = c.generate(PROMPT, max_new_tokens=40, num_draft_tokens=3, ignore_eos=True)
            r2 = c.generate(PROMPT, max_new_tokens=12, temperature=0.8, seed=3, num_draft_tokens=3)
        assert r.token_ids == expected
        assert r2.token_ids
        assert threads["target"] == {p.v_engine.scheduler.call(threading.get_ident)}
        assert threads["drafter"] == {p.d_engine.scheduler.call(threading.get_ident)}
    finally:
        p.stop()
        for h in hooks:
            h.remove()


def test_fixed_size_stream_messages_hide_each_rounds_acceptance(models):
    """``--stream-chunk-tokens 4``: every message but the last carries exactly 4 tokens, and together
    they are the generation a per-round stream sends."""
    target, drafter = models
    chunked = Pair(target, drafter)
    chunked.v_server.stop(0)
    chunked.v_engine.close()
    chunked.v_cfg = VerifierConfig(**{**chunked.v_cfg.__dict__, "stream_chunk_tokens": 4})
    chunked.start_verifier(0)  # the same drafter, the chunked stream
    try:
        with SpecDecClient(chunked.verifier_addr) as c:
            kw = {"max_new_tokens": 18, "ignore_eos": True, "num_draft_tokens": 3}
            pieces = list(c.stream(PROMPT, **kw))
            whole = c.generate(PROMPT, **kw)
    finally:
        chunked.stop()
    assert [len(p.token_ids) for p in pieces] == [4, 4, 4, 4, 2]
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids == hf_greedy(target, PROMPT_IDS, 18)
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[0].prompt_token_ids == PROMPT_IDS and pieces[-1].finish_reason == "length"
    assert pieces[-1].stats and not any(p.stats for p in pieces[:-1])
    assert whole.stats["drafted"] > 0


# -- streaming on a time quantum ----------------------------------------------------------------------


def _timed_chunks(schedule, error=None):
    """Chunks of one token each at the given offsets (seconds from the first call); the last one finishes
    the generation, unless ``error`` is raised after it."""
    start = time.monotonic()
    for i, at in enumerate(schedule):
        time.sleep(max(0.0, start + at - time.monotonic()))
        yield Chunk([i], "length" if i == len(schedule) - 1 and error is None else None)
    if error is not None:
        raise error


def test_a_quantum_stream_releases_tokens_on_the_clock_not_per_round():
    from verifier_service.generation import decoupled

    q = 0.25
    start = time.monotonic()
    released = []
    for chunk in decoupled(_timed_chunks([0.0, 0.03, 0.06, 0.3, 0.33]), q, Cancellation()):
        released.append((time.monotonic() - start, chunk.token_ids, chunk.finish_reason))
    # rounds end at 0, 30, 60, 300, 330 ms; messages leave on ticks (250, 500 ms), the end included
    assert [ids for _, ids, _ in released] == [[0, 1, 2], [3, 4]]
    assert [f for _, _, f in released] == [None, "length"]
    for (at, _, _), tick in zip(released, (q, 2 * q), strict=True):
        assert tick - 0.01 <= at <= tick + 0.1, released


def test_a_quantum_stream_skips_empty_ticks_raises_the_decoders_error_and_cancels_when_left():
    from verifier_service.generation import decoupled

    released = list(decoupled(_timed_chunks([0.0, 0.45]), 0.1, Cancellation()))
    assert [c.token_ids for c in released] == [[0], [1]]  # no message on the empty ticks between
    # a decoder that stops without a finishing chunk ends the stream on the next tick, with what it sent
    unfinished = [Chunk([1]), Chunk([2])]
    assert [(c.token_ids, c.finish_reason) for c in decoupled(iter(unfinished), 0.05, Cancellation())] == [
        ([1, 2], None)
    ]
    assert [c.token_ids for c in decoupled(iter(unfinished), 0.0, Cancellation())] == [[1], [2]]
    with pytest.raises(RuntimeError, match="decoder broke"):
        list(decoupled(_timed_chunks([0.0], RuntimeError("decoder broke")), 0.05, Cancellation()))
    cancel = Cancellation()
    stopped = threading.Event()

    def endless():
        try:
            i = 0
            while not cancel.cancelled:
                yield Chunk([i])
                i += 1
                time.sleep(0.01)
        finally:
            stopped.set()

    stream = decoupled(endless(), 0.05, cancel)
    assert next(stream).token_ids
    stream.close()  # the client went away
    assert cancel.cancelled and stopped.wait(5)


def test_quantum_stream_through_the_service_keeps_the_generation(models):
    """``--stream-quantum-ms 200 --stream-chunk-tokens 2``: messages arrive on the clock, in whole chunks,
    and together are the target's greedy generation."""
    target, drafter = models
    paced = Pair(target, drafter)
    paced.v_server.stop(0)
    paced.v_engine.close()
    paced.v_cfg = VerifierConfig(
        **{**paced.v_cfg.__dict__, "stream_quantum_ms": 200, "stream_chunk_tokens": 2}
    )
    paced.start_verifier(0)
    try:
        with SpecDecClient(paced.verifier_addr) as c:
            kw = {"max_new_tokens": 15, "ignore_eos": True, "num_draft_tokens": 3}
            start = time.monotonic()
            pieces, times = [], []
            for piece in c.stream(PROMPT, **kw):
                pieces.append(piece)
                times.append(time.monotonic() - start)
    finally:
        paced.stop()
    assert [t for p in pieces for t in p.token_ids] == hf_greedy(target, PROMPT_IDS, 15)
    assert all(len(p.token_ids) % 2 == 0 for p in pieces[:-1]) and pieces[-1].finish_reason == "length"
    assert times[0] >= 0.19  # the first message waits for the first tick
