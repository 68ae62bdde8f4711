"""How a round closes: who leads, which payloads are in, and how everyone applies them.

Who may lead and which manifest counts is leadership.py (the coordinator while it is live, admitted
peers by a per-round ranking when it is away or silent). The leader waits until every live replica of the round has submitted, or until
round_timeout_s after the first submission, fetches and validates each payload, and publishes a
signed manifest listing the accepted ones sorted by peer id. Everyone applies exactly the
manifest's payloads in that order, so replicas stay bit-identical. A manifest names the state hash
it applies to; a node holding another hash has diverged and reloads (see peer.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from swarm.codec import slot_aggregator
from swarm.log import get_logger
from swarm.modes.base import TrainingMode
from swarm.net.dht import Signed
from swarm.net.records import (
    Endorsement,
    Heartbeat,
    Ledger,
    Manifest,
    ManifestEntry,
    Role,
    Submission,
    endorse_key,
    manifest_key,
    role_key,
    run_key,
    submit_key,
)
from swarm.net.schema import encode_record
from swarm.net.transfer import TransferError
from swarm.round.admission import NOT_DELIVERED, Validator
from swarm.round.evidence import EquivocationWitness, proof_ok, sign_manifest
from swarm.round.leadership import agreed_hash, canonical_manifest, coordinator_present, lead_place, peer_quorum, should_lead
from swarm.round.payloads import AGGREGATE_PARTS, Encoded, PayloadStore, Unavailable, tensor_groups
from swarm.round.robust import (
    Summary,
    against_the_rest,
    check_clipping,
    check_scales,
    check_update,
    clipped_norms,
    summarise,
)
from swarm.round.usefulness import Probe
from swarm.round.world import World, monotonic, put_surely
from swarm.run import RunConfig
from swarm.state import GlobalState, PartialStateError, StateError, parse_index, save_state

T = TypeVar("T")
logger = get_logger(__name__)
MANIFEST_TTL_S = 6 * 3600
LEDGER_TTL_S = 7 * 24 * 3600.0
# A peer-led manifest is endorsed only once it has been in view this long and is still the best-ranked
# (records' travel time: a better-ranked leader's manifest of the same moment shows up meanwhile).
SETTLE_S = 2.0
LEADER_PACE_RANKS = 3  # while peers may lead, how many of the best-ranked look at a leader's pace
FOLLOWER_LOOKS_PER_S = 250.0  # the swarm's followers' looks a second, in all, once it has more members
FOLLOWER_LOOKS_PER_VIEW = 8  # beyond that size, a follower's full looks per view timeout while the coordinator leads
# Manifest proof checks, shared by every node of this process: a check is a pure function of the
# record, its owner and its signer, and the simulator runs a thousand nodes reading the same records
# (each encoding an R-entry manifest twice to check it was most of a 1,000-peer round).
_PROOFS_OK: dict[tuple[str, str], bool] = {}  # (signer, sha256 of the manifest) -> proof ok
_CHECKED: dict[int, tuple[Manifest, str, bool, str]] = {}  # id(record) -> (record, signer, proof ok, digest)


RELAY_FANOUT = 4  # members a member relays a round's aggregate to (at most: others may ask it too)
# How long a member asks one ancestor in a relay tree for a part of the aggregate before it asks the
# next one up (`_fetch_part`): an ancestor may not have seen the manifest yet, or may be waiting for
# its own copy, and a part of a 1B-size aggregate takes about a minute to cross a 10 Mbit/s uplink
# to four children.
RELAY_PATIENCE_S = 120.0
RELAY_HOP_S = 60.0  # and our parent this much more for each hop between it and the coordinator
RELAY_START_S = 20.0  # an ancestor may not have seen the manifest yet (records' travel, a follower's looks)
# Up to this many members (one root and its children: a tree of one level), a member asks its
# parent and then the coordinator at once: the coordinator's uplink serves at most this many copies,
# and one that goes away right after publishing leaves fewer members without the aggregate (the
# simulator's sweep, seed 35: the coordinator and a root gone within 0.2 s of the manifest, the
# root's payload with it, so that no member could get or rebuild two of the parts).
RELAY_FLAT_UPTO = RELAY_FANOUT + 1


class _Rebuild(Exception):
    """No holder serves a part of the aggregate: rebuild it from the round's payloads."""


def _relay_ranked(key: str, members: set[str]) -> list[str]:
    """Members in their order in one relay tree: by sha256 of the tree's key and their id."""
    ranks = _relay_ranks(key)
    for p in members - ranks.keys():
        ranks[p] = hashlib.sha256(f"{key}:{p}".encode()).digest()
    return sorted(members, key=ranks.__getitem__)


@functools.lru_cache(maxsize=64)
def _relay_ranks(key: str) -> dict[str, bytes]:
    """Members' places in one relay tree, kept for the process: every node of a simulated swarm
    ranks the same members for each of a round's parts."""
    return {}


def _cpu_timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """fn(*args) and the CPU seconds this thread spent in it (torch runs its ops in the calling
    thread when it has one thread: that is the work's time on a core of its own)."""
    start = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - start


class Diverged(RuntimeError):
    """Our global weights are not the ones the swarm's manifest was computed against."""


class BadManifest(RuntimeError):
    """A manifest on our state that lists a payload nobody can deliver or that does not decode."""


