"""The batched runtime: one forward over ragged rows equals each row alone; the scheduler batches, chunks,
yields to foreground work, cancels; admission bounds and orders; the load model learns forward costs."""

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
from tiny import FAMILIES, tiny_model

from specdec_core.draft_length import AdaptiveDraftLength, FixedDraftLength
from specdec_core.errors import GenerationCancelled, QueueFull
from specdec_core.runtime.admission import Admission, Cancellation
from specdec_core.runtime.backends.torch_eager import ModelRunner, Row
from specdec_core.runtime.batch_costs import BatchLoad, ForwardCosts, isotonic
from specdec_core.runtime.jobs import drive
from specdec_core.runtime.scheduler import Scheduler

ATOL = dict(atol=1e-4, rtol=1e-4)


def alone(model, tokens: list[int], keep: int) -> torch.Tensor:
    """The last ``keep`` positions' logits of ``tokens`` fed to a fresh runner in one forward."""
    runner = ModelRunner(model)
    return runner.extend(runner.new_sequence(), tokens, keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_batch_gives_each_row_the_logits_it_gets_alone(family):
    model = tiny_model(family)
    runner = ModelRunner(model)
    long_prompt = [(7 * i + 3) % 390 for i in range(60)]
    a, b, c, d = (runner.new_sequence() for _ in range(4))
    ctx_b, ctx_c, ctx_d = [5, 6, 7, 8, 9, 10], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47]
    runner.forward([Row(b, ctx_b, 0), Row(c, ctx_c, 0), Row(d, ctx_d, 0)])  # their histories
    rows = [
        Row(a, long_prompt[:24], 1),  # a prompt chunk
        Row(b, [20, 21, 22, 23], 4),  # a verify block, k = 3
        Row(c, [30, 31, 32, 33, 34, 35], 6),  # a verify block, k = 5
        Row(d, [50], 1),  # a single-token decode
    ]
    out = runner.forward(rows)
    torch.testing.assert_close(out[0], alone(model, long_prompt[:24], 1), **ATOL)
    torch.testing.assert_close(out[1], alone(model, ctx_b + [20, 21, 22, 23], 4), **ATOL)
    torch.testing.assert_close(out[2], alone(model, ctx_c + [30, 31, 32, 33, 34, 35], 6), **ATOL)
    torch.testing.assert_close(out[3], alone(model, ctx_d + [50], 1), **ATOL)
    # the rest of the prompt in a second chunk, next to a rolled-back row
    runner.rollback(c, len(ctx_c) + 2)  # two of the five drafts accepted
    out = runner.forward([Row(a, long_prompt[24:], 2), Row(c, [99], 1)])
    torch.testing.assert_close(out[0], alone(model, long_prompt, 2), **ATOL)
    torch.testing.assert_close(out[1], alone(model, ctx_c + [30, 31, 99], 1), **ATOL)


def test_rollback_moves_one_length_and_slots_are_reused():
    model = tiny_model("qwen2")
    runner = ModelRunner(model, slots=2, capacity=8)
    a, b = runner.new_sequence(), runner.new_sequence()
    runner.forward([Row(a, list(range(1, 6)), 0), Row(b, list(range(10, 20)), 0)])  # capacity grows
    before_b = runner.extend(b, [21], 1)
    runner.rollback(b, 10)
    runner.rollback(a, 2)
    assert (len(a), len(b)) == (2, 10)
    torch.testing.assert_close(runner.extend(b, [21], 1), before_b, **ATOL)  # b's cache untouched
    c = runner.new_sequence()  # a third sequence: the buffers grow to more slots
    assert runner.kv.slots >= 3 and runner.active_sequences == 3
    slot = c.slot
    runner.release(c)
    runner.release(c)  # idempotent
    d = runner.new_sequence()
    assert d.slot == slot and runner.active_sequences == 3  # the freed slot is taken again, empty
    torch.testing.assert_close(runner.extend(d, [1, 2, 3], 1), alone(model, [1, 2, 3], 1), **ATOL)
    del d
    import gc

    gc.collect()  # a sequence nobody holds gives its slot back
    assert runner.active_sequences == 2


def job(seq, tokens, keep=1, log=None):
    """A job feeding ``tokens`` then one more token per step, three steps; returns the logits seen."""
    seen = []
    logits = yield Row(seq, tokens, keep)
    seen.append(logits)
    for t in (3, 4):
        if log is not None:
            log.append(t)
        logits = yield Row(seq, [t], 1)
        seen.append(logits)
    return seen


