"""How a round closes: who leads, which payloads are in, and how everyone applies them.

Any node holding θ(r) can lead round r. Candidates are ranked: the coordinator first, then the
other live peers by sha256(round, peer id), so leadership moves on its own when the coordinator is
down. The leader waits until every live replica of the round has submitted, or until
round_timeout_s after the first submission, fetches and validates each payload, and publishes a
signed manifest listing the accepted ones sorted by peer id. Everyone applies exactly the
manifest's payloads in that order, so replicas stay bit-identical. A manifest names the state hash
it applies to; a node holding another hash has diverged and reloads (see peer.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hivemind.utils import get_dht_time

from swarm.codec import SlotMean
from swarm.exchange import PayloadStore
from swarm.log import get_logger
from swarm.modes.base import TrainingMode
from swarm.net.dht import Signed
from swarm.net.records import (
    Heartbeat,
    Manifest,
    ManifestEntry,
    Submission,
    manifest_key,
    submit_key,
)
from swarm.node import SwarmNode
from swarm.robust import check_scales
from swarm.state import GlobalState
from swarm.validate import Validator

logger = get_logger(__name__)
MANIFEST_TTL_S = 6 * 3600
STRIKES_BEFORE_BAN = 3


class Diverged(RuntimeError):
    """Our global weights are not the ones the swarm's manifest was computed against."""


class BadManifest(RuntimeError):
    """A manifest on our state that lists a payload nobody can deliver or that does not decode."""


def _rank(round_no: int, peer_id: str, is_coordinator: bool) -> tuple[int, str]:
    return (0 if is_coordinator else 1, hashlib.sha256(f"{round_no}:{peer_id}".encode()).hexdigest())


def leader_rank(round_no: int, beat: Heartbeat) -> tuple[int, str]:
    """Who leads round r: the coordinator first, then everyone else by sha256(r, peer id)."""
    return _rank(round_no, beat.peer_id, beat.is_coordinator)


def canonical_manifest(
    found: list[Signed[Manifest]], round_no: int, coordinator: str, agreed: str | None = None
) -> Manifest | None:
    """Of all manifests published for a round, the one everyone applies: among those built on the
    agreed state (when it is known), the one by the best-ranked leader."""
    valid = [m for m in found if m.record.leader == m.signer and m.record.round == round_no]
    if agreed is not None:
        valid = [m for m in valid if m.record.base_hash == agreed]
    if not valid:
        return None
    return min(valid, key=lambda m: _rank(round_no, m.signer, m.signer == coordinator)).record


def agreed_hash(round_no: int, beats: list[Heartbeat], coordinator: str) -> str | None:
    """The state most live holders of round r report; ties go to the coordinator's, then the smallest.

    Only a node holding this state may lead round r, so a node that diverged can never lead the
    swarm onto its fork: it follows, sees the mismatch and reloads.
    """
    votes = Counter(b.param_hash for b in beats if b.round == round_no and b.param_hash and b.phase != "joining")
    if not votes:
        return None
    coordinator_hash = next((b.param_hash for b in beats if b.peer_id == coordinator and b.round == round_no), None)
    return min(votes, key=lambda h: (-votes[h], h != coordinator_hash, h))


