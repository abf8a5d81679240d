"""Many generations at once through the gRPC services (tiny models, in-process servers on port 0): every
session equals its target's own greedy output, seeded sampling does not depend on the batch, a slow drafter
holds up nobody, the waiting queue is bounded, and a cancelled stream frees its rows on both services."""

import threading
import time

import grpc
import pytest
from test_services import Pair
from tiny import hf_greedy, perturbed, tiny_model, tiny_tokenizer

from client import SpecDecClient
from drafter_service.server import start as start_drafter
from drafter_service.sessions import DrafterEngine
from specdec.config import DrafterConfig, VerifierConfig
from specdec.rpc import channel
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import DraftLengthPolicy
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stopping import StopCriteria
from verifier_service.remote_drafter import RemoteDrafter

PROMPTS = [
    "def add(a, b):\n",
    "for i in range(10):\n",
    "The quick brown fox",
    "import numpy as np\n",
    "class Stack:\n",
    "Speculative decoding drafts",
]


def ids(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.1)


@pytest.fixture
def pair(models):
    p = Pair(*models)
    yield p
    p.stop()


def slow_down(runner: ModelRunner, seconds: float) -> None:
    """Make every forward of ``runner`` take ``seconds`` longer (sleeping: the GIL stays free)."""
    forward = runner.forward

    def slow(rows):
        time.sleep(seconds)
        return forward(rows)

    runner.forward = slow  # type: ignore[method-assign]


def run_concurrently(fns):
    results = [None] * len(fns)
    errors = []

    def call(i):
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def test_concurrent_generations_each_equal_their_target_greedy_output(pair, models):
    slow_down(pair.v_engine.runner, 0.005)  # rows of different sessions then meet in forwards
    modes = [dict(num_draft_tokens=3), dict(), dict(no_draft=True)] * 2  # fixed k, the adaptive default, none

    def gen(i):
        with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
            return c.generate(PROMPTS[i], max_new_tokens=24, ignore_eos=True, **modes[i])

    results = run_concurrently([lambda i=i: gen(i) for i in range(len(PROMPTS))])
    for text, r in zip(PROMPTS, results):
        assert r.token_ids == hf_greedy(models[0], ids(text), 24), text
    sched = pair.v_engine.scheduler
    assert sched.rows_run / sched.forwards > 1.5  # the sessions shared forwards
    assert results[0].stats["drafted"] > 0 and results[2].stats["drafted"] == 0


def test_seeded_sampling_is_the_same_alone_batched_and_without_drafting(pair):
    """The coupled rule: a seeded generation's tokens do not depend on the draft lengths (adaptive ones
    follow the load), the batch, or whether anything was drafted at all."""
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, ignore_eos=True)

    def gen(i, seed, **mode):
        with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
            return c.generate(PROMPTS[i], seed=seed, **kw, **mode)

    alone = gen(0, 11, adaptive=True)
    fixed = gen(0, 11, num_draft_tokens=3)
    plain = gen(0, 11, no_draft=True)
    slow_down(pair.v_engine.runner, 0.005)
    batched = run_concurrently(
        [lambda: gen(0, 11, adaptive=True)]
        + [lambda i=i: gen(i, 100 + i, adaptive=True) for i in range(1, 5)]
    )
    assert alone.stats["drafted"] > 0 and fixed.stats["drafted"] > 0 and plain.stats["drafted"] == 0
    assert alone.token_ids == fixed.token_ids == plain.token_ids == batched[0].token_ids
    assert len({tuple(b.token_ids) for b in batched}) == 5  # the other sessions sampled their own streams


class SleepyDrafter:
    """A drafter service whose every forward sleeps (a late drafter: an overloaded remote machine, a slow
    network; on other cores, so it takes no turn on this host's)."""

    def __init__(self, model, seconds):
        config = DrafterConfig(model="sleepy", quantization="none", compute_lease=False)
        self.engine = DrafterEngine(config, model, tiny_tokenizer())
        slow_down(self.engine.runner, seconds)
        self.server, port, _ = start_drafter(DrafterConfig(port=0, host="127.0.0.1"), self.engine)
        self.address = f"127.0.0.1:{port}"

    def stop(self):
        self.server.stop(0)
        self.engine.close()