class CountingRunner(ModelRunner):
    """Records the rows and tokens of every forward."""

    def __init__(self, *args, delay=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards: list[list[int]] = []
        self.delay = delay

    def forward(self, rows):
        self.forwards.append([len(r.tokens) for r in rows])
        time.sleep(self.delay)
        return super().forward(rows)


def test_the_scheduler_batches_ready_jobs_and_matches_driving_them_alone():
    model = tiny_model("llama")
    ref = ModelRunner(model)
    expected = [drive(ref, job(ref.new_sequence(), [10 + i, 20 + i])) for i in range(3)]
    runner = CountingRunner(model)
    sched = Scheduler(max_rows=8, max_tokens=64)
    try:
        seqs = sched.call(lambda: [runner.new_sequence() for _ in range(3)])
        # submitted together (from the thread itself, so all three are queued before the next iteration)
        tasks = sched.call(lambda: [sched.submit(runner, job(seqs[i], [10 + i, 20 + i])) for i in range(3)])
        results = [t.future.result(timeout=30) for t in tasks]
        assert sched.run(runner, iter(())) is None  # a job without rows finishes at once
    finally:
        sched.close()
    for got, want in zip(results, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **ATOL)
    assert runner.forwards == [[2, 2, 2], [1, 1, 1], [1, 1, 1]]  # three steps, each one forward for all


def test_a_long_prompt_is_chunked_while_others_decode_and_nothing_starves():
    model = tiny_model("qwen2")
    runner = CountingRunner(model)
    sched = Scheduler(max_rows=8, max_tokens=32, prefill_chunk=8, max_batch_wait_s=0.0)
    prompt = [(3 * i + 1) % 390 for i in range(40)]
    try:
        long_seq, short_seq = sched.call(lambda: (runner.new_sequence(), runner.new_sequence()))
        sched.call(lambda: runner.forward([Row(short_seq, [1, 2, 3], 0)]))
        runner.forwards.clear()
        done: list[str] = []
        long_task = sched.submit(runner, job(long_seq, prompt, keep=2))
        short_task = sched.submit(runner, job(short_seq, [5]))
        long_task.future.add_done_callback(lambda _: done.append("long"))
        short_task.future.add_done_callback(lambda _: done.append("short"))
        long_out = long_task.future.result(timeout=30)
        short_task.future.result(timeout=30)
    finally:
        sched.close()
    assert max(max(f) for f in runner.forwards) <= 8  # the prompt went in chunks of 8
    assert done == ["short", "long"]  # the decoding job took turns with the chunks, not waiting for all 40
    torch.testing.assert_close(long_out[0], alone(model, prompt, 2), **ATOL)  # logits with the last chunk


def test_background_jobs_run_only_when_nothing_else_is_ready_and_cancel_drops_a_job():
    model = tiny_model("llama")
    runner = CountingRunner(model, delay=0.01)
    sched = Scheduler()
    steps: list[int] = []

    def background(seq):
        for i in range(10_000):
            yield Row(seq, [i % 300 + 1], 1)
            steps.append(i)

    try:
        bg_seq, fg_seq = sched.call(lambda: (runner.new_sequence(), runner.new_sequence()))
        bg = sched.submit(runner, background(bg_seq), background=True)
        deadline = time.monotonic() + 10
        while not steps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert steps, "background work runs while the scheduler is idle"
        fg = sched.submit(runner, job(fg_seq, [7, 8]))
        fg.future.result(timeout=30)
        assert all(len(f) == 1 for f in runner.forwards)  # never batched with the foreground job
        bg.cancel()
        with pytest.raises(CancelledError):
            bg.future.result(timeout=10)
        stopped = len(steps)
        time.sleep(0.05)
        assert len(steps) == stopped  # a cancelled job never runs again
    finally:
        sched.close()


def test_scheduler_calls_errors_and_close():
    sched = Scheduler()
    runner = ModelRunner(tiny_model("llama"))
    idents = {sched.call(threading.get_ident) for _ in range(3)}
    assert len(idents) == 1 and threading.get_ident() not in idents
    with pytest.raises(ZeroDivisionError):
        sched.call(lambda: 1 / 0)

    def failing(seq):
        yield Row(seq, [1], 1)
        raise ValueError("bad job")

    seq = sched.call(runner.new_sequence)
    with pytest.raises(ValueError, match="bad job"):
        sched.run(runner, failing(seq))
    assert sched.run(runner, job(seq, [2])) is not None  # the thread keeps serving
    sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.call(lambda: None)


def test_the_batch_window_waits_for_the_rows_of_the_last_forward():
    model = tiny_model("llama")
    runner = CountingRunner(model)
    sched = Scheduler(batch_wait=1.0, max_batch_wait_s=0.5)

    def one_row(seq, token):
        return (yield Row(seq, [token], 1))

    try:
        a, b = sched.call(lambda: (runner.new_sequence(), runner.new_sequence()))
        first = [sched.submit(runner, one_row(s, 5)) for s in (a, b)]
        for t in first:
            t.future.result(timeout=10)
        sched._last_forward_s = 0.5  # as if forwards took half a second: the window is up to 0.5 s
        runner.forwards.clear()
        ta = sched.submit(runner, one_row(a, 6))
        time.sleep(0.1)  # b comes back late, within the window
        tb = sched.submit(runner, one_row(b, 6))
        ta.future.result(timeout=10)
        tb.future.result(timeout=10)
    finally:
        sched.close()
    assert runner.forwards == [[1, 1]]  # one forward for both


def test_admission_bounds_running_and_waiting_in_arrival_order():
    adm = Admission(max_running=1, max_waiting=2)
    order: list[str] = []
    release = threading.Event()

    def run(name, cancel=None):
        try:
            with adm.slot(cancel):
                order.append(name)
                release.wait(5)
        except GenerationCancelled:
            order.append(f"{name} left")

    first = threading.Thread(target=run, args=("a",))
    first.start()
    while adm.running == 0:
        time.sleep(0.01)
    gone = Cancellation()
    waiters = [threading.Thread(target=run, args=("b",)), threading.Thread(target=run, args=("c", gone))]
    for w in waiters:
        w.start()
        while adm.waiting < waiters.index(w) + 1:
            time.sleep(0.01)
    with pytest.raises(QueueFull, match="max_waiting 2"):
        with adm.slot():
            pass
    gone.cancel()  # c's client goes away while it waits
    release.set()
    for t in [first, *waiters]:
        t.join(10)
    assert order in (["a", "c left", "b"], ["a", "b", "c left"])  # c never ran
    assert adm.running == 0 and adm.waiting == 0


def test_isotonic_and_forward_costs():
    assert isotonic([1.0, 3.0, 2.0, 4.0], [1, 1, 1, 1]) == [1.0, 2.5, 2.5, 4.0]
    costs = ForwardCosts(alpha=1.0)
    for tokens, seconds in ((1, 0.30), (5, 0.40), (9, 0.38), (40, 0.90)):
        costs.record(tokens, seconds)
    assert costs.cost(1) == pytest.approx(0.30)
    assert costs.cost(0.5) == pytest.approx(0.30)
    assert costs.cost(5) == pytest.approx(0.39)  # 5 and 9 pooled: never cheaper with more tokens
    assert costs.cost(3) == pytest.approx(0.345)
    assert costs.cost(80) > costs.cost(40) > costs.cost(9)  # extrapolated with the last slope
    # optimistic (what the draft-length policies plan with): an unmeasured bucket costs the widest below it
    assert costs.cost(3, optimistic=True) == pytest.approx(0.30)
    assert costs.cost(5, optimistic=True) == pytest.approx(0.39)
    assert costs.cost(20, optimistic=True) == pytest.approx(0.39)
    costs.record(2, 0.35)
    assert costs.cost(1.5, optimistic=True) == pytest.approx(0.325)  # adjacent buckets: interpolated
    assert ForwardCosts.bucket(100) == 96 and ForwardCosts.bucket(16) == 16


def test_batch_load_knows_the_sessions_and_the_forward_costs():
    load = BatchLoad()
    assert load.snapshot().forward_s is None and load.snapshot().peers == ()
    a, b, plain = AdaptiveDraftLength(), FixedDraftLength(3), FixedDraftLength(0)
    for policy in (a, b, plain):
        load.join(policy)
    b.update(3, 2, 0.4, draft_s=0.06)
    load.on_forward([4, 1, 1], 0.5)
    snap = load.snapshot(a)
    assert [p.fixed for p in snap.peers] == [3, 0]
    assert snap.peers[0].acceptance == pytest.approx(3 / 5) and snap.peers[0].t_draft == pytest.approx(0.02)
    assert snap.forward_s(6) == pytest.approx(0.5)
    load.leave(b)
    assert [p.fixed for p in load.snapshot(a).peers] == [0]
