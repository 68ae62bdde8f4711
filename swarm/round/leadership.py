"""Who leads a round and which manifest counts: pure functions of what the DHT shows.

Only admitted peers (the coordinator's signed roster) and the coordinator count. The coordinator is
known by the peer id in the run description, never by what a heartbeat claims. While it is live and
holds the agreed state it leads, and its manifest is the only one followers take; a peer may lead
(and followers take its manifest) only once the coordinator has been silent for a view timeout, so a
peer cannot usurp a round the coordinator is about to close, and a coordinator that hangs cannot
stall the swarm. Among peers, candidates rank by sha256(round, peer id), so leadership rotates.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable

from swarm.net.dht import Signed
from swarm.net.records import Heartbeat, Manifest

FREE_PHASES = ("exchanging", "idle", "coordinating")  # a node in its inner steps cannot close a round


@functools.lru_cache(maxsize=1 << 16)
def leader_rank(round_no: int, peer_id: str, coordinator: str) -> tuple[int, str]:
    """Sort key of round r's leader candidates: the coordinator first, then by sha256(r, peer id)
    (kept: every node of a simulated swarm ranks the same members at each look)."""
    return (0 if peer_id == coordinator else 1, hashlib.sha256(f"{round_no}:{peer_id}".encode()).hexdigest())


def agreed_hash(round_no: int, beats: list[Heartbeat], coordinator: str) -> str | None:
    """The state most live holders of round r report; ties go to the coordinator's, then the smallest.

    `beats` should be the admitted peers' only. A node that diverged can never lead the swarm onto
    its fork: it follows, sees the mismatch and reloads.
    """
    votes = Counter(b.param_hash for b in beats if b.round == round_no and b.param_hash and b.phase != "joining")
    if not votes:
        return None
    coordinator_hash = next((b.param_hash for b in beats if b.peer_id == coordinator and b.round == round_no), None)
    return min(votes, key=lambda h: (-votes[h], h != coordinator_hash, h))


def coordinator_present(round_no: int, beats: list[Heartbeat], coordinator: str, agreed: str | None) -> bool:
    """Whether a live coordinator will close round r: it holds the round's agreed state, or it is
    one round behind (still applying round r − 1; it catches up within moments). Peers that led at
    once when it was one round behind split the swarm: the coordinator, caught up, published its
    own manifest of the round beside theirs (seen in a 2-peer swarm, where one peer is a quorum)."""
    return any(
        b.peer_id == coordinator and (b.round == round_no - 1 or (b.round == round_no and b.param_hash == agreed)) for b in beats
    )


def canonical_manifest(
    found: list[Signed[Manifest]],
    round_no: int,
    coordinator: str,
    agreed: str | None = None,
    *,
    members: set[str] | None = None,
    peers_may_lead: bool = True,
    quorum: int = 0,
    standing: Callable[[str], bool] | None = None,
    endorsed: Callable[[Signed[Manifest]], bool] | None = None,
) -> Manifest | None:
    """Of the manifests published for a round, the one to apply: the coordinator's if there is one;
    else, when peers may lead (the coordinator is away or its view timed out), the best-ranked
    admitted leader's that lists at least `quorum` contributions (so a peer that leads cannot decide
    a round alone) and, given `standing`, whose leader and every contribution have standing (no
    newcomer's unscored work, no newcomer leading). Given `endorsed`, a peer's manifest counts only
    once endorsed (by a strict majority of the members with standing: agreement.py), and the
    best-ranked endorsed one is taken. Only manifests signed by their leader and built on the agreed
    state count."""
    valid = [m for m in found if m.record.leader == m.signer and m.record.round == round_no]
    if members is not None:
        valid = [m for m in valid if m.signer in members or m.signer == coordinator]
    if agreed is not None:
        valid = [m for m in valid if m.record.base_hash == agreed]
    ours = [m for m in valid if m.signer == coordinator]
    if ours:
        return ours[0].record
    valid = [m for m in valid if len(m.record.entries) >= quorum]
    if standing is not None:
        valid = [m for m in valid if standing(m.signer) and all(standing(e.peer_id) for e in m.record.entries)]
    if endorsed is not None:
        valid = [m for m in valid if endorsed(m)]
    if not valid or not peers_may_lead:
        return None
    return min(valid, key=lambda m: leader_rank(round_no, m.signer, coordinator)).record


def should_lead(
    me: str, round_no: int, beats: list[Heartbeat], agreed: str | None, coordinator: str, peers_may_lead: bool
) -> bool:
    """Whether `me` (holding the agreed state of round r, free to lead) closes the round now. A peer
    that others cannot dial (behind NAT: `reachable` false) never leads: followers could not fetch from it."""
    if me == coordinator:
        return True
    if not peers_may_lead:
        return False
    return lead_place(me, round_no, beats, agreed, coordinator) == 0


def lead_place(me: str, round_no: int, beats: list[Heartbeat], agreed: str | None, coordinator: str) -> int | None:
    """How many peers free to lead round r rank before `me` (None: `me` is not one of them). Only
    the first few need to look at the round at a leader's pace while peers may lead: the rest take
    a turn only after those are gone, and a look reads every member's heartbeat."""
    holders = [
        b
        for b in beats
        if b.peer_id != coordinator and b.round == round_no and b.param_hash == agreed and b.phase in FREE_PHASES and b.reachable
    ]
    if not any(b.peer_id == me for b in holders):
        return None
    mine = leader_rank(round_no, me, coordinator)
    return sum(leader_rank(round_no, b.peer_id, coordinator) < mine for b in holders)


def peer_quorum(trainers: int) -> int:
    """Contributions a peer-led manifest must list: a strict majority of the round's live trainers
    with standing (so two manifests of one round cannot both have one, and a colluding minority
    cannot make one of its own: 2 of 3, 3 of 4, 4 of 6)."""
    return trainers // 2 + 1 if trainers > 0 else 0
