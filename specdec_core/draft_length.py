"""How many tokens to draft next round: a fixed k, or a length chosen from a measured cost model.

A round that drafts k tokens costs ``T(k) = k * t_draft + F(k + 1) + t_network``, with ``t_draft`` the
mean drafting cost per token, ``F(m)`` the cost of a forward of m positions and ``t_network`` the mean
round overhead outside both models. ``F`` comes from the verifier's forwards (``Load.forward_s``: all
sessions' forwards, by total tokens), or, for a session on its own, from a least-squares line through
its measured verify times by block size.

The adaptive policy works in one of two ways:

* **Confidence stop** (drafters that report their probability of each drafted token, as specdec's do):
  draft up to ``k_max`` tokens (in a batch: the planned length, below) but stop after the token at which
  ``P``, the estimated chance that the
  whole block is accepted, falls below ``theta``. ``P`` is the product over the block of the measured
  acceptance of each token's confidence bin (``EarlyStop``), so it stays calibrated whatever the
  temperature or the drafter. Drafting one more token gains about ``P * a`` expected tokens (``a``: the
  measured acceptance of a position whose predecessors were accepted) and costs
  ``t_draft + F'`` seconds; it pays while that gain per second beats the rate already achieved, ``R``.
  Hence ``theta = R * (t_draft + F') / a``, re-estimated every round. Blocks follow the text: long where
  the drafter is sure, short where it is not. (Replayed offline on the Qwen pair's greedy traces of the 8
  benchmark prompts with measured CPU costs: 4.63-4.71 tok/s against 4.49 for the best fixed k.)
* **Expected-rate length** (drafters without confidences): k maximises
  ``E[tokens | k] / T(k)`` with ``E[tokens | k] = 1 + sum_{j=1..k} prod_{i<=j} a_i`` and ``a_i`` counted
  per position (falling back to the pooled rate while a position has few samples).

**Under load** (a batched verifier), the sessions of a batch share every forward and, with the drafter
batching their drafts, every drafting phase: a round of the batch costs ``F(sum_s (k_s + 1)) + K *
t_draft + t_network`` for the longest block ``K``, and yields ``sum_s E_s[tokens | k_s]``. A session's
choice cannot be made alone: one session drafting while the others decode makes them all wait for its
drafts for a token or two of its own (it loses), while all of them drafting share one drafting phase (it
can win by 1.5x on this CPU at 4 sessions). So each session plans the whole batch (``plan``), from its
own measurements and its peers' (``Load.peers``: their acceptance, drafting cost, and fixed lengths): for
each drafting depth K it gives every adaptive session the length ``k_s <= K`` whose marginal token gains
more than it costs at the batch's rate (``E_s(k) - R * F' * k`` at its best), and keeps the K of the
highest batch rate; its own ``k_s`` is what it drafts. Blocks shorten as the batch grows compute bound,
sessions whose text the drafter does not predict stop drafting first, and drafting stops altogether
(K = 0, plain batched decoding) where it no longer pays, as for a drafter nearly as costly as its target.
A session that stopped drafting probes with one short drafted round after ``PROBE_START`` plain rounds,
then after twice as many each time drafting still loses (the interval scales with the batch, whose round
the probe delays, and keeps probes under ``PROBE_BUDGET`` of the batch's time), so it notices when the
text turns predictable again; it never probes where not even a drafter that is always right would pay.
No session may lose: a depth at which some adaptive session would not be ``FAIR_MARGIN`` (10%) faster
than in a round of plain decoding (text its drafter does not predict, waiting for the others' drafts) is
not taken, since the batch rate alone hid it (at 16 Qwen clients of code, chat and prose, a 6-8% better
mean per request came with a 6-15% lower aggregate: the sessions with the least accepted, last to finish,
ran at 0.91-0.96x of plain decoding). Drafting needs the plan to win by ``DRAFT_MARGIN`` (10%): smaller
predicted gains are within the model's error. Resuming needs ``RESUME_MARGIN`` more, so noise does not
flip a session between the two.

Drafting has a start cost: before its first drafted round (or after plain rounds) the drafter prefills
the context it has not seen, ``Load.start_tokens``. Where both roles share the cores (the compose layout,
where the drafter starts lazily) that prefill stalls the whole batch (with the starts unpriced, 16 Qwen
clients × 64 tokens drafted at 0.95× the aggregate of plain batched decoding). So a session that would have to start
its drafter drafts only if the plan still wins once the start is paid from the tokens left to generate:
the batch rate ``R / (R / rate + S)`` with ``R = Load.remaining`` and ``S`` the start time, priced from
the measured seconds per prefilled token of earlier starts (``update(start_tokens=…)``: a start round's
time beyond a normal round of its length). ``S`` is the mean start of the sessions that would draft
(``Peer.start_tokens``), not this session's own: all of them start when the batch drafts, and pricing the
same starts they decide alike. Probes that would start the drafter count the start too.

A new session need not start blind: ``LengthMemory`` keeps, per drafter and sampling setting, what the
last finished session measured, and a new policy starts from it scaled down to ``PRIOR_POSITIONS`` judged
positions and ``PRIOR_ROUNDS`` rounds of costs, so its own measurements take over within a few rounds.
(Replayed on the traces, 64 tokens per prompt: 4.20 tok/s cold, 4.33 warm, best fixed k 4.12.)
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

from .drafting import CONFIDENCE_BINS, EarlyStop, confidence_bin


@dataclass(frozen=True)
class Peer:
    """Another session of the batch, as the planner sees it."""

    acceptance: float = 0.0  # pooled acceptance of a drafted token
    t_draft: float = 0.0  # seconds per drafted token
    fixed: int | None = None  # a fixed draft length (0: decodes without drafting); None: adaptive
    start_tokens: int | None = None  # context its drafter must catch up on before drafting (None: unknown)


@dataclass(frozen=True)
class Load:
    """The batch a session's rounds share (the zero load is a lone session), and where the session stands."""

    peers: tuple[Peer, ...] = ()  # the other active sessions
    forward_s: Callable[[float], float] | None = None  # F(N): seconds of a forward feeding N tokens
    start_tokens: int = 0  # context the drafter must prefill before this session's next drafted round
    remaining: int | None = None  # tokens this session may still generate (None: unbounded)


