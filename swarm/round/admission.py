"""What a round leader accepts: each submission checked on its own, then the round's set as a whole.

On its own, a submission must be built on the leader's state, deliverable, well-formed (codec
validation, docs/wire-format.md) and cover exactly the slots of its sender's coordinator-signed role.
As a set (swarm/round/robust.py): all-zero contributions are refused, copies are found by overlapping
selected positions, and every tensor is clipped to the round's median norm. Then usefulness: a
leader with a probe (the coordinator) scores every contribution by what its share does to the loss
(swarm/round/usefulness.py) and refuses those that raise it, whatever their geometry; a leader
without one (a peer, while the coordinator is away) falls back on geometry (contributions pointing
away from the others are left out) and applies only work from peers with standing.

The ledger every node keeps from the coordinator's manifests as it applies them (`record`), so it
is part of what the swarm agreed on and survives the coordinator stepping away: strikes (a fault
marked in a rejection: malformed, free rider, copier, hurting the loss; each contribution scored as
useful forgives one, so an honest peer's rare bad round never adds up to a ban), bans after
STRIKES_BEFORE_BAN strikes that expire after BAN_ROUNDS rounds (the peer then starts over on
probation), absences, useful work: contributions the coordinator scored as lowering the loss, and
credit: those gains, decayed and capped, which a member may spend on a share that hurts. A
peer with fewer than the run's `probation_rounds` of useful work is on probation: its contributions
are scored and applied only if they help, and it neither leads, nor counts toward a peer-led
quorum, nor has its work applied in a round nobody scores. Votes follow measured work, not keys.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from swarm.codec import PayloadError, inline_digest
from swarm.log import get_logger
from swarm.modes.base import TrainingMode
from swarm.net.records import MAX_LEDGER_PEERS, Ledger, Manifest, ManifestEntry, Rejection, Role, Submission, role_key
from swarm.net.transfer import TransferError
from swarm.round.payloads import PayloadStore
from swarm.round.robust import (
    COPY_OVERLAP,
    TINY_FRACTION,
    Summary,
    alignments,
    clip_scales,
    copy_pairs,
    misaligned,
    overlap,
    sketch,
    summarise,
    tiny_totals,
)
from swarm.round.usefulness import HURT_SIGMAS, MAX_SCORED, Probe, coverage, helps, probe_seed, score_shares, shares
from swarm.round.world import World
from swarm.state import GlobalState

logger = get_logger(__name__)


def _first(counts: dict[str, int]) -> dict[str, int]:
    """Non-zero counts, at most MAX_LEDGER_PEERS of them (by peer id), for the ledger record."""
    return dict(sorted((p, n) for p, n in counts.items() if n > 0)[:MAX_LEDGER_PEERS])


STRIKES_BEFORE_BAN = 3
# Credit: a peer's measured gains (fractions of the probe loss its applied shares removed), kept as
# a decaying sum (about the last twenty scored rounds) and capped, that it may spend on a share that
# raises the loss. Honest work sometimes does, on the leader's batch (non-IID shards, an annealed
# lr: 0.2-0.6% of the loss on `nano`); a peer can never hurt more than it helped, a round must still
# lower the loss as a whole, and a share hurting by more than MAX_PAID_HARM is refused whatever.
CREDIT_DECAY = 0.95
CREDIT_CAP = 0.02
MAX_PAID_HARM = 0.01
BAN_ROUNDS = 20  # rounds a ban lasts; then the peer starts over, on probation, with no strikes
USEFUL_CAP = 1 << 20
NOT_DELIVERED = "payload not delivered"
ABSENT_ROUNDS = 2  # rounds a peer delivered nothing in time before leaders stop waiting for it
SHORT_FETCH_S = 10.0  # fetch deadline for the payload of a peer that is not waited for


@dataclass
class Verdict:
    reason: str | None = None  # None: accepted
    fault: bool = False  # the sender's fault (a strike), rather than bad luck
    summary: Summary | None = None


@dataclass
class Validator:
    node: World
    store: PayloadStore
    mode: TrainingMode
    probe: Probe | None = None  # scores contributions by loss (the coordinator's; None: geometry only)
    strikes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    absent: dict[str, int] = field(default_factory=dict)  # consecutive applied rounds a peer was missing
    useful: dict[str, int] = field(default_factory=dict)  # contributions the coordinator scored as helping
    banned_until: dict[str, int] = field(default_factory=dict)  # round from which a banned peer starts over
    credit: dict[str, float] = field(default_factory=dict)  # measured gains it may spend (CREDIT_DECAY)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(16), repr=False)  # seeds the probe's batches
    counted_to: int = 0  # manifests of rounds below this are in the ledger
    _probation_of: object = field(default=None, repr=False, compare=False)
    _probation: int = field(default=0, repr=False, compare=False)

    def ledger(self) -> Ledger:
        """The counts as a record (useful work capped at the probation: all that decides standing)."""
        cap = max(self.probation_rounds, 1)
        busiest = sorted(self.useful, key=lambda p: (-self.useful[p], p))[:MAX_LEDGER_PEERS]
        return Ledger(
            round=self.counted_to,
            useful={p: min(self.useful[p], cap) for p in sorted(busiest)},
            strikes=_first(self.strikes),
            banned_until=_first(self.banned_until),
            absent=_first(self.absent),
            credit=dict(sorted((p, c) for p, c in self.credit.items() if c > 0)[:MAX_LEDGER_PEERS]),
        )

    def adopt(self, ledger: Ledger) -> bool:
        """Take the coordinator's counts if they are ahead of ours (a joiner, a reload, a restart)."""
        if ledger.round <= self.counted_to:
            return False
        self.useful, self.banned_until, self.absent = dict(ledger.useful), dict(ledger.banned_until), dict(ledger.absent)
        self.credit = dict(ledger.credit)
        self.strikes = defaultdict(int, ledger.strikes)
        self.counted_to = ledger.round
        return True

    @property
    def probation_rounds(self) -> int:
        """Useful contributions a newcomer must show; 0 when the mode's work is not scored."""
        run = self.node.run
        if run is not self._probation_of:  # read once per run description, not on every member's look
            self._probation_of, self._probation = run, run.admission.probation_rounds if self.mode.scored else 0
        return self._probation

    def banned(self, peer_id: str) -> bool:
        return peer_id in self.banned_until

    def standing(self, peer_id: str) -> bool:
        """Past probation: its votes, leadership and unscored work count. (Asked for every member on
        every look at a round: the unbanned, no-probation case answers without the run's settings.)"""
        return peer_id not in self.banned_until and (self.useful.get(peer_id, 0) >= self.probation_rounds)

    def with_standing(self, peers: Iterable[str]) -> set[str]:
        """`standing` of many peers at once (every look at a round asks it of every member)."""
        banned, useful, need = self.banned_until, self.useful, self.probation_rounds
        return {p for p in peers if p not in banned and useful.get(p, 0) >= need}

    def waited_for(self, peer_id: str) -> bool:
        """Whether a leader waits for this peer's submission: not after it said it was training and
        delivered nothing in time for ABSENT_ROUNDS rounds in a row (a free delay costs at most that)."""
        return self.absent.get(peer_id, 0) < ABSENT_ROUNDS

    def fetch_deadline(self, peer_id: str) -> float:
        round_s = self.node.run.round_timeout_s
        return round_s if self.waited_for(peer_id) else min(SHORT_FETCH_S, round_s)

    async def validate(
        self, state: GlobalState, subs: dict[str, Submission], seen: dict[str, int]
    ) -> tuple[list[ManifestEntry], list[Rejection], dict[str, float]]:
        """Entries (sorted by peer, with clip factors), rejections and scores of the round on
        `state`. `seen`: the poll in which the leader first saw each submission (who came first
        when two are copies)."""
        round_no, base_hash = state.round, state.hash
        verdicts = dict(zip(subs, await asyncio.gather(*(self.check(round_no, base_hash, s) for s in subs.values()))))
        roles = await self._roles(verdicts)
        self._refuse_incomplete(verdicts, roles)
        together = self.mode.scored_together({p: r for p, r in roles.items() if verdicts[p].reason is None})
        self._refuse_zeros(verdicts, together, self.standing)
        scores: dict[str, float] = {}
        if self.probe is not None and not self.mode.inline_payload:  # hurting work is out before copies are sought
            scores = await self._refuse_useless(state, verdicts, together)
            self._refuse_copies(verdicts, seen)
        else:
            self._refuse_copies(verdicts, seen)
            self._refuse_misaligned(verdicts)
            self._refuse_unproven(verdicts)
        self._refuse_incomplete(verdicts, roles)  # a refusal above may have broken a group
        accepted = sorted(p for p, v in verdicts.items() if v.reason is None)
        # Credit only for work applied: a copy scores like what it copied, and must earn nothing.
        scores = {p: value if p in accepted else min(value, 0.0) for p, value in scores.items()}
        scales = clip_scales([s for p in accepted if (s := verdicts[p].summary) is not None])
        if self.mode.inline_payload:  # no tensors, nothing to clip: the mode bounds its own values on apply
            entries = [ManifestEntry(p, subs[p].digest, subs[p].size, inline=subs[p].inline) for p in accepted]
        else:
            entries = [ManifestEntry(p, subs[p].digest, subs[p].size, scales=s) for p, s in zip(accepted, scales)]
        rejected = []
        for peer, verdict in sorted(verdicts.items()):
            if verdict.reason is not None:
                rejected.append(Rejection(peer, verdict.reason, verdict.fault))
                self.node.log_event("reject", f"round {round_no}: payload from {peer[-8:]} rejected: {verdict.reason}")
        return entries, rejected, scores

    async def _refuse_useless(
        self, state: GlobalState, verdicts: dict[str, Verdict], together: Sequence[Sequence[str]] = ()
    ) -> dict[str, float]:
        """Score each valid contribution's share of the round on the probe; refuse (and strike) the
        ones that raise the loss, and a newcomer's that does not lower it (no strike).

        `together`: contributions scored as one (the mode's `scored_together`: a pipeline group's
        stages, each a part of one replica's update, whose parts alone say little). Their summed
        share is judged as one contribution would be: a newcomer stage passes probation when its
        group's update lowers the loss, each member is credited an equal part of the gain, and when
        the group's share hurts, only the members whose own share hurts are struck (the others sit
        the round out with it)."""
        assert self.probe is not None
        peers = sorted(p for p, v in verdicts.items() if v.reason is None and v.summary is not None)
        if not peers:
            return {}
        seed = probe_seed(self.secret, state.round, state.hash)
        units = _units(peers, together)
        chosen = self._sample(units, seed)
        if unscored := set(peers) - {p for unit in chosen for p in unit}:  # judged by geometry this round; newcomers wait
            for peer in sorted(unscored):
                if not self.standing(peer):
                    verdicts[peer].reason = "on probation: not among the contributions scored this round"
            self._refuse_misaligned(verdicts, only=unscored)
        summaries = {p: s for p in peers if (s := verdicts[p].summary) is not None}
        scales = dict(zip(summaries, clip_scales(list(summaries.values()))))
        outer_lr = self.node.run.outer_at(state.round).outer_lr
        cover = coverage(list(summaries.values()))  # every contribution's share is of the whole round
        members = [p for unit in chosen for p in unit]
        each = shares([summaries[p] for p in members], [scales[p] for p in members], dict(self.store.shapes), outer_lr, cover)
        found = await asyncio.to_thread(score_shares, self.probe, state, _summed(each, chosen), seed)
        scores = {}
        hurting = []
        for unit, result in zip(chosen, found):
            # Recorded: the gain when it clearly helped (useful work, credit) or hurt (a strike, or
            # debited from the credit that paid for it); within the noise, 0: nobody's doing.
            # A newcomer must prove its work helps: one that clearly lowers nothing but raises the
            # loss, however little (noise at an honest size does), is struck as well as refused.
            standing = all(self.standing(p) for p in unit)
            hurts = result.hurts or (not standing and result.gain < -HURT_SIGMAS * result.error)
            for peer in unit:
                scores[peer] = (result.gain if result.helps or hurts else 0.0) / len(unit)
            if hurts:
                hurting.append((-result.gain, unit, result))
            elif not standing and not result.helps:
                whose = "its pipeline group's update" if len(unit) > 1 else "it"
                for peer in unit:
                    verdicts[peer].reason = (
                        f"on probation: {whose} did not clearly lower the loss on the leader's data "
                        f"({100 * result.gain:+.3f}% ± {100 * result.error:.3f}%)"
                    )
        # The round's measured gain without the hurting shares (the kept shares' gains, within the
        # noise or not): what the harm paid for in it may not exceed.
        hurt = {unit for _, unit, _ in hurting}
        net = sum(result.gain for u, result in zip(chosen, found) if u not in hurt and verdicts[u[0]].reason is None)
        for harm, unit, result in sorted(hurting):
            standing = all(self.standing(p) for p in unit)
            credit = len(unit) * min(self.credit.get(p, 0.0) for p in unit)  # each member pays its part
            if standing and harm <= min(credit, MAX_PAID_HARM) and harm <= net:
                net -= harm  # applied: it spends its credit (record() debits it from the manifest's score)
                self.node.log_event(
                    "credit",
                    f"round {state.round}: {', '.join(p[-8:] for p in unit)}'s share raises the loss by {100 * harm:.2f}%: applied on its credit",
                )
                continue
            measured = f"raises the loss on the leader's data by {100 * harm:.2f}% (± {100 * result.error:.2f}%)"
            if standing and credit > 0 and harm <= MAX_PAID_HARM:
                # Deferred: a member with credit, whose harm it (or the round) cannot cover. No
                # strike; its credit is spent (record()) and its Δ returns to its error buffer.
                for peer in unit:
                    left = 100 * self.credit.get(peer, 0.0)
                    verdicts[peer].reason = f"deferred: {measured}, more than its credit ({left:.2f}%) or the round's gain covers"
                continue
            blamed = set(unit) if len(unit) == 1 else await self._blame(state, unit, summaries, scales, outer_lr, cover, seed)
            for peer in unit:
                if peer in blamed:
                    verdicts[peer].reason, verdicts[peer].fault = measured, True
                else:  # an honest stage of a group whose update hurt: out with it, not struck
                    verdicts[peer].reason = f"its pipeline group's update {measured}"
                    scores[peer] = 0.0
        return scores

    async def _blame(
        self,
        state: GlobalState,
        unit: tuple[str, ...],
        summaries: dict[str, Summary],
        scales: dict[str, dict[str, float]],
        outer_lr: float,
        cover: dict[str, int],
        seed: int,
    ) -> set[str]:
        """Of a unit whose summed share hurts, the members whose own share hurts (scored alone)."""
        assert self.probe is not None
        each = shares([summaries[p] for p in unit], [scales[p] for p in unit], dict(self.store.shapes), outer_lr, cover)
        found = await asyncio.to_thread(score_shares, self.probe, state, each, seed)
        return {p for p, r in zip(unit, found) if r.hurts or r.gain < -HURT_SIGMAS * r.error}

    def _sample(self, units: list[tuple[str, ...]], seed: int) -> list[tuple[str, ...]]:
        """The contributions (units scored as one) scored this round: all, or MAX_SCORED drawn with
        the secret seed, newcomers first (sorted)."""
        if len(units) <= MAX_SCORED:
            return units
        rng = random.Random(seed)
        newcomers = [u for u in units if not all(self.standing(p) for p in u)]
        members = [u for u in units if all(self.standing(p) for p in u)]
        rng.shuffle(newcomers)
        rng.shuffle(members)
        return sorted((newcomers + members)[:MAX_SCORED])

    def _refuse_unproven(self, verdicts: dict[str, Verdict]) -> None:
        """Nobody scores this round: work from peers without standing is not applied (no strike)."""
        for peer, verdict in verdicts.items():
            if verdict.reason is None and not self.standing(peer):
                verdict.reason = "on probation: its work counts only in rounds the coordinator scores"

    async def check(self, round_no: int, base_hash: str, sub: Submission) -> Verdict:
        """One submission on its own."""
        if sub.base_hash != base_hash:
            return Verdict("computed against other weights (stale or diverged)")
        if self.mode.inline_payload:
            return self._check_inline(sub)
        deadline = self.fetch_deadline(sub.peer_id)
        try:
            data = await asyncio.wait_for(self.store.get(sub.digest, [sub.peer_id]), deadline)
        except asyncio.TimeoutError:  # served too slowly: it costs the round at most the deadline
            return Verdict(f"{NOT_DELIVERED} within {deadline:.0f} s")
        except TransferError as e:  # the sender is gone or unreachable: absent, not at fault
            return Verdict(f"{NOT_DELIVERED}: {e}")
        try:
            tensors = await asyncio.to_thread(self.store.decode, data, sender=sub.peer_id, round_no=round_no)
        except PayloadError as e:
            return Verdict(f"malformed payload: {e.reason}", fault=True)
        except Exception as e:  # the codec must not crash the leader on hostile bytes, whatever it raises
            logger.exception("unexpected error validating the payload of %s", sub.peer_id[-8:])
            return Verdict(f"malformed payload: {type(e).__name__}", fault=True)
        wanted = await self.slots_of(sub.peer_id)
        if set(tensors) != wanted:  # no strike: the coordinator may have changed the role mid-round
            extra = len(set(tensors) - wanted)
            return Verdict(f"payload does not cover its role's slots ({len(wanted - set(tensors))} missing, {extra} not its own)")
        sparse = self.node.run.outer.codec == "sparseloco"
        return Verdict(summary=await asyncio.to_thread(summarise, tensors, sparse))

    def _check_inline(self, sub: Submission) -> Verdict:
        """A payload carried in the signed record: its digest and size must name it, the mode's check pass."""
        problem = self.inline_problem(sub.inline, sub.digest, sub.size)
        return Verdict(problem, fault=True) if problem else Verdict()

    def inline_problem(self, data: bytes, digest: str, size: int) -> str | None:
        """What is wrong with an inline payload as a submission or manifest entry names it (None: fine)."""
        if not data:
            return "no inline payload"
        if size != len(data) or digest != inline_digest(data):
            return "inline payload does not match its digest or size"
        problem = self.mode.check_inline(data)
        return f"malformed payload: {problem}" if problem else None

    async def role_of(self, peer_id: str) -> Role:
        """A peer's coordinator-signed role (the mode's default role if none)."""
        run = self.node.run
        item = await self.node.dht.get_from(role_key(run.run_id, peer_id), Role, run.coordinator)
        return item.record if item is not None and item.record.peer_id == peer_id else self.mode.default_role(peer_id, 0)

    async def slots_of(self, peer_id: str) -> set[str]:
        """The tensors a peer's coordinator-signed role contributes (the mode's default role if none)."""
        return set(self.mode.contribution_names(await self.role_of(peer_id), sorted(self.store.shapes)))

    async def _roles(self, verdicts: dict[str, Verdict]) -> dict[str, Role]:
        """The signed roles of the round's well-formed contributions."""
        valid = sorted(p for p, v in verdicts.items() if v.reason is None)
        return dict(zip(valid, await asyncio.gather(*(self.role_of(p) for p in valid))))

    def _refuse_incomplete(self, verdicts: dict[str, Verdict], roles: dict[str, Role]) -> None:
        """Contributions that only count together (a pipeline group's stages) sit out together; no strike."""
        accepted = {p: r for p, r in roles.items() if verdicts[p].reason is None}
        for peer, reason in self.mode.incomplete_contributions(accepted).items():
            verdicts[peer].reason = reason

    @staticmethod
    def _refuse_zeros(
        verdicts: dict[str, Verdict],
        together: Sequence[Sequence[str]] = (),
        standing: Callable[[str], bool] = lambda peer: True,
    ) -> None:
        """All-zero contributions, and near-zero ones beside the others (they would dilute the mean).
        Contributions judged `together` (a pipeline group's stages) are sized together: a stage
        that has just joined sends a first update far smaller than its partners', whose error
        buffers have built up (a tenth of the round's median, and it cost its group the round).
        A near-zero contribution is struck only from a peer with `standing`: a newcomer's first
        SparseLoCo payload, its error buffer empty, falls under the cut too (honest work), and
        probation keeps a newcomer's work out until it has measurably helped anyway."""
        for verdict in verdicts.values():
            if verdict.summary is not None and verdict.summary.is_zero:
                verdict.reason, verdict.fault = "all-zero update (contributes nothing)", True
        peers = sorted(p for p, v in verdicts.items() if v.reason is None and v.summary is not None)
        units = _units(peers, together)
        sizes = [sum(n * n for p in unit if (s := verdicts[p].summary) is not None for n in s.norms.values()) for unit in units]
        for unit, small in zip(units, tiny_totals([math.sqrt(s) for s in sizes])):
            for peer in unit if small else ():
                verdicts[peer].reason = f"update under {TINY_FRACTION:g} × the round's median size (contributes next to nothing)"
                verdicts[peer].fault = all(standing(p) for p in unit)

    @staticmethod
    def _refuse_misaligned(verdicts: dict[str, Verdict], only: set[str] | None = None) -> None:
        """Leave out contributions that, clipped, point away from the sum of the others; then, until
        none is left, the one pointing most against it (cosine < 0): every follower checks that of a
        peer-led manifest (`against_the_rest`), since nobody scored its round."""
        peers = sorted(p for p, v in verdicts.items() if v.reason is None and v.summary is not None)
        summaries = [s for p in peers if (s := verdicts[p].summary) is not None]
        scores = alignments(summaries, clip_scales(summaries))
        for peer, score, bad in zip(peers, scores, misaligned(scores)):
            if bad and (only is None or peer in only):  # pointing against the others is a fault; unaligned may be bad luck
                verdicts[peer].reason = f"points away from the other contributions (cosine {score:.3f})"
                verdicts[peer].fault = score < 0
        while True:
            peers = sorted(p for p, v in verdicts.items() if v.reason is None and v.summary is not None)
            summaries = [s for p in peers if (s := verdicts[p].summary) is not None]
            scores = alignments(summaries, clip_scales(summaries)) if len(summaries) >= 2 else []
            against = [i for i, score in enumerate(scores) if score < 0 and (only is None or peers[i] in only)]
            if not against:
                return
            worst = min(against, key=lambda i: (scores[i], peers[i]))  # the worst first: without it, the others may agree
            verdicts[peers[worst]].reason = f"points against the other contributions (cosine {scores[worst]:.3f})"

    @staticmethod
    def _refuse_copies(verdicts: dict[str, Verdict], seen: dict[str, int]) -> None:
        """Of two contributions selecting mostly the same positions, the one seen later is a copy;
        seen in the same poll, neither can be told from the other and both sit the round out. (A
        tie is not broken by standing: a copier that got copies applied earlier would have some.)"""
        valid = sorted((p for p, v in verdicts.items() if v.reason is None), key=lambda p: (seen.get(p, 0), p))
        summarised = [(p, s) for p in valid if (s := verdicts[p].summary) is not None]
        for i, j in copy_pairs([sketch(s) for _, s in summarised]):  # in order: first by when it was seen
            (first, a_summary), (later, b_summary) = summarised[i], summarised[j]
            if overlap(a_summary, b_summary) < COPY_OVERLAP:
                continue
            a, b = verdicts[first], verdicts[later]
            if seen.get(first, 0) == seen.get(later, 0):
                a.reason = b.reason = "two payloads select the same positions; both sit this round out"
            elif b.reason is None:
                b.reason, b.fault = f"copies the payload of {first[-8:]} (selected positions overlap)", True

    def record(self, manifest: Manifest) -> None:
        """The ledger of an applied manifest: only the coordinator's count. Every node applies the
        same manifests, so every node holds the same ledger and whoever leads next keeps it. A peer
        that leads cannot strike, credit or mark absent anyone for the others: it could frame honest
        peers, promote its friends, or shrink the quorum by calling the others missing."""
        if manifest.leader != self.node.run.coordinator or manifest.round < self.counted_to:
            return  # a peer's manifest, or one the adopted ledger already counts
        self.counted_to = manifest.round + 1
        for peer in {e.peer_id for e in manifest.entries} | {r.peer_id for r in manifest.rejected}:
            if peer not in manifest.missing:
                self.absent.pop(peer, None)
        for peer in manifest.missing:
            self.absent[peer] = self.absent.get(peer, 0) + 1
        applied = {e.peer_id for e in manifest.entries}
        struck = {r.peer_id for r in manifest.rejected if r.fault}
        for peer, value in sorted(manifest.scores.items()):
            if peer in applied:  # the same float operations in the same order on every node
                self.credit[peer] = min(max(CREDIT_DECAY * self.credit.get(peer, 0.0) + value, 0.0), CREDIT_CAP)
            elif value < 0 and peer not in struck:  # deferred: it hurt, without a strike, once per credit
                self.credit.pop(peer, None)
            if helps(value) and peer in applied and not self.banned(peer):
                self.useful[peer] = min(self.useful.get(peer, 0) + 1, USEFUL_CAP)
                if self.strikes.get(peer, 0) > 0:  # useful work forgives a strike: honest bad luck never adds up to a ban
                    self.strikes[peer] -= 1
        for rejection in manifest.rejected:
            if rejection.fault and not self.banned(rejection.peer_id):
                self.strikes[rejection.peer_id] += 1
                if self.strikes[rejection.peer_id] >= STRIKES_BEFORE_BAN:
                    self.banned_until[rejection.peer_id] = manifest.round + 1 + BAN_ROUNDS
                    self.node.log_event(
                        "ban",
                        f"{rejection.peer_id[-8:]} made {STRIKES_BEFORE_BAN} faulty submissions: ignored for {BAN_ROUNDS} rounds",
                    )
        for peer, until in list(self.banned_until.items()):
            if until <= manifest.round + 1:  # served: it starts over, on probation
                del self.banned_until[peer]
                self.strikes.pop(peer, None)
                self.useful.pop(peer, None)
                self.credit.pop(peer, None)
                self.node.log_event("ban", f"{peer[-8:]}'s ban expired: on probation again")


def _units(peers: list[str], together: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    """The round's contributions as scoring units: each group of `together` whose members are all
    among `peers`, and every other peer alone; sorted."""
    present = set(peers)
    units = [tuple(sorted(g)) for g in together if g and set(g) <= present]
    placed = {p for unit in units for p in unit}
    return sorted(units + [(p,) for p in peers if p not in placed])


def _summed(each: Iterator[dict[str, torch.Tensor]], units: list[tuple[str, ...]]) -> Iterator[dict[str, torch.Tensor]]:
    """Each unit's share: its members' shares (`each`, in the units' order) added up."""
    for unit in units:
        total: dict[str, torch.Tensor] = {}
        for _ in unit:
            for name, t in next(each).items():
                total[name] = total[name] + t if name in total else t
        yield total