@dataclass
class RoundAgreement:
    """Leads or follows rounds for one node. `state` is the node's θ(r), guarded by `lock`."""

    node: SwarmNode
    store: PayloadStore
    state: GlobalState
    mode: TrainingMode
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    poll_s: float = 0.25
    ignored: set[tuple[int, str]] = field(default_factory=set)  # (round, leader) of bad manifests
    coverage: dict[str, int] = field(default_factory=dict)  # slot group -> contributions, last round applied

    def __post_init__(self) -> None:
        self.validator = Validator(self.node, self.store, self.mode)

    @property
    def run(self):
        return self.node.run

    @property
    def p2p(self):
        return self.node.server.p2p

    # ----- following -------------------------------------------------------------------------

    async def find_manifest(self, round_no: int, agreed: str | None = None) -> Manifest | None:
        """The canonical manifest of a round, if one has been published."""
        found = await self.node.dht.get_all(manifest_key(self.run.run_id, round_no), Manifest)
        found = [m for m in found if (round_no, m.signer) not in self.ignored]
        return canonical_manifest(found, round_no, self.run.coordinator, agreed)

    async def close_round(self, round_no: int) -> Manifest:
        """Wait for round r's manifest, leading the round ourselves whenever we rank first."""
        while True:
            beats, agreed = await self._view(round_no)
            manifest = await self.find_manifest(round_no, agreed)
            if manifest is not None:
                return manifest
            if self._should_lead(round_no, beats, agreed):
                manifest = await self._lead(round_no)
                if manifest is not None:
                    return manifest
            await asyncio.sleep(self.poll_s)

    async def _view(self, round_no: int) -> tuple[list[Heartbeat], str | None]:
        """Live peers (ourselves included, as we are now) and the agreed state of round r."""
        me = self.node.peer_id
        beats = [b for b in await self.node.live_peers() if b.peer_id != me]
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
                param_hash=self.state.hash,
                version="",
                time=0,
                is_coordinator=self.node.status.is_coordinator,
            )
        )
        return beats, agreed_hash(round_no, beats, self.run.coordinator)

    def _should_lead(self, round_no: int, beats: list[Heartbeat], agreed: str | None) -> bool:
        """Lead if we hold the agreed state of round r and rank first among those who do."""
        if self.state.round != round_no or self.state.hash != agreed:
            return False
        # Only nodes free to lead right now: a peer still in its inner steps cannot close a round.
        holders = [
            b
            for b in beats
            if b.round == round_no and b.param_hash == agreed and b.phase in ("exchanging", "idle", "coordinating")
        ]
        return min(holders, key=lambda b: leader_rank(round_no, b)).peer_id == self.node.peer_id

    # ----- leading ---------------------------------------------------------------------------

    async def _lead(self, round_no: int) -> Manifest | None:
        """Collect submissions until all live replicas are in or the deadline passes, then publish."""
        first_seen: float | None = None
        seen: dict[str, int] = {}  # poll in which each submission first appeared
        polls = 0
        while True:
            polls += 1
            beats, agreed = await self._view(round_no)
            other = await self.find_manifest(round_no, agreed)
            if other is not None:
                return other
            subs = await self._submissions(round_no)
            for peer in subs:
                seen.setdefault(peer, polls)
            if subs and first_seen is None:
                first_seen = time.monotonic()
            expected = self._expected(round_no, beats)
            if not self._should_lead(round_no, beats, agreed):
                return None  # a better-ranked leader has appeared
            everyone_in = expected <= set(subs) and len(subs) >= self.run.min_peers
            late = first_seen is not None and time.monotonic() - first_seen > self.run.round_timeout_s
            if subs and (everyone_in or late):
                break
            await asyncio.sleep(self.poll_s)
        entries, rejected = await self.validator.validate(round_no, self.state.hash, subs, seen)
        manifest = Manifest(
            round=round_no,
            leader=self.node.peer_id,
            base_hash=self.state.hash,
            entries=entries,
            rejected=rejected,
            closed_at=get_dht_time(),
            eval_loss=self.node.status.loss if self.node.status.is_coordinator else None,
        )
        for _ in range(3):
            if await self.node.dht.put(manifest_key(self.run.run_id, round_no), manifest, MANIFEST_TTL_S):
                break
        else:
            logger.warning("could not publish the manifest of round %d; not applying it", round_no)
            return None
        missing = sorted(expected - set(subs))
        if missing:
            self.node.log_event("timeout", f"round {round_no} closed without {', '.join(p[-8:] for p in missing)}")
        return manifest

    def _expected(self, round_no: int, beats: list[Heartbeat]) -> set[str]:
        """Replicas the round waits for: every live trainer at this round or just finishing the last
        one (a slower peer still applying round r−1 is counted, not left behind every round)."""
        return {
            b.peer_id
            for b in beats
            if not b.is_coordinator
            and b.round in (round_no - 1, round_no)
            and b.phase in ("training", "exchanging", "idle")
            and not self.validator.banned(b.peer_id)
        }

    async def _submissions(self, round_no: int) -> dict[str, Submission]:
        found = await self.node.dht.get_all(submit_key(self.run.run_id, round_no), Submission)
        subs = {}
        for item in found:
            if item.record.peer_id != item.signer or item.record.round != round_no:
                continue
            if self.validator.banned(item.signer):
                continue
            subs[item.signer] = item.record
        return subs

    # ----- applying --------------------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> int:
        """Fetch the manifest's payloads, then decode and accumulate them one at a time in manifest
        order (memory O(params)), and let the mode take the outer step on the per-slot mean."""
        if manifest.base_hash != self.state.hash:
            raise Diverged(f"round {manifest.round} applies to state {manifest.base_hash[:12]}, ours is {self.state.hash[:12]}")
        blobs = await asyncio.gather(*(self._fetch(manifest, e) for e in manifest.entries))
        async with self.lock:
            if blobs:
                await asyncio.to_thread(self._apply_blobs, manifest, list(blobs))
            else:
                self.state.advance_without_update()
                self.coverage = {}
        return len(blobs)

    def _apply_blobs(self, manifest: Manifest, blobs: list[bytes]) -> None:
        acc = SlotMean(self.store.shapes)
        for entry, data in zip(manifest.entries, blobs):
            try:
                tensors = self.store.decode(data, sender=entry.peer_id, round_no=manifest.round)
            except Exception as e:  # undecodable: the manifest should never have listed it
                raise BadManifest(f"payload of {entry.peer_id[-8:]}: {e}") from None
            problem = check_scales(entry.scales, set(tensors))
            if problem is not None:
                raise BadManifest(f"entry of {entry.peer_id[-8:]}: {problem}")
            acc.add(tensors, entry.scales)
        coverage: dict[str, int] = {}
        for name, count in acc.counts.items():
            group = self.mode.slot_group(name)
            coverage[group] = max(coverage.get(group, 0), count)
        self.mode.outer_step(self.state, acc.mean())  # the state is untouched until every payload decoded
        self.coverage = coverage

    async def settle_round(self, round_no: int, reload: Callable[[], Awaitable[GlobalState]]) -> tuple[Manifest, int | None]:
        """Wait for round r's manifest and apply it: (manifest, payloads applied).

        A manifest on our state whose payloads cannot be had or decoded is its leader's fault: it is
        ignored and the wait goes on. If our state is not the manifest's base we have diverged: the
        state is reloaded and the count is None.
        """
        while True:
            manifest = await self.close_round(round_no)
            try:
                return manifest, await self.apply(manifest)
            except BadManifest as e:
                self.ignored.add((manifest.round, manifest.leader))
                self.node.log_event("reject", f"manifest of round {manifest.round} by {manifest.leader[-8:]} ignored: {e}")
            except Diverged as e:
                self.node.log_event("reload", f"{e}; reloading state")
                self.state = await reload()
                return manifest, None

    async def _fetch(self, manifest: Manifest, entry: ManifestEntry) -> bytes:
        holders = [entry.peer_id, manifest.leader] + [e.peer_id for e in manifest.entries if e is not entry]
        try:
            return await self.store.get(self.p2p, entry.digest, holders)
        except Exception as e:  # undeliverable: the manifest should never have listed it
            raise BadManifest(f"payload of {entry.peer_id[-8:]}: {e}") from None
