"""The verifier's sessions: the target's state for each session of the Verify rpc (by id, with an idle
timeout and caps on their number and total tokens), and the slots running generations hold against the
same caps."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from specdec.config import VerifierConfig
from specdec.rpc import LimitExceeded, SessionNotFound
from specdec_core.drafting import DraftBlock
from specdec_core.runtime.interface import Runner
from specdec_core.runtime.jobs import Executor
from specdec_core.sampling import SamplingParams
from specdec_core.target import TargetSession
from specdec_core.verification import Verdict

log = logging.getLogger(__name__)


@dataclass
class SessionEntry:
    """One id's place in the store: a Verify session, or (``session`` None) a running generation's slot or a
    session being created; ``lock`` is held while it is in use, and a held entry never expires."""

    session: TargetSession | None
    tokens: int
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _close(entry: SessionEntry) -> None:
    if entry.session is not None:
        entry.session.close()  # frees its KV slot from the next iteration on


class SessionStore:
    """Sessions by id, with an idle timeout and caps on their number and total tokens.

    ``runner`` / ``executor``: the target's runner and the scheduler its forwards go through.
    """

    def __init__(self, config: VerifierConfig, runner: Runner, executor: Executor) -> None:
        self.config = config
        self.runner = runner
        self.executor = executor
        self._entries: dict[str, SessionEntry] = {}
        self._lock = threading.Lock()

    def verify(
        self,
        session_id: str,
        tokens: list[int],
        reset: bool,
        params: SamplingParams,
        block: DraftBlock,
        want_logprobs: bool,
    ) -> tuple[Verdict, list[float] | None, int]:
        """One Verify call: extend the session by ``tokens`` (a ``reset`` starts it over from them), verify
        ``block`` against it; returns the verdict, the drafted tokens' logprobs if asked, the context length."""
        if not session_id:
            raise ValueError("session_id is required")
        entry = self._open(session_id, tokens, params) if reset else self.get(session_id)
        with entry.lock:
            session = entry.session
            assert session is not None  # created by _open, or get() which refuses empty entries
            session.append(tokens if not reset else [])
            if len(session.context) + len(block.tokens) + 1 > self.config.max_session_tokens:
                self.remove(session_id)
                raise LimitExceeded(
                    f"session {session_id} reached max_session_tokens {self.config.max_session_tokens}"
                )
            verdict, logprobs = session.verify(block.tokens, block, want_logprobs)
            entry.tokens = len(session.context)
            entry.last_used = time.monotonic()
            return verdict, logprobs, len(session.context)

    def _open(self, session_id: str, tokens: list[int], params: SamplingParams) -> SessionEntry:
        """A new session over the history ``tokens`` (replacing one of the same id)."""
        if not tokens:
            raise ValueError("a reset needs the full token history")
        entry = self.add(session_id, SessionEntry(session=None, tokens=len(tokens)))
        with entry.lock:
            # the history is fed with the first verified block, in one forward
            entry.session = TargetSession(self.runner, tokens, params, self.executor)
        return entry

    def _expire(self) -> None:
        deadline = time.monotonic() - self.config.session_idle_s
        for sid in [s for s, e in self._entries.items() if e.last_used < deadline and not e.lock.locked()]:
            log.info("session %s expired", sid)
            _close(self._entries.pop(sid))

    def add(self, session_id: str, entry: SessionEntry) -> SessionEntry:
        if entry.tokens > self.config.max_session_tokens:
            raise LimitExceeded(
                f"session of {entry.tokens} tokens exceeds max_session_tokens "
                f"{self.config.max_session_tokens}"
            )
        with self._lock:
            self._expire()
            replaced = self._entries.pop(session_id, None)
            if replaced is not None:
                _close(replaced)
            if len(self._entries) >= self.config.max_sessions:
                raise LimitExceeded(f"verifier at its limit of {self.config.max_sessions} sessions")
            total = sum(e.tokens for e in self._entries.values()) + entry.tokens
            if total > self.config.max_total_tokens:
                raise LimitExceeded(f"verifier at its limit of {self.config.max_total_tokens} cached tokens")
            self._entries[session_id] = entry
        return entry

    def get(self, session_id: str) -> SessionEntry:
        with self._lock:
            self._expire()
            entry = self._entries.get(session_id)
        if entry is None or entry.session is None:
            raise SessionNotFound(f"unknown session {session_id!r}; resend the full history with reset")
        entry.last_used = time.monotonic()
        return entry

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.session is not None)

    def remove(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is not None:
            _close(entry)

    @contextmanager
    def reserve(self, session_id: str, tokens: int) -> Iterator[None]:
        """Hold a slot (and token budget) for a streaming generation while it runs."""
        entry = self.add(session_id, SessionEntry(session=None, tokens=tokens))
        with entry.lock:
            try:
                yield
            finally:
                self.remove(session_id)
