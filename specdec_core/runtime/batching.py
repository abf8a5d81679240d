"""Which rows run this iteration: the ready jobs' rows that go into the next forward, and how much of each.

An iteration takes every job with a row ready, in the order they became ready, up to ``max_rows`` rows and
``max_tokens`` tokens, one forward per runner. A long row is fed in chunks of ``prefill_chunk`` tokens while
other sequences are active (its logits come with the last chunk), so a long prompt does not stall the
sessions already decoding; after each chunk the rest queues behind the rows that waited meanwhile (the
scheduler renews its ``ready_since``), so nothing starves. Rows that would be padded wastefully together
(narrow decoding rows beside a wide prompt chunk) take turns (``Batcher.by_width``). *Background* jobs' rows
(a drafter's lookahead) run only when no other row is ready.

Policy only: no thread, no queue, no forward. ``scheduler.py`` waits for the rows, runs the forwards this
module chooses and moves each task on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .interface import Row
from .jobs import Task

WIDE_ROW = 16  # a row feeding more tokens than this is a prompt (chunk), not a decoding or verify step

Feed = tuple[Task, int]  # a task, and how many tokens of its row to feed now


@dataclass(frozen=True)
class Batcher:
    """The limits of one forward and the choice of its rows (see the module docstring).

    ``prefill_chunk``: 0 never splits a row; ``forward_cost``: seconds of a forward by padded positions
    (None: proportional to them), which decides whether narrow and wide rows run together.
    """

    max_rows: int = 64
    max_tokens: int = 512
    prefill_chunk: int = 128
    forward_cost: Callable[[int], float] | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_tokens < 1:
            raise ValueError("max_rows and max_tokens must be >= 1")

    def select(self, tasks: Iterable[Task]) -> list[Feed]:
        """The rows of this iteration, in the order they became ready, within the limits (the scheduler then
        runs them one forward per runner, ``by_runner``, each split ``by_width``)."""
        ready = sorted((t for t in tasks if t.row is not None), key=lambda t: t.ready_since)
        foreground = [t for t in ready if not t.background]
        candidates = foreground or ready
        # split long rows only when someone else would wait for them
        others = len(foreground) > 1 or any(t.runner.active_sequences > 1 for t in candidates)
        chunk = self.prefill_chunk if self.prefill_chunk and others else self.max_tokens
        chosen: list[Feed] = []
        budget = self.max_tokens
        for task in candidates:
            if len(chosen) == self.max_rows or budget <= 0:
                break
            n = self._feed_size(task, chunk, budget)
            if n <= 0:
                if chosen:
                    continue
                n = remaining(task)  # nothing else to run: feed it whole rather than stall
            chosen.append((task, n))
            budget -= n
        return chosen

    def prompts(self, tasks: Iterable[Task], away: set[int]) -> list[list[Feed]]:
        """The new prompts to prefill while the sequences ``away`` (their ids) are gone drafting, one forward
        per runner, in arrival order (none when there is no such prompt)."""
        new = [
            t
            for t in tasks
            if t.row is not None
            and not t.steps
            and not t.background
            and not t.cancelled
            and id(t.row.seq) not in away
            and remaining(t) > WIDE_ROW
        ]
        chosen: list[Feed] = []
        for task in new[: self.max_rows]:  # each within max_tokens, not all of them together
            n = self._feed_size(task, self.prefill_chunk or self.max_tokens, self.max_tokens)
            chosen.append((task, n if n > 0 else remaining(task)))
        return by_runner(chosen)

    def by_width(self, group: list[Feed]) -> list[Feed]:
        """The rows of one runner to run now: all of them, or, where padding them to one width costs more
        than a second forward, the narrow ones (decoding, verifying: up to ``WIDE_ROW`` tokens) or the wide
        ones (prompt chunks), whichever holds the row that waited longest (so they take turns, and a new
        prompt goes first). Prompts are not split among themselves: that would trade first tokens for little.

        Rows are padded to the widest (``backends/torch_eager.py``), so on a CPU, whose forward costs grow
        with the positions computed, a few decoding rows beside a prompt chunk cost more together than
        apart (docs/serving.md, "The KV layout"). On a GPU a forward of a few hundred positions costs what
        one of a few does, and the rows stay together.
        """
        narrow = [item for item in group if item[1] <= WIDE_ROW]
        wide = [item for item in group if item[1] > WIDE_ROW]
        if not narrow or not wide:
            return group
        cost = self.forward_cost or (lambda tokens: float(tokens))
        together = cost(len(group) * max(n for _, n in wide))
        apart = cost(len(narrow) * max(n for _, n in narrow)) + cost(len(wide) * max(n for _, n in wide))
        if apart >= 0.95 * together:
            return group
        oldest = min(group, key=lambda item: item[0].ready_since)  # whoever waited longest goes first
        return wide if any(item is oldest for item in wide) else narrow

    def _feed_size(self, task: Task, chunk: int, budget: int) -> int:
        """Tokens of ``task``'s row to feed now, at most ``chunk`` and ``budget``; a partial feed leaves the
        positions whose logits are wanted for one last piece (0: it does not fit)."""
        assert task.row is not None
        left = remaining(task)
        n = min(left, max(chunk, task.row.keep), budget)
        return n if n == left else min(n, left - task.row.keep)


def remaining(task: Task) -> int:
    """Tokens of ``task``'s row not fed yet."""
    assert task.row is not None
    return len(task.row.tokens) - task.fed


def by_runner(feeds: list[Feed]) -> list[list[Feed]]:
    """``feeds`` grouped by runner (one forward each), in order of each runner's first feed."""
    groups: dict[int, list[Feed]] = {}
    for task, n in feeds:
        groups.setdefault(id(task.runner), []).append((task, n))
    return list(groups.values())


def rows_to_feed(group: list[Feed]) -> list[Row]:
    """The rows of one forward: each task's next piece. Only a row's last piece asks for logits, and a
    stepped row decodes its steps after it."""
    rows = []
    for task, n in group:
        assert task.row is not None
        piece = task.row.tokens[task.fed : task.fed + n]
        if task.fed + n == len(task.row.tokens):
            rows.append(Row(task.row.seq, piece, task.row.keep, task.row.steps, task.row.pick))
        else:
            rows.append(Row(task.row.seq, piece, 0))
    return rows