def test_a_session_whose_drafter_is_slow_holds_up_nobody(models):
    # requests name their drafters here (one of them a slow one started below)
    cfg = VerifierConfig(port=0, host="127.0.0.1", model="tiny", fast_verify="off", allow_any_drafter=True)
    pair = Pair(*models, verifier_cfg=cfg)
    sleepy = SleepyDrafter(models[1], 0.4)
    try:

        def fast(i):
            with SpecDecClient(pair.verifier_addr, pair.drafter_addr) as c:
                t0 = time.perf_counter()
                r = c.generate(PROMPTS[i], max_new_tokens=30, ignore_eos=True, num_draft_tokens=2)
                return r, time.perf_counter() - t0

        _, alone_s = fast(1)

        def slow():
            with SpecDecClient(pair.verifier_addr, sleepy.address) as c:
                t0 = time.perf_counter()
                r = c.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True, num_draft_tokens=2)
                return r, time.perf_counter() - t0

        (slow_r, slow_s), (fast_r, fast_s), (_, fast2_s) = run_concurrently(
            [slow, lambda: fast(1), lambda: fast(2)]
        )
    finally:
        sleepy.stop()
        pair.stop()
    assert slow_s > 2.0 and slow_r.stats["drafted"] > 0  # each of its rounds waited 0.8 s for its drafts
    # the others ran their ~15 rounds meanwhile: each waited at most one (millisecond) forward for it
    assert max(fast_s, fast2_s) < min(slow_s / 2, alone_s + 1.0)
    assert fast_r.token_ids == hf_greedy(models[0], ids(PROMPTS[1]), 30)


def test_the_waiting_queue_is_bounded_and_answers_resource_exhausted(models):
    cfg = VerifierConfig(
        port=0, host="127.0.0.1", model="tiny", fast_verify="off", max_running=1, max_waiting=1
    )
    p = Pair(*models, verifier_cfg=cfg)
    slow_down(p.v_engine.runner, 0.02)
    finished: list[str] = []
    try:

        def gen(name):
            with SpecDecClient(p.verifier_addr, retries=0) as c:
                c.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True, no_draft=True)
            finished.append(name)

        running = threading.Thread(target=gen, args=("running",))
        running.start()
        while p.v_engine.admission.running == 0:
            time.sleep(0.01)
        queued = threading.Thread(target=gen, args=("queued",))
        queued.start()
        while p.v_engine.admission.waiting == 0:
            time.sleep(0.01)
        with SpecDecClient(p.verifier_addr, retries=0) as c, pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPTS[1], max_new_tokens=5, no_draft=True)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_waiting 1" in err.value.details()
        running.join(30)
        queued.join(30)
        assert finished == ["running", "queued"]  # the queued one ran after, it was not refused
    finally:
        p.stop()


def test_a_cancelled_stream_frees_its_rows_on_both_services(pair):
    slow_down(pair.v_engine.runner, 0.02)
    stub = pb_grpc.GenerationStub(channel(pair.verifier_addr))
    request = pb.GenerateRequest(
        text=PROMPTS[0],
        stop=pb.StopConditions(max_new_tokens=400, ignore_eos=True),
        num_draft_tokens=3,
        drafter=pair.drafter_addr,
    )
    call = stub.Generate(request)
    for _ in range(3):
        next(call)
    assert pair.v_engine.runner.active_sequences == 1 and pair.d_engine.runner.active_sequences == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        pair.v_engine.runner.active_sequences or pair.d_engine.runner.active_sequences
    ):
        time.sleep(0.02)
    assert pair.v_engine.runner.active_sequences == 0 and pair.d_engine.runner.active_sequences == 0
    assert pair.v_engine.admission.running == 0 and pair.v_engine.scheduler.pending == 0


class Schedule(DraftLengthPolicy):
    """Draft lengths from a fixed cycle, zeros included (rounds decoded without the drafter)."""

    def __init__(self, lengths):
        self.lengths, self.i = lengths, 0

    def next_length(self, load=None):
        self.i += 1
        return self.lengths[(self.i - 1) % len(self.lengths)]


def test_plain_rounds_then_drafting_keep_a_remote_drafter_in_step(pair, models):
    decoder = SpeculativeDecoder(ModelRunner(models[0]), tiny_tokenizer(), overlap_prefill=False)
    drafter = RemoteDrafter([pair.drafter_addr], lambda a: pb_grpc.DrafterStub(channel(a)))
    out = [
        t
        for c in decoder.generate(
            ids(PROMPTS[2]),
            SamplingParams(),
            StopCriteria(max_new_tokens=40),
            drafter,
            Schedule([0, 0, 3, 0, 2, 0, 0, 0, 4]),
        )
        for t in c.token_ids
    ]
    assert out == hf_greedy(models[0], ids(PROMPTS[2]), 40)  # the drafter caught up with committed tokens