@dataclass(frozen=True)
class Plan:
    """The batch's round as planned: this session's length, the drafting depth, the expected rate."""

    k: int
    depth: int
    rate: float  # tokens per second of the whole batch
    tokens: float  # tokens fed per forward
    drafting: int  # sessions that draft


PROBE_START = 8  # plain rounds before a session that stopped drafting tries one drafted round
PROBE_MAX = 64
PROBE_LENGTH = 2
PROBE_BUDGET = 0.03  # the share of the batch's time probes may cost
DRAFT_MARGIN = 1.1  # the plan must beat plain decoding by this much
FAIR_MARGIN = 1.1  # ... and leave every adaptive session this much faster than decoding plainly
RESUME_MARGIN = 1.05
PLAN_EVERY = 4  # rounds a plan is kept while the batch keeps its size (estimates move slowly)


def expected_tokens(acceptance: Sequence[float] | float, k: int) -> float:
    """``E[tokens | k]``: 1 + sum over j <= k of the chance that the first j drafts are accepted."""
    return 1.0 + sum(_gains(acceptance, k))


def _plain_lengths(members, k_max: int) -> list[int]:
    """Draft lengths of a round where the adaptive sessions decode plainly (fixed ones keep theirs)."""
    return [min(f, k_max) if f is not None else 0 for _, _, f in members]


def _gains(acceptance: Sequence[float] | float, k: int) -> list[float]:
    """The chance that the first j drafts are accepted, j = 1..k (what the j-th draft adds to E)."""
    out, survive = [], 1.0
    for i in range(1, k + 1):
        survive *= acceptance if isinstance(acceptance, float) else acceptance[i]
        out.append(survive)
    return out


