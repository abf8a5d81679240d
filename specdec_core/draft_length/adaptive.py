"""The adaptive draft length: each round's length from the session's measured costs and its batch
(docs/draft_length.md derives it)."""

from __future__ import annotations

from collections.abc import Sequence

from ..drafting import EarlyStop
from .base import DraftLengthPolicy, Load, Peer, Plan, gains
from .batch import Batch, Forward, Member, batch_start_tokens, rate_after_start
from .measurements import Measurements
from .probing import ProbeSchedule

# drafting must beat plain decoding by this much: smaller predicted gains are within the model's error, and
# drafting sessions finish unevenly (the batch's last one can end later than without drafting)
DRAFT_MARGIN = 1.1
RESUME_MARGIN = 1.05  # resuming after plain rounds needs this much more, so noise does not flip a session
PLAN_EVERY = 4  # rounds a plan is kept while the batch keeps its make-up (estimates move slowly)


class AdaptiveDraftLength(DraftLengthPolicy):
    """Chooses the block length per round from the measured costs: by confidence, by expected rate, or by
    the batch's plan (docs/draft_length.md). ``prior``: a finished session to start from (``LengthMemory``)."""

    def __init__(
        self,
        k_max: int = 8,
        k_start: int = 4,
        min_samples: int = 4,
        prior: AdaptiveDraftLength | None = None,
    ) -> None:
        self.k_max = k_max
        self.k = min(k_start, k_max)  # a lone session's length while blocks do not end by confidence
        self.measured = Measurements(k_max, min_samples)
        self.probes = ProbeSchedule()
        self._plan: Plan | None = None  # replanned every PLAN_EVERY rounds or when the batch changes
        self._plan_age = 0
        self._plan_peers: tuple[int | None, ...] = ()
        self.last_k: int | None = None  # the length chosen for the round under way (None: none yet)
        self.pending_start: int | None = None  # context its drafter has not seen (None: not known yet)
        self._plain_asked = False  # whether the one plain round that prices plain decoding was asked for
        if prior is not None:
            self.measured.start_from(prior.measured)
            self.probes.every = prior.probes.every
            if not self.measured.uses_confidence and self.measured.verify_obs:
                self.k = self.measured.best_length(self.k)

    @property
    def rounds(self) -> float:
        """Drafted rounds measured (a warm start's weighted down)."""
        return self.measured.rounds

    @property
    def bin_tried(self) -> list[float]:
        """Judged positions by confidence bin."""
        return self.measured.bin_tried

    @property
    def learning(self) -> bool:
        """Too little measured to plan: draft to learn."""
        m = self.measured
        if m.observed >= m.min_samples and m.verify_obs:  # a free source, measured by observation
            return False
        return m.rounds < 2 or not m.draft_tokens

    # -- the choice --------------------------------------------------------------------------------------
    def next_length(self, load: Load | None = None) -> int:
        self.pending_start = load.start_tokens if load is not None else 0
        self.last_k = self._choose(load)
        if self.last_k > 0:
            self.pending_start = 0  # it catches up now
        return self.last_k

    def _choose(self, load: Load | None) -> int:
        if self.learning:
            return self.k_max if self.measured.uses_confidence else self.k
        if not self._plain_asked and 1 not in self.measured.verify_obs:
            # one plain round, so that what drafting competes with is a measured forward: extrapolated from
            # drafted rounds it is overpriced (their forwards carry the drafter's turns on shared cores, and
            # a forward table knowing only wider forwards prices one token as its narrowest), and a first
            # session would draft at a loss all along (docs/draft_length.md). It emits a token: free.
            self._plain_asked = True
            return 0
        peers = tuple(p.fixed for p in load.peers) if load else ()  # the batch's make-up
        if self._plan is None or self._plan_age >= PLAN_EVERY or peers != self._plan_peers:
            self._plan, self._plan_age, self._plan_peers = self.plan(load), 0, peers
            self.probes.after = self._probe_interval(load) if self._plan.k == 0 else 0.0
        self._plan_age += 1
        plan = self._plan
        if plan.k == 0:
            if self.probes.due():  # has the text turned predictable?
                self._plan = None  # replan after the probe
                return self.probes.probe(self.k_max)
            return 0
        margin = DRAFT_MARGIN * (RESUME_MARGIN if self.probes.since_draft else 1.0)
        if self._with_start(plan.rate, load) < margin * self._plain_plan(load).rate:
            return 0
        self.probes.resume()
        # with confidences a block also ends where the drafter is unsure (early_stop prices each token);
        # the plan's length bounds it: verify costs step (llama.cpp: 5 positions cost nearly what 8 do, 4
        # what 2 do), which a price per token at the mean block does not see
        return plan.k

    def _probe_interval(self, load: Load | None) -> float:
        m = self.measured
        return self.probes.interval(self._batch(load), m.t_draft(), m.t_network(), self.start_cost(load))

    def early_stop(self, load: Load | None = None) -> EarlyStop | None:
        m = self.measured
        if not m.uses_confidence or self.learning or m.round_s <= 0:
            return None
        t_draft = m.t_draft()
        plan = self._plan
        if plan is not None and load is not None and load.forward_s is not None and load.peers:
            # the batch's rate; a drafted token's verify cost at the batch's size, its drafting step
            # shared by the sessions drafting
            slope = self._forward(load).slope(plan.tokens)
            theta = plan.rate * (t_draft / max(plan.drafting, 1) + slope) / m.acceptance(0)
        else:  # a lone session: a token's drafting step and its share of the planned block's verify
            cap = plan.k if plan is not None and plan.k > 0 else round(m.draft_tokens / max(m.rounds, 1))
            slope = self._forward(load).extension_slope(cap)
            theta = m.emitted / m.round_s * (t_draft + slope) / m.acceptance(0)
        return EarlyStop(below=min(max(theta, 0.0), 0.95), acceptance=self.acceptance_by_confidence())

    def acceptance_by_confidence(self) -> tuple[float, ...]:
        return self.measured.acceptance_by_confidence()

    def peer(self) -> Peer:
        # a session decoding plainly counts as plain until it drafts again: its peers must not plan a
        # drafting phase it will not join (the plain ones would wait for the few drafting sessions' drafts);
        # one that has not chosen yet, or drafts, counts as adaptive
        m = self.measured
        fixed = 0 if self.last_k == 0 else None
        t_draft = 0.0 if self.learning else m.t_draft()  # 0 too for a free source measured by observation
        return Peer(acceptance=m.acceptance(0), t_draft=t_draft, fixed=fixed, start_tokens=self.pending_start)

    # -- the drafter's start -----------------------------------------------------------------------------
    def begin(self, start_tokens: int) -> None:
        self.pending_start = start_tokens  # its peers price this start from the first round on

    def start_cost(self, load: Load | None) -> float:
        """Seconds the drafter needs to catch up with the context before drafting (0 until measured)."""
        return self.measured.start_cost(load.start_tokens) if load is not None else 0.0

    def _with_start(self, rate: float, load: Load | None) -> float:
        """A drafting plan's batch rate over the tokens left, once the drafters' starts are paid: the mean
        start of this session and its adaptive peers (``batch_start_tokens``), so that every session of the
        batch prices the same starts and they decide alike."""
        if load is None:
            return rate
        return rate_after_start(rate, self.measured.start_cost(batch_start_tokens(load)), load.remaining)

    # -- planning the batch's round ----------------------------------------------------------------------
    def plan(self, load: Load | None = None) -> Plan:
        """The batch rate-maximising drafting depth and this session's length in it."""
        return self._batch(load).best(self.measured.t_network())

    def _plain_plan(self, load: Load | None) -> Plan:
        return self._batch(load).at_depth(0, 0.0)

    def _batch(self, load: Load | None) -> Batch:
        """This session (first) and its peers, sharing the load's forward (alone: the verify line)."""
        own = self.measured.member(optimistic=not (load is not None and load.peers))
        members = [own]
        for p in load.peers if load else ():
            members.append(Member(gains(p.acceptance, self.k_max), p.t_draft or own.t_draft, p.fixed))
        return Batch(members, self._forward(load), self.k_max)

    def _forward(self, load: Load | None) -> Forward:
        if load is not None and load.forward_s is not None:
            return Forward.shared(load.forward_s)
        return Forward(cost=self.measured.verify_cost, slope=lambda _tokens: self.measured.verify_slope())

    def describe(self, load: Load | None = None) -> str:
        """The estimates behind the next choice (debug logs)."""
        if self.learning:
            return "learning"
        m, plan, plain = self.measured, self.plan(load), self._plain_plan(load)
        return (
            f"plan k {plan.k} depth {plan.depth} ({plan.drafting} drafting) {plan.rate:.2f} tok/s vs plain "
            f"{plain.rate:.2f} (batch of {1 + (len(load.peers) if load else 0)}); acceptance "
            f"{m.acceptance(0):.2f}, t_draft {m.t_draft() * 1e3:.0f} ms, "
            f"net {m.t_network() * 1e3:.0f} ms"
        )

    # -- feedback ----------------------------------------------------------------------------------------
    def update(
        self,
        k: int,
        num_accepted: int,
        verify_s: float,
        draft_s: float = 0.0,
        network_s: float = 0.0,
        confidences: Sequence[float] = (),
        costs_valid: bool = True,
        start_tokens: int = 0,
    ) -> None:
        self.measured.record_verify(k + 1, verify_s)
        if k == 0:  # a plain round: only its verify cost is news
            self.measured.plain_rounds += 1
            self.probes.since_draft += 1
            return
        self.probes.since_draft = 0
        self.measured.record_drafted(
            k, num_accepted, verify_s, draft_s, network_s, confidences, costs_valid, start_tokens
        )
        self.k = self.measured.best_length(self.k)

    def observe(self, judged: int, num_accepted: int, block: int, verify_s: float) -> None:
        """A round that did not draft from this source, for a source whose drafting costs nothing (prompt
        lookup: its proposal is computed every round anyway). ``judged`` positions of what it would have
        proposed were checked against the committed tokens, the first ``num_accepted`` equal; the round
        verified ``block`` positions in ``verify_s`` (the same target cost its own blocks would pay). Once
        ``min_samples`` rounds are observed, the policy plans from them without drafting to learn."""
        self.measured.record_positions(min(judged, self.k_max), num_accepted)
        if block <= self.k_max + 1:
            self.measured.record_verify(block, verify_s)
        self.measured.observed += 1
        self._plan = None  # replan with it