@dataclass
class RoundAgreement:
    """Leads or follows rounds for one node. `state` is the node's θ(r), guarded by `lock`."""

    node: World
    store: PayloadStore
    state: GlobalState
    mode: TrainingMode
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    poll_s: float = 0.25  # how often a node that may lead the round reads the records
    # How often a node that cannot lead it (a peer while the coordinator leads) looks for its
    # manifest: up to this much later to apply, for a quarter of the reads of the round's records
    # and of every member's heartbeat (what a node reads per look grows with the swarm).
    follow_s: float = 1.0
    ignored: set[tuple[int, str]] = field(default_factory=set)  # (round, leader) of bad manifests
    coverage: dict[str, int] = field(default_factory=dict)  # slot group -> contributions, last round applied
    apply_s: float = 0.0  # seconds the last round took to decode and apply (SPSA: its replay cost)
    apply_cpu_s: float = 0.0  # CPU time of that work: what it takes on a core of its own
    validate_s: float = 0.0  # seconds the last round we led took to check its submissions (fetch included)
    validate_cpu_s: float = 0.0  # this process's CPU time meanwhile (the checks, not the fetches' waiting)
    probe: Probe | None = None  # scores contributions by loss when we lead (the coordinator's)

    def __post_init__(self) -> None:
        self.validator = Validator(self.node, self.store, self.mode, probe=self.probe)
        self.witness = EquivocationWitness()
        self._proofs_ok = _PROOFS_OK
        self._senders: tuple[Manifest, list[str], dict[str, int]] | None = None  # _other_senders' last manifest
        self._checked = _CHECKED
        self._led = -1  # the last round we published a manifest of as a peer (we wait for its endorsements)
        self._read_manifests: tuple[int, frozenset[tuple[str, bytes]]] | None = None  # the last look's, for `_follow`
        self._endorsed: dict[int, str] = {}  # round -> the peer-led manifest we endorsed (one per round, for good)
        self._in_view_since: dict[tuple[int, str], float] = {}  # (round, manifest digest) -> first seen
        self._endorsements_seen: dict[tuple[int, str], str] = {}  # (round, endorser) -> the digest it endorsed
        self._two_faced: set[tuple[int, str]] = set()  # (round, endorser) seen endorsing two manifests
        self._partial: set[str] = set()  # live peers whose heartbeat says they hold part of the state
        # The last manifest fetched and checked: with its base state, mean, coverage, CPU and wall seconds (`verify`).
        self._verified: tuple[Manifest, str, dict[str, torch.Tensor] | None, dict[str, int], float, float] | None = None
        # The last round applied through an aggregate and what it applied (its senders return what
        # the aggregate dropped to their error buffers: PayloadEncoder.returned).
        self._last_aggregate: tuple[int, dict[str, torch.Tensor]] | None = None
        self._aggregate_coverage: tuple[int, dict[str, int]] = (-1, {})
        self._admitted: set[str] = set()  # left the roster since, but the coordinator's role for them stands
        self._overruled = -1  # a round the coordinator leads although most trainers said they were past it
        self._disbelieved: set[str] = set()  # trainers that said so then: their word no longer counts
        # Just (re)started into a running swarm: in its first round the coordinator takes a peer-led
        # manifest that is already out (peers led while it was away; followers may have applied it).
        self.returning = True

    @property
    def run(self) -> RunConfig:
        return self.node.run

    # ----- following -------------------------------------------------------------------------

    async def find_manifest(
        self, round_no: int, agreed: str | None = None, *, peers_may_lead: bool = True, quorum: int = 0, past: bool = False
    ) -> Manifest | None:
        """The canonical manifest of a round, if one has been published (see leadership.py); a
        peer-led one once a strict majority of the members with standing endorse it (`_consented`;
        `past`: the swarm settled the round already, so most of those who endorsed any will do)."""
        found = await self.node.dht.get_all(manifest_key(self.run.run_id, round_no), Manifest)
        found = [m for m in found if self._signed_by_leader(m)]
        for m in found:
            self.witness.saw(round_no, m, self.node)
        await self.witness.read(self.node)
        await self.witness.publish(self.node)
        found = self._weighable(round_no, found)
        members = await self.node.members()
        self._read_manifests = (round_no, self._versions(found, members))
        for signer in {m.signer for m in found} - members:  # a leader that has left since (a node replaying old rounds)
            if await self._was_admitted(signer):
                members = members | {signer}
        rules: dict[str, Any] = {"agreed": agreed, "members": members, "peers_may_lead": peers_may_lead, "quorum": quorum}
        best = canonical_manifest(found, round_no, self.run.coordinator, standing=self.validator.standing, **rules)
        if best is None or best.leader == self.run.coordinator:
            return best
        return await self._consented(round_no, found, best, members, past, rules)

    async def _consented(
        self, round_no: int, found: list[Signed[Manifest]], best: Manifest, members: set[str], past: bool, rules: dict[str, Any]
    ) -> Manifest | None:
        """The peer-led manifest a strict majority of the members with standing endorsed, if any.

        A leader's manifest listing a majority of payloads is not consent: a peer cut off from the
        rest, holding every submission from before the cut, closed the round alone while the others
        closed it without its payload (seeds 5845, 6581, 7206 and 8771 of the simulator's sweep). So
        each member endorses one peer-led manifest per round, for good: the best-ranked one once it
        has been in view for SETTLE_S. Two strict majorities of one electorate share a member, so
        two manifests of a round cannot both be taken while nobody endorses twice (an endorser seen
        endorsing two is not counted). Votes can split so that none gets a majority: the round then
        waits for the coordinator, whose own manifest needs no endorsement."""
        me, now = self.node.peer_id, monotonic()
        chosen = next(m for m in found if m.record is best)
        digest = self._digest(chosen)
        since = self._in_view_since.setdefault((round_no, digest), now)
        electorate = self._electorate(members)
        # A node not on the manifest's base could not apply it; a partial holder cannot check it whole.
        mine = not self.state.partial and best.base_hash == self.state.hash
        if round_no not in self._endorsed and now - since >= SETTLE_S and me in electorate and mine:
            try:
                await self.verify(best)
            except BadManifest as e:  # nobody honest endorses it: the next leader's manifest will do
                self.ignored.add((round_no, chosen.signer))
                self.node.log_event("reject", f"manifest of round {round_no} by {chosen.signer[-8:]} not endorsed: {e}")
                return None
            endorsement = Endorsement(round=round_no, peer_id=me, leader=chosen.signer, digest=digest)
            if await put_surely(self.node.dht, endorse_key(self.run.run_id, round_no), endorsement, MANIFEST_TTL_S):
                self._endorsed[round_no] = digest
        votes = await self._endorsements(round_no, electorate)
        needed = peer_quorum(sum(votes.values()) if past else len(electorate))
        taken = canonical_manifest(
            found,
            round_no,
            self.run.coordinator,
            standing=self.validator.standing,
            endorsed=lambda m: votes.get(self._digest(m), 0) >= needed,
            **rules,
        )
        self._forget_before(round_no - 16)
        return taken

    async def _peers_closing(self, round_no: int, agreed: str | None) -> bool:
        """For a coordinator just back: whether peers are closing round r among themselves (a peer's
        manifest of it or an endorsement is out). It then takes theirs once most members endorse it,
        rather than publish its own beside it (the one it publishes always wins, and peers that had
        applied theirs forked: seeds 1332 and 6625 of the sweep), and leads only if theirs gets no
        majority within two view timeouts. Two, not one: peers that see it back stop endorsing until
        their own view timeout (from the round's first submission, before it came back) runs out,
        then finish; leading at one view timeout raced their last endorsements (seed 3593)."""
        electorate = self._electorate(await self.node.members())  # only members with standing can close one
        found = await self.node.dht.get_all(manifest_key(self.run.run_id, round_no), Manifest)
        peer_led = [m for m in found if m.signer in electorate and m.record.base_hash == agreed and self._signed_by_leader(m)]
        endorsed = [
            e for e in await self.node.dht.get_all(endorse_key(self.run.run_id, round_no), Endorsement) if e.signer in electorate
        ]
        if not peer_led and not endorsed:
            return False
        since = self._in_view_since.setdefault((round_no, "peers closing"), monotonic())
        return monotonic() - since < 2 * self.run.leader_timeout_s

    def _electorate(self, members: set[str]) -> set[str]:
        """Whose endorsements count, and whose majority a peer-led round needs: the members with
        standing, the coordinator, proven equivocators and partial holders aside (a pipeline stage
        cannot check a manifest whole, so it never endorses one: counted, stages alone could keep
        any peer-led round from a majority)."""
        return self.validator.with_standing(members - {self.run.coordinator} - self.witness.equivocators - self._partial)

    async def _endorsements(self, round_no: int, electorate: set[str]) -> dict[str, int]:
        """Endorsers per manifest digest among the electorate; ours counts at once (our record may
        still be on its way to where we read it)."""
        by: dict[str, str] = {}
        for item in await self.node.dht.get_all(endorse_key(self.run.run_id, round_no), Endorsement):
            e = item.record
            if item.signer != e.peer_id or e.round != round_no or item.signer not in electorate:
                continue
            first = self._endorsements_seen.setdefault((round_no, item.signer), e.digest)
            if first != e.digest and (round_no, item.signer) not in self._two_faced:
                self._two_faced.add((round_no, item.signer))
                self.node.log_event("reject", f"{item.signer[-8:]} endorsed two manifests of round {round_no}; neither counts")
            by[item.signer] = e.digest
        if round_no in self._endorsed:
            by[self.node.peer_id] = self._endorsed[round_no]
        votes: dict[str, int] = {}
        for signer, digest in by.items():
            if (round_no, signer) not in self._two_faced:
                votes[digest] = votes.get(digest, 0) + 1
        return votes

    def _forget_before(self, round_no: int) -> None:
        """Bounded memory over a long run: what we saw of rounds long settled."""
        if len(self._in_view_since) + len(self._endorsements_seen) + len(self._endorsed) < 4096:
            return
        self._in_view_since = {k: v for k, v in self._in_view_since.items() if k[0] >= round_no}
        self._endorsements_seen = {k: v for k, v in self._endorsements_seen.items() if k[0] >= round_no}
        self._endorsed = {k: v for k, v in self._endorsed.items() if k >= round_no}
        self._two_faced = {k for k in self._two_faced if k[0] >= round_no}

    async def _was_admitted(self, peer_id: str) -> bool:
        """Whether the coordinator admitted this peer (its signed role lives 24 h): a manifest it led
        while a member stays valid for the nodes that catch up on that round after it left."""
        if peer_id not in self._admitted:
            item = await self.node.dht.get_from(role_key(self.run.run_id, peer_id), Role, self.run.coordinator)
            if item is None or item.record.peer_id != peer_id:
                return False
            if len(self._admitted) > 4096:
                self._admitted.clear()
            self._admitted.add(peer_id)
        return True

    def _signed_by_leader(self, signed: Signed[Manifest]) -> bool:
        """A manifest counts only with a valid proof by its signer (verified once per version). The
        same record object read again (the simulator hands out one per stored version, to all its
        nodes) is known without encoding it: a manifest of R entries encodes in O(R), read every
        poll by every node."""
        known = self._checked.get(id(signed.record))
        if known is not None and known[0] is signed.record and known[1] == signed.signer:
            return known[2]
        key = (signed.signer, hashlib.sha256(encode_record(signed.record)).hexdigest())
        if key not in self._proofs_ok:
            if len(self._proofs_ok) > 4096:
                self._proofs_ok.clear()
            self._proofs_ok[key] = proof_ok(signed.record, signed.owner, signed.signer)
            if not self._proofs_ok[key]:
                logger.warning("ignoring a manifest of round %d from %s: bad signature", signed.record.round, signed.signer[-8:])
        if len(self._checked) > 4096:
            self._checked.clear()
        self._checked[id(signed.record)] = (
            signed.record,
            signed.signer,
            self._proofs_ok[key],
            key[1],
        )  # holds it: the id stays its
        return self._proofs_ok[key]

    def _digest(self, signed: Signed[Manifest]) -> str:
        """sha256 of the manifest as encoded (what endorsements name); known from its proof check."""
        known = self._checked.get(id(signed.record))
        if known is not None and known[0] is signed.record:
            return known[3]
        return hashlib.sha256(encode_record(signed.record)).hexdigest()

    async def closed(self, round_no: int) -> bool:
        """Whether round r already has a manifest on the agreed state (we are behind: don't train),
        by the rule that settles the round: a peer's manifest counts only when peers may lead and
        with its quorum, so a hostile peer's early empty manifest does not make us drop our work."""
        *_, manifest = await self._look(round_no, None)
        return manifest is not None

    async def close_round(self, round_no: int) -> Manifest:
        """Wait for round r's manifest, leading the round ourselves when it is our turn.

        Diverged if the swarm settled the round without us and its manifest stays out of reach (its
        leader cut off from us, or we gave it up when its payloads did not come): we reload the
        state the swarm holds rather than close the round a second time."""
        started: float | None = None  # when we first saw a submission: the round is under way
        behind_since: float | None = None
        while True:
            if started is None and await self._submissions(round_no):
                started = monotonic()
            beats, agreed, may_lead, manifest = await self._look(round_no, started)
            if manifest is not None:
                return manifest
            if self._behind(round_no, beats, agreed):
                behind_since = monotonic() if behind_since is None else behind_since
                if monotonic() - behind_since > self.run.leader_timeout_s:
                    if self.node.peer_id != self.run.coordinator:
                        raise Diverged(f"the swarm settled round {round_no} without us and its manifest is out of reach")
                    # Peers' word alone never makes the coordinator drop its state: they could all be
                    # one person's identities. It waited a view timeout for their manifest; it leads.
                    self._overruled = round_no
                    self._disbelieved |= {b.peer_id for b in beats if b.round > round_no}
                    self.node.log_event(
                        "round", f"round {round_no}: most peers say they are past it; no manifest of theirs in view"
                    )
            elif self._led != round_no and await self._should_lead(round_no, beats, agreed, may_lead):
                manifest = await self._lead(round_no, started)
                if manifest is not None and (manifest.leader != self.node.peer_id or self.node.peer_id == self.run.coordinator):
                    return manifest
                if manifest is not None:  # ours, as a peer: it counts once most members endorse it (or another does)
                    self._led = round_no
            next_in_line = (may_lead or len(beats) > FOLLOWER_LOOKS_PER_S) and self._next_in_line(round_no, beats, agreed)
            if self.node.peer_id == self.run.coordinator or (may_lead and next_in_line):
                await asyncio.sleep(self.poll_s)
            else:
                await self._follow(round_no, self._follow_every(len(beats), watching=may_lead or next_in_line))

    async def _follow(self, round_no: int, interval: float) -> None:
        """Wait out a follower's interval between full looks at round r. Beyond `follow_s` (a swarm
        of more than FOLLOWER_LOOKS_PER_S members) it still reads round r's manifests, one record
        key, every `follow_s`, and looks again at once when a new one is in view: the R heartbeats
        a look reads set the interval, the manifest need not wait for it. Only a new manifest by a
        member (or the coordinator) with a valid proof, not refused or equivocating, wakes it: a
        writer re-storing its record, or storing junk, cannot make every follower look each second."""
        if interval <= self.follow_s:
            await asyncio.sleep(interval)
            return
        read = self._read_manifests
        before = read[1] if read is not None and read[0] == round_no else await self._manifests_in_view(round_no)
        until = monotonic() + interval
        while (left := until - monotonic()) > 0:
            await asyncio.sleep(min(self.follow_s, left))
            if not await self._manifests_in_view(round_no) <= before:
                return

    async def _manifests_in_view(self, round_no: int) -> frozenset[tuple[str, bytes]]:
        """The manifests of round r a full look would weigh, as (signer, proof) each."""
        found = await self.node.dht.get_all(manifest_key(self.run.run_id, round_no), Manifest)
        return self._versions(self._weighable(round_no, found), await self.node.members())

    def _weighable(self, round_no: int, found: list[Signed[Manifest]]) -> list[Signed[Manifest]]:
        """Round r's manifests that a look weighs: with a valid proof by their leader (checked once
        per version), not refused by us, not an equivocator's."""
        equivocators = self.witness.equivocators
        return [
            m
            for m in found
            if self._signed_by_leader(m) and (round_no, m.signer) not in self.ignored and m.signer not in equivocators
        ]

    def _versions(self, found: list[Signed[Manifest]], members: set[str]) -> frozenset[tuple[str, bytes]]:
        """Which of these manifests are by a member or the coordinator, as (signer, proof) each."""
        return frozenset((m.signer, m.record.proof) for m in found if m.signer in members or m.signer == self.run.coordinator)

    def _next_in_line(self, round_no: int, beats: list[Heartbeat], agreed: str | None) -> bool:
        """Whether we are one of the LEADER_PACE_RANKS best-ranked peers free to lead round r (the
        next ones move up as they go). Only they look at a leader's pace while peers may lead, and
        at a large swarm's follower pace while the coordinator leads, so that one of them notices
        at once when it is gone: every peer looking at that pace once a 1,000-member round outlasted
        the view timeout read 4,000 views a second (the simulator's 1,000-peer blow-up)."""
        if self.node.peer_id == self.run.coordinator:
            return False
        place = lead_place(self.node.peer_id, round_no, self._candidates(round_no, beats), agreed, self.run.coordinator)
        return place is not None and place < LEADER_PACE_RANKS

    def _follow_every(self, members: int, watching: bool = True) -> float:
        """A follower's interval between full looks. Each look reads every member's heartbeat, so
        R followers looking once a second read R² heartbeats a second (at 1,000 members, about 150
        KB a second into every node): beyond FOLLOWER_LOOKS_PER_S members the interval grows with
        the swarm and its looks stay near that many a second (at 1,000 members, one every 4 s).
        There, between full looks, a follower reads only the round's manifests (`_follow`); unless
        it is `watching` (peers may lead: its endorsements need the view; or it is next in line to
        lead: it must notice the coordinator gone), its full looks are for noticing trouble late
        in a round (the view timeout running out on a hung coordinator), and FOLLOWER_LOOKS_PER_VIEW
        a view timeout are enough."""
        interval = max(self.follow_s, members / FOLLOWER_LOOKS_PER_S)
        if members > FOLLOWER_LOOKS_PER_S and not watching:
            interval = max(interval, self.run.leader_timeout_s / FOLLOWER_LOOKS_PER_VIEW)
        return interval

    async def _look(self, round_no: int, started: float | None) -> tuple[list[Heartbeat], str | None, bool, Manifest | None]:
        """The view of round r (live members, agreed state, whether peers may lead) and the manifest
        to take, if one has been published."""
        beats, agreed = await self._view(round_no)
        may_lead = self._peers_may_lead(round_no, beats, agreed, started)
        quorum = max(self._lookup_quorum(round_no, beats), await self._member_floor())
        # The swarm settled it: a peer-led manifest it endorsed counts, whoever is in view.
        past = self._behind(round_no, beats, agreed)
        manifest = await self.find_manifest(round_no, agreed, peers_may_lead=may_lead or past, quorum=quorum, past=past)
        return beats, agreed, may_lead, manifest

    async def _member_floor(self) -> int:
        """The least a peer-led manifest lists however few members are in view: a strict majority
        of the members with standing (the coordinator's signed roster). Two sides of a partition
        cannot both reach it, so a minority cut off from the rest (a peer alone, say) cannot settle
        a round of its own; the price: once most members with standing are gone, peers alone close
        no round (the run waits for the coordinator). Found by the simulator (docs/simulation.md)."""
        return peer_quorum(len(self._electorate(await self.node.members())))

    def _peers_may_lead(self, round_no: int, beats: list[Heartbeat], agreed: str | None, started: float | None) -> bool:
        """Peers lead while the coordinator is away (no heartbeat at round r or r − 1: see
        `coordinator_present`), or once it has let a view timeout pass since the round's first
        submission without closing it. The coordinator itself takes a peer's manifest
        once its own view timeout has passed (followers may have taken it by then), once most peers
        report having applied it (it fell behind and they went on without it), or in its first round
        after a (re)start (peers led that round while it was away): publishing its own then would
        split the swarm (seeds 6472 and 6625 of the simulator's sweep)."""
        timed_out = started is not None and monotonic() - started > self.run.leader_timeout_s
        if self.node.peer_id == self.run.coordinator:
            trainers = [b for b in beats if b.peer_id != self.run.coordinator and b.phase != "joining"]
            return timed_out or self.returning or 2 * sum(b.round > round_no for b in trainers) > len(trainers)
        return timed_out or not coordinator_present(round_no, beats, self.run.coordinator, agreed)

    def _behind(self, round_no: int, beats: list[Heartbeat], agreed: str | None) -> bool:
        """Whether the swarm has settled round r without us: the coordinator, or most live trainers
        with standing, report having applied it. A node behind never leads the round (a second
        manifest of a settled round forks whoever takes it); it takes the one the others applied.
        Found by the simulator: a coordinator restarted from an old state, and a peer back from a
        long partition, each led a round the rest had settled under a leader they could not see.
        Trainers' claims are believed only while the coordinator is away (when peers lead, a
        majority of them decides anyway); the coordinator waits one view timeout for their manifest
        and then leads (`close_round`), and no longer counts those who said so: identities cannot
        make it reload, only delay it once. `agreed`: the agreed state of round r in `beats`."""
        me, coordinator = self.node.peer_id, self.run.coordinator
        if any(b.peer_id == coordinator != me and b.round > round_no for b in beats):
            return True
        if me == coordinator and self._overruled == round_no:
            return False
        if me != coordinator and coordinator_present(round_no, beats, coordinator, agreed):
            return False  # the coordinator will close it: trainers claiming otherwise are not believed
        disbelieved = self._disbelieved
        heard = [
            b
            for b in beats
            if b.peer_id != coordinator and b.peer_id != me and b.peer_id not in disbelieved and b.phase != "joining"
        ]
        standing = self.validator.with_standing(b.peer_id for b in heard)  # never a banned one
        trainers = [b for b in heard if b.peer_id in standing]
        return 2 * sum(b.round > round_no for b in trainers) > len(trainers)

    def _lookup_quorum(self, round_no: int, beats: list[Heartbeat]) -> int:
        """Contributions a peer-led manifest must list to be taken: a majority of the round's live
        trainers with standing, as its leader and followers count them (for the coordinator, which
        looks only when it fell behind or has just come back, those already past the round count
        too). Counting newcomers here too made a returning coordinator refuse the manifest its
        followers had applied, and lead the round again (a real-process test forked so)."""
        if self.node.peer_id != self.run.coordinator:
            return peer_quorum(len(self._expected(round_no, beats)))
        around = [b for b in beats if b.peer_id != self.run.coordinator and b.phase != "joining" and abs(b.round - round_no) <= 1]
        return peer_quorum(sum(self.validator.standing(b.peer_id) for b in around))

    async def _view(self, round_no: int) -> tuple[list[Heartbeat], str | None]:
        """Live admitted peers (ourselves included, as we are now) and the agreed state of round r."""
        me = self.node.peer_id
        beats = [b for b in await self.node.member_peers() if b.peer_id != me and b.peer_id not in self.witness.equivocators]
        beats.append(
            Heartbeat(
                peer_id=me,
                name="",
                role="",
                device="",
                phase="idle",
                round=self.state.round,
                tokens_per_s=0,
                loss=None,
                bytes_sent=0,
                bytes_received=0,
                param_hash=self.known_hash(),
                version="",
                time=0,
                reachable=self.node.dht.reachable,
                partial=self.state.partial,
            )
        )
        self._partial = {b.peer_id for b in beats if b.partial}
        return beats, agreed_hash(round_no, beats, self.run.coordinator)

    async def _should_lead(self, round_no: int, beats: list[Heartbeat], agreed: str | None, peers_may_lead: bool) -> bool:
        """Lead if we are admitted, hold the agreed state of round r, and it is our turn."""
        me = self.node.peer_id
        if self.state.partial:  # a leader checks every payload whole against the whole state
            return False
        if self.state.round != round_no or self.state.hash != agreed or self._behind(round_no, beats, agreed):
            return False
        if me != self.run.coordinator and (me not in await self.node.members() or not self.validator.standing(me)):
            return False
        if me == self.run.coordinator and self.returning and await self._peers_closing(round_no, agreed):
            return False
        return should_lead(me, round_no, self._candidates(round_no, beats), agreed, self.run.coordinator, peers_may_lead)

    def _candidates(self, round_no: int, beats: list[Heartbeat]) -> list[Heartbeat]:
        """Who may lead round r: the coordinator and the members with standing. A peer whose
        manifest of this round we refused has had its turn (its bad manifest takes no endorsement):
        the next-ranked leads, else a best-ranked usurper would stall the round. A partial holder
        never leads: ranked first, it would leave the round without a leader."""
        coordinator, ignored = self.run.coordinator, self.ignored
        standing = self.validator.with_standing(b.peer_id for b in beats)
        return [
            b
            for b in beats
            if b.peer_id == coordinator or (b.peer_id in standing and (round_no, b.peer_id) not in ignored and not b.partial)
        ]

    # ----- leading ---------------------------------------------------------------------------

    async def _lead(self, round_no: int, started: float | None) -> Manifest | None:
        """Collect submissions until all live replicas are in or the deadline passes, then publish."""
        first_seen: float | None = None
        seen: dict[str, int] = {}  # poll in which each submission first appeared
        polls = 0
        leading_since = monotonic()
        while True:
            polls += 1
            beats, agreed, may_lead, other = await self._look(round_no, started)
            expected = self._expected(round_no, beats)
            quorum = (
                max(peer_quorum(len(expected)), await self._member_floor()) if self.node.peer_id != self.run.coordinator else 0
            )
            if other is not None:
                return other
            subs = await self._submissions(round_no)
            for peer in subs:
                seen.setdefault(peer, polls)
            if subs and first_seen is None:
                first_seen = monotonic()
                started = first_seen if started is None else started  # the round is under way: the view timeout runs
            if not await self._should_lead(round_no, beats, agreed, may_lead):
                return None  # a better-ranked leader has appeared
            everyone_in = expected <= set(subs) and len(subs) >= self.run.min_peers
            late = first_seen is not None and monotonic() - first_seen > self.run.round_timeout_s
            # Back from a restart, the coordinator gives records written just before it a moment to arrive.
            settled = not self.returning or monotonic() - leading_since > SETTLE_S
            if subs and (everyone_in or late) and len(subs) >= quorum and settled:
                break
            if not subs and self._nobody_admissible(round_no, beats) and monotonic() - leading_since > self.run.round_timeout_s:
                logger.info("round %d: no live peer can contribute (banned, or sitting it out); closing it empty", round_no)
                break
            await asyncio.sleep(self.poll_s)
        checking, cpu = time.perf_counter(), time.process_time()
        entries, rejected, scores = await self.validator.validate(self.state, subs, seen)
        self.validate_s, self.validate_cpu_s = time.perf_counter() - checking, time.process_time() - cpu
        *_, agreed, _, other = await self._look(round_no, started)  # validating took a while: did the round close meanwhile?
        if other is not None:
            return other
        if self.node.peer_id == self.run.coordinator and self.returning and await self._peers_closing(round_no, agreed):
            return None
        if len(entries) < quorum:  # followers would not take it; wait on (or for the next view)
            logger.info("round %d: %d valid contributions, below the quorum of %d", round_no, len(entries), quorum)
            await asyncio.sleep(self.poll_s * 8)
            return None
        undelivered = {r.peer_id for r in rejected if r.reason.startswith(NOT_DELIVERED)}
        missing = sorted((expected - set(subs)) | undelivered)
        aggregate = await self._aggregate(round_no, entries) if self._aggregates(entries, len(beats)) else ""
        manifest = Manifest(
            round=round_no,
            leader=self.node.peer_id,
            base_hash=self.state.hash,
            entries=entries,
            rejected=rejected,
            closed_at=self.node.wall_time(),
            eval_loss=self.node.status.loss if self.node.status.is_coordinator else None,
            missing=missing,
            scores=scores,
            aggregate=aggregate,
        )
        manifest = sign_manifest(self.node.dht.identity, manifest)
        if not await put_surely(self.node.dht, manifest_key(self.run.run_id, round_no), manifest, MANIFEST_TTL_S):
            logger.warning("could not publish the manifest of round %d; not applying it", round_no)
            return None
        if missing:
            self.node.log_event("timeout", f"round {round_no} closed without {', '.join(p[-8:] for p in missing)}")
        return manifest

    def _aggregates(self, entries: list[ManifestEntry], members: int) -> bool:
        """Whether the manifest we lead carries an aggregate: we are the coordinator (nobody checks
        an aggregate against the payloads: followers take it on the coordinator's word, as they take
        its scores), the run asks for one at this many contributions or members (a round of a few
        contributions in a large swarm is the worst case without it: each sender's uplink serves
        every member, 255 copies of a 20 MB payload from one volunteer at 256 peers), and every
        member in view holds the whole state (a partial holder applies its part of each payload)."""
        return (
            self.node.peer_id == self.run.coordinator
            and 0 < self.run.aggregate_from <= max(len(entries), members)
            and not self.mode.inline_payload
            and not self._partial
        )

    async def _aggregate(self, round_no: int, entries: list[ManifestEntry]) -> str:
        """The round's aggregate, held for serving (`_built_aggregate`). Its digest, or "" if the
        mean fails a check (the manifest then goes out without one, as before)."""
        draft = Manifest(
            round=round_no, leader=self.node.peer_id, base_hash=self.state.hash, entries=entries, rejected=[], closed_at=0.0
        )
        try:
            encoded, coverage = await self._built_aggregate(draft)  # the payloads are here already: we checked each
        except BadManifest as e:
            logger.warning("round %d: no aggregate (%s)", round_no, e)
            return ""
        self.store.hold(encoded.digest, encoded.data, reveal_s=0.0)
        self._aggregate_coverage = (round_no, coverage)
        return encoded.digest

    async def _built_aggregate(self, manifest: Manifest) -> tuple[Encoded, dict[str, int]]:
        """The aggregate of a manifest's entries (and its slot coverage): the listed payloads'
        clipped per-slot mean, with every check a node makes on a mean, compressed again
        (`PayloadStore.encode_aggregate`). A pure function of the payloads, their scales and the run
        (fixed order, fp32, a fresh compressor): the coordinator builds it, and a node that cannot
        fetch it rebuilds the same bytes."""
        draft = dataclasses.replace(manifest, aggregate="")
        blobs = await asyncio.gather(*(self._fetch(draft, e) for e in draft.entries))
        async with self.lock:
            if self.state.hash != draft.base_hash:
                raise Diverged(f"our state moved to {self.state.hash[:12]} while fetching round {draft.round}")
            (mean, coverage), _ = await asyncio.to_thread(_cpu_timed, self._mean_of, draft, list(blobs))
        encoded = await asyncio.to_thread(self.store.encode_aggregate, mean, leader=draft.leader, round_no=draft.round)
        return encoded, coverage

    def _expected(self, round_no: int, beats: list[Heartbeat]) -> set[str]:
        """Replicas the round waits for: every live trainer at this round or just finishing the last
        one (a slower peer still applying round r−1 is counted, not left behind every round). A peer
        leader (which scores nothing) waits only for peers with standing: it could not apply the
        others' work, and they do not count toward its quorum."""
        leader_id, v = self.run.coordinator, self.validator
        rounds, phases = (round_no - 1, round_no), ("training", "exchanging", "idle")
        live = {b.peer_id for b in beats if b.peer_id != leader_id and b.round in rounds and b.phase in phases}
        out = {p for p in live if not v.banned(p) and v.waited_for(p)}
        return out if self.node.peer_id == leader_id else v.with_standing(out)

    def _nobody_admissible(self, round_no: int, beats: list[Heartbeat]) -> bool:
        """Peers are live, and none of them can contribute to the round: each is banned or sits it
        out (phase "joining": a pipeline group that lost a message mid-round gives the round up and
        follows it, and with no full replica beside it nobody submits). The coordinator closes the
        round empty rather than wait for ever: the bans run out round by round, and the group trains
        the next round (a 4-stage group alone stalled for good: tests/test_pipeline_e2e.py)."""
        if self.node.peer_id != self.run.coordinator:
            return False
        peers = [b for b in beats if b.peer_id != self.run.coordinator]
        trainers = [b for b in peers if b.phase != "joining"]
        if trainers:
            return all(self.validator.banned(b.peer_id) for b in trainers)
        # Every peer sits this round out, holding its state: none is still downloading one (an
        # empty round then would move the round its download asks donors for).
        return bool(peers) and all(b.round == round_no for b in peers)

    async def _submissions(self, round_no: int) -> dict[str, Submission]:
        found = await self.node.dht.get_all(submit_key(self.run.run_id, round_no), Submission)
        members = await self.node.members()
        subs = {}
        for item in found:
            if item.record.peer_id != item.signer or item.record.round != round_no:
                continue
            if item.signer not in members or self.validator.banned(item.signer):
                continue
            subs[item.signer] = item.record
        return subs

    async def save(self, directory: str | Path) -> None:
        """Write the current global state to disk (safetensors + JSON), never a half-applied one.
        A partial holder keeps nothing on disk: back from a restart it downloads its part."""
        if self.state.partial:
            return
        async with self.lock:
            await asyncio.to_thread(save_state, self.state, directory, run_id=self.run.run_id)
        logger.info("saved the state of round %d (%s) to %s", self.state.round, self.state.hash[:10], directory)

    # ----- applying --------------------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> int:
        """Fetch the manifest's payloads, then decode and accumulate them one at a time in manifest
        order (memory O(params)), and let the mode take the outer step on the per-slot mean (checked
        once: a peer-led manifest was checked before we endorsed it)."""
        if self.state.partial:
            return await self._apply_part(manifest)
        if manifest.base_hash != self.state.hash:
            raise Diverged(f"round {manifest.round} applies to state {manifest.base_hash[:12]}, ours is {self.state.hash[:12]}")
        if self.mode.inline_payload:
            return await self._apply_inline(manifest)
        checked = self._verified
        if checked is None or checked[0] != manifest or checked[1] != self.state.hash:
            await self.verify(manifest)
            checked = self._verified
        assert checked is not None
        _, _, mean, coverage, cpu_s, wall_s = checked
        async with self.lock:
            started = time.perf_counter()
            self.apply_cpu_s = cpu_s
            if mean is not None:
                _, step_cpu_s = await asyncio.to_thread(_cpu_timed, self.mode.outer_step, self.state, mean)
                self.apply_cpu_s += step_cpu_s
            else:
                self.state.advance_without_update()
            self.coverage = coverage
            self.apply_s = wall_s + time.perf_counter() - started
        self._verified = None
        return len(manifest.entries)

    async def verify(self, manifest: Manifest) -> None:
        """Fetch and check everything a manifest lists, and keep the mean it yields (without taking
        the outer step): BadManifest if a payload cannot be had or decoded, or the round fails a
        check every node makes alike. Done before endorsing a peer-led manifest, so that no honest
        node endorses one it would refuse (every node endorses one manifest a round, for good)."""
        if self.mode.inline_payload:
            for e in manifest.entries:
                if (problem := self.validator.inline_problem(e.inline, e.digest, e.size)) is not None:
                    raise BadManifest(f"entry of {e.peer_id[-8:]}: {problem}")
            return
        if manifest.aggregate:
            await self._verify_aggregate(manifest)
            return
        base = self.state.hash
        blobs = await asyncio.gather(*(self._fetch(manifest, e) for e in manifest.entries))
        mean: dict[str, torch.Tensor] | None = None
        coverage: dict[str, int] = {}
        cpu_s = wall_s = 0.0
        if blobs:
            async with self.lock:
                if self.state.hash != base:
                    raise Diverged(f"our state moved to {self.state.hash[:12]} while fetching round {manifest.round}")
                started = time.perf_counter()
                (mean, coverage), cpu_s = await asyncio.to_thread(_cpu_timed, self._mean_of, manifest, list(blobs))
                wall_s = time.perf_counter() - started
        self._verified = (manifest, base, mean, coverage, cpu_s, wall_s)

    async def _verify_aggregate(self, manifest: Manifest) -> None:
        """`verify` for a manifest that carries an aggregate: fetch it (down a tree of the members
        that relay it: `_fetch_aggregate`), decode it and make the checks every node makes on a
        round's mean; the per-payload checks are the coordinator's, whose word it is."""
        if manifest.leader != self.run.coordinator:
            raise BadManifest("only the coordinator's manifest may carry an aggregate")
        if self.state.partial:
            raise BadManifest("a partial holder applies its part of each payload, not an aggregate")
        base = self.state.hash
        blobs = await self._fetch_aggregate(manifest)

        def checked() -> dict[str, torch.Tensor]:
            mean: dict[str, torch.Tensor] = {}
            try:
                for data in blobs:  # the whole, or its parts (each checked against the digest when fetched)
                    mean.update(
                        self.store.decode_aggregate(data, manifest.aggregate, leader=manifest.leader, round_no=manifest.round)
                    )
            except Exception as e:  # undecodable: it should never have been published
                raise BadManifest(f"aggregate: {e}") from None
            if not mean and manifest.entries:
                raise BadManifest("the aggregate carries no tensor")
            if (problem := check_update(self.state.params, mean, self.run.outer_at(manifest.round).outer_lr)) is not None:
                raise BadManifest(problem)
            return mean

        async with self.lock:
            if self.state.hash != base:
                raise Diverged(f"our state moved to {self.state.hash[:12]} while fetching round {manifest.round}")
            started = time.perf_counter()
            mean, cpu_s = await asyncio.to_thread(_cpu_timed, checked)
            wall_s = time.perf_counter() - started
        at, coverage = self._aggregate_coverage
        self._verified = (manifest, base, mean, coverage if at == manifest.round else {}, cpu_s, wall_s)
        self._last_aggregate = (manifest.round, mean)

    async def _fetch_aggregate(self, manifest: Manifest) -> list[bytes]:
        """A round's aggregate, whole or as its parts (`tensor_groups`: AGGREGATE_PARTS runs of whole
        tensors). Each part comes down its own tree of the live members, ranked by sha256(round,
        digest, member) and rotated by the part (`_relay_chain`): a member asks its parent (rank
        (i − 1) / RELAY_FANOUT), patiently, then the parent's parent, up to the coordinator
        (`_fetch_part`), and a member asked while its copy is on its way answers once it arrives
        (`PayloadStore.relaying`). Ranks are the same in every node's view and a parent ranks above
        its child, so no two members wait on each other; parts relay as they arrive, and each
        member is inner in the same share of the trees, so what each uploads is spread over the
        swarm. A part that does not come is asked of the members past the round, then of the
        coordinator; if the coordinator is gone, the aggregate is rebuilt from the payloads."""
        digest = manifest.aggregate
        if (whole := self.store.blobs.get(digest)) is not None:
            return [whole]  # ours (we led the round, or rebuilt it)
        live = {b.peer_id for b in await self.node.member_peers()} | {self.node.peer_id}
        groups = tensor_groups(self.store.shapes, AGGREGATE_PARTS)
        ranked = _relay_ranked(f"{manifest.round}:{manifest.aggregate}", live - {manifest.leader})
        me = ranked.index(self.node.peer_id) if self.node.peer_id in ranked else None
        chains = [self._relay_chain(ranked, me, k * len(ranked) // len(groups)) for k in range(len(groups))]
        with self.store.relaying(digest, groups):
            return await self._fetch_parts(manifest, groups, chains, flat=len(ranked) <= RELAY_FLAT_UPTO)

    async def _fetch_parts(
        self, manifest: Manifest, groups: list[list[str]], chains: list[list[str]], *, flat: bool
    ) -> list[bytes]:
        """Every part, each on its own: a part slow to come does not hold up asking again for the others."""
        started = monotonic()
        parts = [
            asyncio.ensure_future(self._fetch_part(manifest, groups[k], k, chains[k], started, flat=flat))
            for k in range(len(groups))
        ]
        try:
            got = await asyncio.gather(*parts)
        except _Rebuild:
            # The coordinator is gone (or serves nobody): rebuild the aggregate from the payloads.
            return [await self._recompute_aggregate(manifest)]
        finally:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)
        return list(got)

    async def _fetch_part(
        self, manifest: Manifest, names: list[str], k: int, chain: list[str], started: float, *, flat: bool
    ) -> bytes:
        """One part of the aggregate: from our parent in its relay tree, asked again and again (a
        parent asked while its copy is on its way answers when it arrives, RELAY_WAIT_S at most),
        and from the next ancestor up only once the parent has left, failed, or had its patience
        (RELAY_PATIENCE_S, and RELAY_HOP_S more for each hop above it). Going up the tree at the
        first "not here" piled every impatient member onto the few nodes at the top (at 256
        volunteers with 1B-size payloads, the coordinator's 14 Mbit/s uplink was booked with 4.7 GB
        and no peer applied the round for ten minutes). Past our ancestors, members that have
        applied the round are asked, two each in an order of our own, and the coordinator last. In
        a `flat` swarm (RELAY_FLAT_UPTO members) the coordinator is asked right after our ancestors."""
        digest, leader, me = manifest.aggregate, manifest.leader, self.node.peer_id
        give_up = started + 4 * self.run.leader_timeout_s
        # Our parent gets its copy a hop's time after its own parent does: its patience grows with
        # our depth (a member five hops down used to give up on a parent that was on its way).
        level, since, patience = 0, started, RELAY_PATIENCE_S + RELAY_HOP_S * len(chain)
        past: list[str] = []
        while True:
            asked = [*past, leader] if level >= len(chain) else [*chain[level:], leader] if flat else [chain[level]]
            ancestor = asked[0] if level < len(chain) else None
            try:
                return await self.store.get(digest, asked, names, within_s=max(1.0, give_up - monotonic()), again=False)
            except TransferError as e:
                logger.info("round %d: part %d of the aggregate not fetched yet (%s)", manifest.round, k, e)
                # Patience is for an ancestor that is relaying the part (it held our request while
                # its copy was on its way), or has not yet seen the manifest. One that failed to
                # answer, sent other bytes, or says "not here" at once later on does not get it.
                if ancestor is not None and not (
                    isinstance(e, Unavailable)
                    and (e.relaying(ancestor) or (ancestor in e.not_here and monotonic() - started < RELAY_START_S))
                ):
                    since = -math.inf
            beats = await self.node.member_peers()
            live = {b.peer_id for b in beats}
            # Past our ancestors: whoever has applied the round holds it (the coordinator may have
            # gone meanwhile: the members that took its manifest must not be the only ones to, or
            # the swarm splits).
            past = [b.peer_id for b in beats if b.round > manifest.round and b.peer_id not in (me, leader)]
            past = sorted(past, key=lambda p: hashlib.sha256(f"{me}:{p}".encode()).digest())
            if self.run.coordinator not in live or monotonic() > give_up:
                if past and level <= len(chain):  # one last try: all of those who hold it
                    level = len(chain) + 1
                    continue
                raise _Rebuild
            past = past[:2]
            while level < len(chain) and (chain[level] not in live or monotonic() - since > patience):
                level, since, patience = level + 1, monotonic(), RELAY_PATIENCE_S
            await asyncio.sleep(1.0)

    @staticmethod
    def _relay_chain(ranked: list[str], me: int | None, offset: int) -> list[str]:
        """Our ancestors in the relay tree of one part of a round's aggregate, nearest first: the
        members ranked once for the round (we are `ranked[me]`), rotated by `offset` for the part. A member is inner (a
        rank below 1 / RELAY_FANOUT of the swarm) in the same share of the parts' trees as any other,
        so no member relays many more parts than the rest (drawn per part, a quarter of the members
        would be inner in three or more of the eight trees)."""
        chain: list[str] = []
        if me is not None:
            i = (me - offset) % len(ranked)
            while i > 0:
                i = (i - 1) // RELAY_FANOUT
                chain.append(ranked[(i + offset) % len(ranked)])
        return chain

    async def _recompute_aggregate(self, manifest: Manifest) -> bytes:
        """A round's aggregate rebuilt from its listed payloads (`_built_aggregate`), when no holder
        serves it (the coordinator went down right after applying it, say: the members that took
        its manifest must not be the only ones able to). Its digest must be the manifest's:
        BadManifest if it is not (a coordinator's aggregate that is not its payloads' mean), or if
        a payload cannot be had (as for a manifest without an aggregate)."""
        encoded, _ = await self._built_aggregate(manifest)
        if encoded.digest != manifest.aggregate:
            raise BadManifest(f"the aggregate of round {manifest.round} is not the mean of its payloads")
        self.store.hold(encoded.digest, encoded.data, reveal_s=0.0)
        self.node.log_event("round", f"round {manifest.round}: rebuilt its aggregate from the payloads")
        return encoded.data

    def applied_aggregate(self, round_no: int) -> dict[str, torch.Tensor] | None:
        """What round r applied, if it was an aggregate (for its senders' error feedback)."""
        if self._last_aggregate is None or self._last_aggregate[0] != round_no:
            return None
        return self._last_aggregate[1]

    # ----- holding part of the state -----------------------------------------------------------

    def known_hash(self) -> str:
        """Our state's hash, or "" while a partial holder has not adopted its round's leaves (no vote)."""
        try:
            return self.state.hash
        except PartialStateError:
            return ""

    async def _apply_part(self, manifest: Manifest) -> int:
        """A partial holder's apply: the mean and outer step of the slots it holds, then the check
        that decides: the leaves of the agreed state of the next round, which full holders computed,
        must match its own part bit for bit (`adopt_agreed`; Diverged otherwise, and the part is
        reloaded). It cannot make the whole-model checks a full holder makes (the update's length
        over all weights, clipping, direction): it takes only a manifest the coordinator signed or
        most members endorsed, and a round the full holders refused never becomes the agreed state
        it checks against."""
        if manifest.round != self.state.round:
            raise Diverged(f"a manifest of round {manifest.round} for our state of round {self.state.round}")
        if not self.known_hash():
            await self.adopt_agreed(want=manifest.base_hash)
        base = self.state.hash
        if manifest.base_hash != base:
            raise Diverged(f"round {manifest.round} applies to state {manifest.base_hash[:12]}, ours is {base[:12]}")
        held = sorted(self.state.params)  # of each payload, the part carrying the tensors we hold
        blobs = await asyncio.gather(*(self._fetch(manifest, e, held) for e in manifest.entries))
        async with self.lock:
            if self.known_hash() != base:
                raise Diverged(f"our state moved while fetching round {manifest.round}")
            started = time.perf_counter()
            (mean, self.coverage), cpu_s = await asyncio.to_thread(_cpu_timed, self._part_mean, manifest, list(blobs))
            self.apply_cpu_s = cpu_s
            if manifest.entries:  # our slots may have no contribution, others' do: their leaves change
                _, step_cpu_s = await asyncio.to_thread(_cpu_timed, self.mode.outer_step, self.state, mean)
                self.apply_cpu_s += step_cpu_s
            else:
                self.state.advance_without_update()
            self.apply_s = time.perf_counter() - started
        await self.adopt_agreed()
        return len(manifest.entries)

    def _part_mean(self, manifest: Manifest, blobs: list[bytes]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The per-slot mean of the listed payloads over the slots we hold (BadManifest if a payload
        does not decode or the mean is not finite: every full holder refuses such a round too)."""
        held = set(self.state.params)
        acc = slot_aggregator({n: s for n, s in self.store.shapes.items() if n in held}, self.run.outer.trim)
        for entry, data in zip(manifest.entries, blobs):
            try:
                tensors = self.store.decode_any(data, entry.digest, sender=entry.peer_id, round_no=manifest.round)
            except Exception as e:
                raise BadManifest(f"payload of {entry.peer_id[-8:]}: {e}") from None
            if (problem := check_scales({n: c for n, c in entry.scales.items() if n in held}, set(tensors))) is not None:
                raise BadManifest(f"entry of {entry.peer_id[-8:]}: {problem}")
            if part := {n: t for n, t in tensors.items() if n in held}:
                acc.add(part, entry.scales)
        mean = acc.mean()
        if bad := [n for n, m in mean.items() if not bool(torch.isfinite(m).all())]:
            raise BadManifest(f"the round's mean of {bad[0]} is not finite")
        coverage: dict[str, int] = {}
        for name, count in acc.counts.items():
            group = self.mode.slot_group(name)
            coverage[group] = max(coverage.get(group, 0), count)
        return mean, coverage

    async def adopt_agreed(self, want: str | None = None) -> None:
        """For a partial holder: the leaves of the tensors it does not hold, from the index of the
        agreed state of its round (`want`, else the one the coordinator or most live holders report),
        fetched from a node that holds that state; the index must hash to it, and our own part must
        match its leaves. Diverged if our part differs or no such index comes within the bound."""
        if self.known_hash():
            return
        me, r = self.node.peer_id, self.state.round
        deadline = monotonic() + self.run.round_timeout_s + 2 * self.run.leader_timeout_s
        tried: set[str] = set()
        while True:
            beats, agreed = await self._view(r)
            target = want or agreed
            holders = [b.peer_id for b in beats if target and b.round == r and b.param_hash == target and b.peer_id != me]
            for holder in [h for h in holders if h not in tried]:
                if monotonic() > deadline:
                    break
                tried.add(holder)
                try:
                    raw = await self.store.fetch(holder, {"kind": "state-index"}, 1 << 24, 30.0) if self.store.fetch else None
                    index = parse_index(raw) if raw is not None else None
                except (TransferError, StateError) as e:
                    logger.info("state index of round %d from %s failed: %s", r, holder[-8:], e)
                    continue
                if index is None or (index.round, index.hash) != (r, target):
                    continue  # moved on, or another state: the next holder
                try:
                    self.state.adopt(r, index.leaves())
                except ValueError as e:
                    raise Diverged(f"our part of round {r} is not the agreed state's: {e}") from None
                return
            if monotonic() > deadline:
                raise Diverged(f"no holder of round {r}'s agreed state served its index")
            if len(tried) >= len(holders):
                tried.clear()  # holders may serve it later (one still applying): ask again
            await asyncio.sleep(1.0)

    async def _apply_inline(self, manifest: Manifest) -> int:
        """A mode whose payloads travel in the records: nothing to fetch; each entry is checked as the
        leader checked it, then the mode applies them all in manifest order (timed: `apply_s`)."""
        await self.verify(manifest)  # each entry checked as the leader checked it
        contributions = [(e.peer_id, e.inline) for e in manifest.entries]
        async with self.lock:
            started = time.perf_counter()
            self.apply_cpu_s = 0.0
            if contributions:
                _, self.apply_cpu_s = await asyncio.to_thread(
                    _cpu_timed, self.mode.apply_inline, self.state, manifest.round, contributions
                )
            else:
                self.state.advance_without_update()
            self.apply_s = time.perf_counter() - started
            self.coverage = {"all": len(contributions)} if contributions else {}
        return len(contributions)

    def _mean_of(self, manifest: Manifest, blobs: list[bytes]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The per-slot mean of the listed payloads, and how many contributions each slot group had;
        BadManifest if the round fails a check (the state is not touched here)."""
        acc = slot_aggregator(self.store.shapes, self.run.outer.trim)
        norms: list[dict[str, float]] = []  # of each clipped contribution, to check the leader clipped
        unscored = manifest.leader != self.run.coordinator  # nobody measured its usefulness: check its geometry
        summaries: list[Summary] = []
        for entry, data in zip(manifest.entries, blobs):
            try:
                tensors = self.store.decode(data, sender=entry.peer_id, round_no=manifest.round)
            except Exception as e:  # undecodable: the manifest should never have listed it
                raise BadManifest(f"payload of {entry.peer_id[-8:]}: {e}") from None
            problem = check_scales(entry.scales, set(tensors))
            if problem is not None:
                raise BadManifest(f"entry of {entry.peer_id[-8:]}: {problem}")
            acc.add(tensors, entry.scales)
            norms.append(clipped_norms(tensors, entry.scales))
            if unscored:
                summaries.append(summarise(tensors, sparse=self.run.outer.codec == "sparseloco"))
        problem = check_clipping(norms)
        if problem is not None:
            raise BadManifest(problem)
        if against := against_the_rest(summaries, [e.scales for e in manifest.entries]):
            raise BadManifest(f"lists {len(against)} contribution(s) pointing against the others, and nobody scored the round")
        mean = acc.mean()
        problem = check_update(self.state.params, mean, self.run.outer_at(manifest.round).outer_lr)
        if problem is not None:  # a poisoned round: refused by every node alike, our state kept
            raise BadManifest(problem)
        coverage: dict[str, int] = {}
        for name, count in acc.counts.items():
            group = self.mode.slot_group(name)
            coverage[group] = max(coverage.get(group, 0), count)
        return mean, coverage  # the state is untouched until every payload decoded and the mean passed

    async def settle_round(
        self, round_no: int, reload: Callable[[], Awaitable[GlobalState]]
    ) -> tuple[Manifest | None, int | None]:
        """Wait for round r's manifest and apply it: (manifest, payloads applied).

        A manifest on our state whose payloads cannot be had or decoded is its leader's fault: it is
        ignored and the wait goes on. If our state is not the manifest's base we have diverged: the
        state is reloaded and the count is None. So it is when the swarm settled the round without
        us under a manifest we cannot get (then the manifest is None too: we never saw it).
        """
        while True:
            manifest: Manifest | None = None
            try:
                manifest = await self.close_round(round_no)
                applied = await self.apply(manifest)
                self.validator.record(manifest)
                self.returning = False
                if self.node.peer_id == self.run.coordinator and manifest.leader == self.run.coordinator:
                    await self.node.dht.put(run_key(self.run.run_id, "ledger"), self.validator.ledger(), LEDGER_TTL_S)
                return manifest, applied
            except BadManifest as e:
                assert manifest is not None  # raised by apply() only
                self.ignored.add((manifest.round, manifest.leader))
                self.node.log_event("reject", f"manifest of round {manifest.round} by {manifest.leader[-8:]} ignored: {e}")
            except Diverged as e:
                self.node.log_event("reload", f"{e}; reloading state")
                self.state = await reload()
                await self.adopt_ledger()
                return manifest, None

    async def adopt_ledger(self) -> None:
        """Take the coordinator's published ledger if it is ahead of ours (joining, reloading,
        restarting): standing, strikes and bans carry over (admission.py)."""
        item = await self.node.dht.get_from(run_key(self.run.run_id, "ledger"), Ledger, self.run.coordinator)
        if item is not None and self.validator.adopt(item.record):
            logger.info("adopted the coordinator's ledger as of round %d", item.record.round)

    def _other_senders(self, manifest: Manifest, entry: ManifestEntry) -> list[str]:
        """The manifest's senders but this entry's, in order: from one list per manifest, by slicing
        (built per fetch, a round's R fetches cost R² in Python)."""
        if self._senders is None or self._senders[0] is not manifest:
            ids = [e.peer_id for e in manifest.entries]
            self._senders = (manifest, ids, {p: i for i, p in enumerate(ids)})
        _, ids, index = self._senders
        i = index.get(entry.peer_id)
        return ids if i is None else ids[:i] + ids[i + 1 :]

    async def _fetch(self, manifest: Manifest, entry: ManifestEntry, names: list[str] | None = None) -> bytes:
        """A listed payload from its sender, the leader, the other senders, or any member that has
        applied the round already (they keep what they fetched). A leader that serves a payload to
        some followers only cannot split the swarm: an honest peer that got it passes it on; only if
        nobody honest could get it within the view timeout is the manifest bad, and then for everyone."""
        holders = [entry.peer_id, manifest.leader, *self._other_senders(manifest, entry)]
        deadline = monotonic() + self.run.leader_timeout_s
        # No holder is asked past `give_up`, the longest this loop waits for a payload at all, and
        # none is given longer than what is left of it (plus a body's own allowance for its size,
        # swarm/net/transfer.py: 30 s at most between bytes).
        give_up = deadline + 3 * self.run.leader_timeout_s
        while True:
            try:  # the listed holders first: the live members are read only if none of them has it
                # (R fetches a round: reading R heartbeats for each cost R³)
                return await self.store.get(entry.digest, holders, names, within_s=max(1.0, give_up - monotonic()))
            except Exception as e:  # undeliverable so far
                failure = e
            live = {b.peer_id for b in await self.node.member_peers()}
            others = sorted(live - set(holders) - {self.node.peer_id})
            if others:
                try:
                    return await self.store.get(entry.digest, others, names, within_s=max(1.0, give_up - monotonic()))
                except Exception as e:
                    failure = e
            # The coordinator holds every payload it listed (it fetched each to check it) and serves
            # it while it is live: slow, not bad, for up to four view timeouts in all (1B-size
            # payloads on slow links took longer than one, and followers reloaded whole states
            # instead). Bounded: a payload it no longer keeps is not waited for ever.
            slow = manifest.leader == self.run.coordinator and self.run.coordinator in live
            if monotonic() > deadline + (3 * self.run.leader_timeout_s if slow else 0.0):
                raise BadManifest(
                    f"payload of {entry.peer_id[-8:]}: {failure or type(failure).__name__}"
                ) from None  # undeliverable: it should not be listed
            await asyncio.sleep(2.0)