class DraftLengthPolicy(ABC):
    @abstractmethod
    def next_length(self, load: Load | None = None) -> int:
        """Tokens to draft in the coming round (0: a plain decoding round without the drafter)."""

    def early_stop(self, load: Load | None = None) -> EarlyStop | None:
        """When the drafter may end the coming block early (None: never)."""
        return None

    def update(  # noqa: B027 - optional hook
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
        """Feedback after a round that drafted ``k`` tokens (``costs_valid`` False: the round's times also
        paid a one-off, such as the drafter's prefill of ``start_tokens`` context tokens, and count for
        acceptance and the start's price only)."""

    def peer(self) -> Peer:
        """How the other sessions of a batch should count this one."""
        return Peer(fixed=0)

    def begin(self, start_tokens: int) -> None:  # noqa: B027 - optional hook
        """The generation starts; its drafter will have ``start_tokens`` of context to catch up on before
        its first drafted round (0: it is started with the generation)."""


class FixedDraftLength(DraftLengthPolicy):
    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("draft length must be >= 0")
        self.k = k
        self._drafted = self._accepted = 0
        self._draft_s = 0.0

    def next_length(self, load: Load | None = None) -> int:
        return self.k

    def update(
        self,
        k,
        num_accepted,
        verify_s,
        draft_s=0.0,
        network_s=0.0,
        confidences=(),
        costs_valid=True,
        start_tokens=0,
    ) -> None:
        self._drafted += k
        self._accepted += num_accepted
        self._draft_s += draft_s

    def peer(self) -> Peer:
        d = self._drafted
        return Peer((self._accepted + 1) / (d + 2), self._draft_s / d if d else 0.0, fixed=self.k)


class AdaptiveDraftLength(DraftLengthPolicy):
    """Chooses the block length per round from the measured costs (see the module docstring)."""

    def __init__(
        self,
        k_max: int = 8,
        k_start: int = 4,
        min_samples: int = 4,
        prior: AdaptiveDraftLength | None = None,
    ) -> None:
        self.k_max = k_max
        self.k = min(k_start, k_max)
        self.min_samples = min_samples
        # counts are floats: a warm start brings in a prior's counts weighted down
        self.tried = [0.0] * (k_max + 1)  # rounds that reached position i (index 1..k_max)
        self.passed = [0.0] * (k_max + 1)  # of those, rounds that accepted position i
        self.draft_tokens = 0.0
        self.draft_s = 0.0
        self.network_s = 0.0
        self.rounds = 0.0  # drafted rounds
        self.verify_obs: dict[int, list[float]] = {}  # block size m = k + 1 -> times
        self.emitted = 0.0  # tokens emitted by drafted rounds
        self.round_s = 0.0  # seconds of drafted rounds
        self.uses_confidence = False  # the drafter reports confidences: stop by them
        self.bin_tried = [0.0] * CONFIDENCE_BINS  # judged positions by confidence bin
        self.bin_passed = [0.0] * CONFIDENCE_BINS  # of those, accepted
        self.plain_rounds = 0  # rounds decoded without drafting
        self.since_draft = 0  # plain rounds since the last drafted one
        self.probe_every = PROBE_START
        self._plan: Plan | None = None  # replanned every PLAN_EVERY rounds or when the batch changes
        self._plan_age = 0
        self._plan_peers: tuple[int | None, ...] = ()
        self._probe_after = 0.0
        self.last_k: int | None = None  # the length chosen for the round under way (None: none yet)
        self.pending_start: int | None = None  # context its drafter has not seen (None: not known yet)
        self.start_s = 0.0  # drafter start time beyond a normal round's, summed over measured starts
        self.start_tokens = 0.0  # context tokens those starts prefilled
        self.observed = 0  # rounds observed without drafting (``observe``)
        if prior is not None:
            self._start_from(prior)

    def _start_from(self, prior: AdaptiveDraftLength) -> None:
        """Take a finished session's measurements as this one's, weighted down (see ``LengthMemory``)."""
        w = min(1.0, PRIOR_POSITIONS / max(sum(prior.bin_tried), sum(prior.tried), 1))
        self.bin_tried = [t * w for t in prior.bin_tried]
        self.bin_passed = [p * w for p in prior.bin_passed]
        n = min(len(prior.tried), self.k_max + 1)
        self.tried[:n] = [t * w for t in prior.tried[:n]]
        self.passed[:n] = [p * w for p in prior.passed[:n]]
        r = min(1.0, PRIOR_ROUNDS / max(prior.rounds, 1))
        self.draft_tokens, self.draft_s = prior.draft_tokens * r, prior.draft_s * r
        self.network_s, self.rounds = prior.network_s * r, prior.rounds * r
        self.emitted, self.round_s = prior.emitted * r, prior.round_s * r
        self.verify_obs = {m: v[-4:] for m, v in prior.verify_obs.items() if m <= self.k_max + 1}
        self.uses_confidence = prior.uses_confidence
        self.probe_every = prior.probe_every
        w_start = min(1.0, PRIOR_STARTS / max(prior.start_tokens, 1.0))
        self.start_s, self.start_tokens = prior.start_s * w_start, prior.start_tokens * w_start
        if not self.uses_confidence and self.verify_obs:
            self.k = self.best_length()

    @property
    def learning(self) -> bool:
        if self.observed >= self.min_samples and self.verify_obs:  # a free source, measured by observation
            return False
        return self.rounds < 2 or not self.draft_tokens

    # -- the choice --------------------------------------------------------------------------------------
    def next_length(self, load: Load | None = None) -> int:
        self.pending_start = load.start_tokens if load is not None else 0
        self.last_k = self._choose(load)
        if self.last_k > 0:
            self.pending_start = 0  # it catches up now
        return self.last_k

    def _choose(self, load: Load | None) -> int:
        if self.learning:  # nothing measured yet: draft to learn
            return self.k_max if self.uses_confidence else self.k
        peers = tuple(p.fixed for p in load.peers) if load else ()  # the batch's make-up
        if self._plan is None or self._plan_age >= PLAN_EVERY or peers != self._plan_peers:
            self._plan, self._plan_age, self._plan_peers = self.plan(load), 0, peers
            self._probe_after = self._probe_interval(load) if self._plan.k == 0 else 0.0
        self._plan_age += 1
        plan = self._plan
        if plan.k == 0:
            if self.since_draft >= self._probe_after:  # probe: has the text turned predictable?
                self.probe_every = min(2 * self.probe_every, PROBE_MAX)
                self._plan = None  # replan after the probe
                return min(PROBE_LENGTH, self.k_max)
            return 0
        # draft only on a clear win: a gain of a few percent is within the model's error, and drafting
        # sessions finish unevenly (the batch's last one can end later than without drafting); resuming after
        # plain rounds needs a little more, so noise does not flip a session between the two
        margin = DRAFT_MARGIN * (RESUME_MARGIN if self.since_draft else 1.0)
        if self._with_start(plan.rate, load) < margin * self._plain_plan(load).rate:
            return 0
        if self.since_draft:
            self.probe_every = PROBE_START
        # with confidences a lone session's block ends where the drafter is unsure (early_stop prices each
        # token); in a batch the plan's length also bounds the drafting phase every session waits for
        if self.uses_confidence and not (load is not None and load.peers):
            return self.k_max
        return plan.k

    def start_cost(self, load: Load | None) -> float:
        """Seconds the drafter needs to catch up with the context before drafting (0 until measured)."""
        if load is None or not load.start_tokens or self.start_tokens <= 0:
            return 0.0
        return load.start_tokens * self.start_s / self.start_tokens

    def begin(self, start_tokens: int) -> None:
        self.pending_start = start_tokens  # its peers price this start from the first round on

    def batch_start_cost(self, load: Load | None) -> float:
        """The drafter starts a drafting batch pays, per session: the mean over this session and its adaptive
        peers (a peer whose start is not known yet counts as this one's). Every session of the batch then
        prices the same starts, so they decide alike: pricing its own alone, the short prompts of a batch
        started drafting while the others did not, and made them wait for their drafts."""
        if load is None:
            return 0.0
        own = load.start_tokens
        tokens = [own] + [
            own if p.start_tokens is None else p.start_tokens for p in load.peers if p.fixed is None
        ]
        return self.start_cost(replace(load, start_tokens=round(sum(tokens) / len(tokens))))

    def _with_start(self, rate: float, load: Load | None) -> float:
        """A drafting plan's batch rate over the tokens left, once the drafters' starts are paid."""
        start = self.batch_start_cost(load)
        if start <= 0 or rate <= 0 or load is None or load.remaining is None:
            return rate
        left = max(load.remaining, 1)
        return left / (left / rate + start)

    def _probe_interval(self, load: Load | None) -> float:
        """Plain rounds before a probe: never, if not even a drafter that is always right would pay at
        these costs; else ``probe_every`` times the rows whose round a probe delays, and at least enough
        rounds that probes cost the batch under ``PROBE_BUDGET`` of its time."""
        sure = [1.0] * (self.k_max + 1)
        members = [(_gains(sure, self.k_max), self._t_draft(), None)] + self._members(load)[1:]
        t_net = self.network_s / self.rounds if self.rounds else 0.0
        plain = self._plan_depth(0, members, load, t_net)
        if (
            max(self._plan_depth(d, members, load, t_net).rate for d in range(1, self.k_max + 1))
            <= plain.rate
        ):
            return float("inf")
        lengths = [0] * len(members)
        base = self._round_cost(load, members, lengths, t_net)
        lengths[0] = PROBE_LENGTH
        extra = self._round_cost(load, members, lengths, t_net) - base + self.start_cost(load)
        rows = 1 + (len(load.peers) if load else 0)
        return max(self.probe_every * rows, extra / (PROBE_BUDGET * base))

    def early_stop(self, load: Load | None = None) -> EarlyStop | None:
        if not self.uses_confidence or self.learning or self.round_s <= 0:
            return None
        t_draft = self.draft_s / self.draft_tokens
        plan = self._plan
        if plan is not None and load is not None and load.forward_s is not None and load.peers:
            # the batch's rate; a drafted token's verify cost at the batch's size, its drafting step
            # shared by the sessions drafting
            slope = self._slope(load, plan.tokens)
            theta = plan.rate * (t_draft / max(plan.drafting, 1) + slope) / self.acceptance(0)
        else:
            rate = self.emitted / self.round_s
            theta = rate * (t_draft + self.verify_slope(load)) / self.acceptance(0)
        return EarlyStop(below=min(max(theta, 0.0), 0.95), acceptance=self.acceptance_by_confidence())

    def acceptance_by_confidence(self) -> tuple[float, ...]:
        """Measured acceptance per confidence bin, pulled toward the pooled rate where a bin is thin."""
        pooled, prior = self.acceptance(0), 2.0
        return tuple(
            (p + prior * pooled) / (t + prior) for p, t in zip(self.bin_passed, self.bin_tried, strict=True)
        )

    def peer(self) -> Peer:
        # a session decoding plainly counts as plain until it drafts again (its peers must not plan a
        # drafting phase it will not join: two sessions that drafted while fourteen decoded plainly made all
        # sixteen wait for their drafts); one that has not chosen yet, or drafts, counts as adaptive
        fixed = 0 if self.last_k == 0 else None
        t_draft = 0.0 if self.learning else self.draft_s / self.draft_tokens
        return Peer(
            acceptance=self.acceptance(0), t_draft=t_draft, fixed=fixed, start_tokens=self.pending_start
        )

    # -- planning the batch's round ----------------------------------------------------------------------
    def plan(self, load: Load | None = None) -> Plan:
        """The batch rate-maximising drafting depth and this session's length in it (module docstring)."""
        members = self._members(load)
        t_net = self.network_s / self.rounds if self.rounds else 0.0
        best = self._plan_depth(0, members, load, t_net)
        plain_cost = self._round_cost(load, members, _plain_lengths(members, self.k_max), 0.0)
        for depth in range(1, self.k_max + 1):
            candidate = self._plan_depth(depth, members, load, t_net, plain_cost)
            if candidate.rate > best.rate:
                best = candidate
        return best

    def _plain_plan(self, load: Load | None) -> Plan:
        return self._plan_depth(0, self._members(load), load, 0.0)

    def _members(self, load: Load | None) -> list[tuple[list[float], float, int | None]]:
        """(gains, t_draft, fixed length) of this session (first) and its peers; ``gains[j]`` is what the
        j-th drafted token adds to the expected tokens of a round (non-increasing)."""
        # per position, unless blocks end by confidence (then later positions are reached only when sure,
        # and their measured acceptance overstates what a longer cap would get)
        if self.uses_confidence:
            own = _gains(self.acceptance(0), self.k_max)
        else:
            own = _gains([self.acceptance(i) for i in range(self.k_max + 1)], self.k_max)
        t_own = self._t_draft()
        members: list[tuple[list[float], float, int | None]] = [(own, t_own, None)]
        for p in load.peers if load else ():
            members.append((_gains(p.acceptance, self.k_max), p.t_draft or t_own, p.fixed))
        return members

    def _t_draft(self) -> float:
        return self.draft_s / self.draft_tokens if self.draft_tokens else 0.0

    def _plan_depth(
        self, depth: int, members, load: Load | None, t_net: float, plain_cost: float | None = None
    ) -> Plan:
        """The batch's round when adaptive sessions draft at most ``depth`` tokens (rate 0 where an adaptive
        session would get fewer tokens per second than in a round of plain decoding, ``plain_cost``)."""
        fixed_len = [min(f, self.k_max) if f is not None else None for _, _, f in members]
        lengths = [f if f is not None else depth for f in fixed_len]
        rate = 0.0
        for _ in range(2):  # each adaptive session's length at the batch's marginal token price
            price = rate * self._slope(load, len(lengths) * (max(lengths) + 1))
            lengths = [
                f if f is not None else min(depth, sum(1 for g in gains if g > price))
                for (gains, _, _), f in zip(members, fixed_len)
            ]
            emitted = sum(1.0 + sum(gains[:k]) for (gains, _, _), k in zip(members, lengths))
            cost = self._round_cost(load, members, lengths, t_net)
            rate = emitted / cost
        drafting = sum(1 for k in lengths if k > 0)
        if plain_cost is not None:  # every adaptive session faster than decoding plainly, by a margin
            slowest = min(1.0 + sum(g[:k]) for (g, _, f), k in zip(members, lengths) if f is None)
            if slowest * plain_cost < FAIR_MARGIN * cost:
                rate = 0.0
        return Plan(lengths[0], depth, rate, float(len(lengths) * (max(lengths) + 1)), drafting)

    def _round_cost(self, load: Load | None, members, lengths: list[int], t_net: float) -> float:
        """One forward for every row, padded to the widest (rows of a forward are), plus the drafting phase
        of the longest block (the drafter batches the drafts)."""
        tokens = len(lengths) * (max(lengths) + 1)
        drafting = [k * t for (_, t, _), k in zip(members, lengths) if k > 0]
        if load is not None and load.forward_s is not None:
            forward = max(load.forward_s(tokens), 1e-6)
        else:
            forward = self.verify_cost(tokens)
        return forward + (max(drafting) + t_net if drafting else 0.0)

    def _slope(self, load: Load | None, tokens: float) -> float:
        """Seconds one more token adds to a forward of ``tokens`` tokens."""
        if load is not None and load.forward_s is not None:
            return max(load.forward_s(tokens + 1.0) - load.forward_s(tokens), 0.0)
        return self.verify_slope()

    def describe(self, load: Load | None = None) -> str:
        """The estimates behind the next choice (debug logs)."""
        if self.learning:
            return "learning"
        plan, plain = self.plan(load), self._plain_plan(load)
        return (
            f"plan k {plan.k} depth {plan.depth} ({plan.drafting} drafting) {plan.rate:.2f} tok/s vs plain "
            f"{plain.rate:.2f} (batch of {1 + (len(load.peers) if load else 0)}); acceptance "
            f"{self.acceptance(0):.2f}, t_draft {self._t_draft() * 1e3:.0f} ms, "
            f"net {self.network_s / self.rounds * 1e3:.0f} ms"
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
        obs = self.verify_obs.setdefault(k + 1, [])
        obs.append(verify_s)
        del obs[:-16]  # recent samples only
        if k == 0:  # a plain round: only its verify cost is news
            self.plain_rounds += 1
            self.since_draft += 1
            return
        self.since_draft = 0
        self.uses_confidence = len(confidences) == k
        for i, c in enumerate(confidences[: min(k, num_accepted + 1)]):  # positions the verifier judged
            b = confidence_bin(c)
            self.bin_tried[b] += 1
            self.bin_passed[b] += int(i < num_accepted)
        for i in range(1, min(k, num_accepted + 1) + 1):  # positions the verifier actually judged
            self.tried[i] += 1
            self.passed[i] += int(i <= num_accepted)
        if not costs_valid and start_tokens > 0 and self.draft_tokens and self.rounds:
            # what the round took beyond a normal drafted round of its length: the drafter's catching up
            normal = k * self._t_draft() + self.network_s / self.rounds
            self.start_s += max(draft_s + network_s - normal, 0.0)
            self.start_tokens += start_tokens
        if costs_valid or not self.rounds:
            self.emitted += num_accepted + 1
            self.round_s += verify_s + draft_s + network_s
            self.draft_tokens += k
            self.draft_s += draft_s
            self.network_s += network_s
            self.rounds += 1
        self.k = self.best_length()

    def observe(self, judged: int, num_accepted: int, block: int, verify_s: float) -> None:
        """A round that did not draft from this source, for a source whose drafting costs nothing (prompt
        lookup: its proposal is computed every round anyway). ``judged`` positions of what it would have
        proposed were checked against the committed tokens, the first ``num_accepted`` equal; the round
        verified ``block`` positions in ``verify_s`` (the same target cost its own blocks would pay). Once
        ``min_samples`` rounds are observed, the policy plans from them without drafting to learn."""
        for i in range(1, min(judged, self.k_max) + 1):
            self.tried[i] += 1
            self.passed[i] += int(i <= num_accepted)
        if block <= self.k_max + 1:
            obs = self.verify_obs.setdefault(block, [])
            obs.append(verify_s)
            del obs[:-16]
        self.observed += 1
        self._plan = None  # replan with it

    # -- the lone session's cost model -------------------------------------------------------------------
    def acceptance(self, i: int) -> float:
        """Acceptance of position ``i`` given its predecessors were accepted (0: pooled over positions)."""
        pooled = (sum(self.passed) + 1) / (sum(self.tried) + 2)
        if i == 0 or self.tried[i] < self.min_samples:
            return pooled
        return self.passed[i] / self.tried[i]

    def _verify_line(self) -> tuple[float, float, float]:
        """(mean block size, mean verify time, slope >= 0) of the least-squares line."""
        points = [(size, sum(v) / len(v)) for size, v in self.verify_obs.items()]
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        var = sum((p[0] - mx) ** 2 for p in points)
        slope = max(sum((p[0] - mx) * (p[1] - my) for p in points) / var, 0.0) if var > 0 else 0.0
        return mx, my, slope

    def verify_slope(self, load: Load | None = None) -> float:
        if load is not None and load.forward_s is not None:
            return self._slope(load, self.draft_tokens / self.rounds + 1.0 if self.rounds else 1.0)
        return self._verify_line()[2] if self.verify_obs else 0.0

    def verify_cost(self, m: float) -> float:
        if not self.verify_obs:
            return 1.0
        mx, my, slope = self._verify_line()
        return max(my + slope * (m - mx), 1e-6)

    def expected_rate(self, k: int, load: Load | None = None) -> float:
        """Tokens per second of a lone session drafting ``k`` tokens a round (k = 0: plain decoding)."""
        if k == 0:
            return 1.0 / self._round_cost(load, [(None, 0.0, None)], [0], 0.0)
        t_net = self.network_s / self.rounds if self.rounds else 0.0
        acceptance = [self.acceptance(i) for i in range(k + 1)]
        return expected_tokens(acceptance, k) / self._round_cost(
            load, [(None, self._t_draft(), None)], [k], t_net
        )

    def best_length(self, load: Load | None = None) -> int:
        """The lone session's k >= 1 of the best expected rate (exploring while the cost line is thin)."""
        if not self.verify_obs:
            return self.k
        drafted_sizes = [m for m in self.verify_obs if m > 1]
        if len(drafted_sizes) < 2 and (load is None or load.forward_s is None):
            # explore one step beyond the current k so the verify-cost line has a slope to fit
            return min(self.k + 1, self.k_max) if self.k < self.k_max else self.k - 1
        return max(range(1, self.k_max + 1), key=lambda k: self.expected_rate(k, load))


PRIOR_POSITIONS = 100  # a warm start counts as at most this many judged positions...
PRIOR_ROUNDS = 8  # ...and this many rounds of measured costs
PRIOR_STARTS = 2048  # ...and this many context tokens of measured drafter starts


class LengthMemory:
    """What the last finished adaptive session of each kind measured, for the next one to start from.

    ``key`` names what acceptance and costs depend on: the drafter and the sampling setting. Shared by
    the sessions of a process; thread-safe. A session that ends folds its policy in (it already carries
    the prior it started from, weighted down, so the memory fades old sessions out).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[Hashable, AdaptiveDraftLength] = {}

    def policy(self, key: Hashable, k_max: int = 8) -> AdaptiveDraftLength:
        with self._lock:
            return AdaptiveDraftLength(k_max=k_max, prior=self._last.get(key))

    def remember(self, key: Hashable, policy: DraftLengthPolicy) -> None:
        if isinstance(policy, AdaptiveDraftLength) and policy.rounds >= 1:
            with self._lock:
                self._last[key] = policy
