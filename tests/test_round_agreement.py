"""Who leads a round and which manifest counts: pure functions of what the DHT shows."""

from __future__ import annotations

from swarm.net.dht import Signed
from swarm.net.records import Heartbeat, Manifest, Phase
from swarm.round.evidence import EquivocationWitness
from swarm.round.leadership import agreed_hash, canonical_manifest, leader_rank, should_lead


def beat(pid: str, round_no: int, h: str, *, coordinator: bool = False, phase: Phase = "training") -> Heartbeat:
    return Heartbeat(pid, pid, "replica", "cpu", phase, round_no, 0.0, None, 0, 0, h, "0", 0.0, is_coordinator=coordinator)


def manifest(leader: str, round_no: int, base: str, signer: str | None = None) -> Signed[Manifest]:
    return Signed(signer or leader, Manifest(round_no, leader, base, [], [], 0.0), 0.0)


def leader_of(m: Manifest | None) -> str | None:
    return m.leader if m is not None else None


def test_agreed_state_is_the_majority_of_round_holders():
    beats = [
        beat("a", 4, "good"),
        beat("b", 4, "good"),
        beat("d", 4, "fork"),
        beat("e", 3, "old"),
        beat("f", 4, "x", phase="joining"),
    ]
    assert agreed_hash(4, beats, coordinator="c") == "good"
    assert agreed_hash(5, beats, coordinator="c") is None


def test_a_tie_goes_to_the_coordinators_state():
    beats = [beat("a", 4, "zzz"), beat("c", 4, "mmm", coordinator=True)]
    assert agreed_hash(4, beats, coordinator="c") == "mmm"
    assert agreed_hash(4, [beat("a", 4, "zzz"), beat("b", 4, "aaa")], coordinator="c") == "aaa"


def test_the_coordinator_ranks_first_then_a_per_round_hash_order():
    peers = [beat(p, 7, "h") for p in "abcdef"]
    coordinator = beat("c0", 7, "h")
    assert min([*peers, coordinator], key=lambda b: leader_rank(7, b.peer_id, "c0")) is coordinator
    firsts = {min(peers, key=lambda b: leader_rank(r, b.peer_id, "c0")).peer_id for r in range(40)}
    assert len(firsts) > 1, "leadership among peers should rotate with the round"


def test_claiming_to_be_the_coordinator_in_a_heartbeat_changes_nothing():
    liar = beat("zz", 7, "h", coordinator=True)
    honest = [beat(p, 7, "h", phase="exchanging") for p in "ab"]
    ranked = min([liar, *honest], key=lambda b: leader_rank(7, b.peer_id, "c0"))
    assert ranked.peer_id == min(["zz", "a", "b"], key=lambda p: leader_rank(7, p, "c0"))


def test_peers_lead_only_when_the_coordinator_lets_them():
    beats = [beat("c0", 7, "h", phase="coordinating"), beat("a", 7, "h", phase="exchanging")]
    assert should_lead("c0", 7, beats, "h", "c0", peers_may_lead=False)
    assert not should_lead("a", 7, beats, "h", "c0", peers_may_lead=False)
    assert should_lead("a", 7, beats, "h", "c0", peers_may_lead=True)


def test_a_live_coordinators_manifest_wins_and_others_wait_for_its_timeout():
    early = [manifest("p1", 3, "good")]  # a peer publishing before the coordinator's view ran out
    assert canonical_manifest(early, 3, coordinator="c", agreed="good", peers_may_lead=False) is None
    assert leader_of(canonical_manifest(early, 3, coordinator="c", agreed="good", peers_may_lead=True)) == "p1"
    both = [*early, manifest("c", 3, "good")]
    assert leader_of(canonical_manifest(both, 3, coordinator="c", agreed="good", peers_may_lead=True)) == "c"
    outsider = [manifest("x", 3, "good")]  # not admitted by the coordinator
    assert canonical_manifest(outsider, 3, coordinator="c", agreed="good", members={"c", "p1"}) is None


def test_canonical_manifest_needs_the_leaders_signature_and_the_agreed_base():
    found = [manifest("p1", 3, "fork"), manifest("p2", 3, "good"), manifest("c", 3, "good", signer="p3")]
    assert leader_of(canonical_manifest(found, 3, coordinator="c", agreed="good")) == "p2"
    assert canonical_manifest(found, 3, coordinator="c", agreed="other") is None
    assert leader_of(canonical_manifest([*found, manifest("c", 3, "good")], 3, coordinator="c", agreed="good")) == "c"
    assert canonical_manifest(found, 4, coordinator="c") is None


class _Node:
    def __init__(self) -> None:
        self.events: list[str] = []

    def log_event(self, kind: str, text: str) -> None:
        self.events.append(kind)


def test_two_different_manifests_from_one_signer_are_equivocation():
    witness = EquivocationWitness()
    node = _Node()
    first = manifest("p1", 3, "good")
    witness.saw(3, first, node)  # type: ignore[arg-type]
    witness.saw(3, first, node)  # type: ignore[arg-type]  # the same one again: fine
    assert not witness.equivocators
    witness.saw(3, manifest("p1", 3, "other"), node)  # type: ignore[arg-type]
    assert witness.equivocators == {"p1"} and node.events == ["equivocation"]
    proof = witness.proofs["p1"]
    assert proof.accused == "p1" and proof.round == 3 and witness.unpublished


def test_a_peer_led_manifest_needs_a_quorum_of_contributions_the_coordinators_does_not():
    from swarm.net.records import ManifestEntry
    from swarm.round.leadership import peer_quorum

    def listing(leader: str, n: int) -> Signed[Manifest]:
        entries = [ManifestEntry(f"p{i}", "d", 1) for i in range(n)]
        return Signed(leader, Manifest(3, leader, "good", entries, [], 0.0), 0.0)

    assert [peer_quorum(n) for n in (0, 1, 2, 3, 4, 5)] == [
        0,
        1,
        2,
        2,
        3,
        3,
    ]  # a strict majority: two manifests of a round cannot both have one
    alone = [listing("p1", 1)]
    assert canonical_manifest(alone, 3, coordinator="c", agreed="good", quorum=2) is None, "a leader alone decides nothing"
    assert leader_of(canonical_manifest([*alone, listing("p2", 2)], 3, coordinator="c", agreed="good", quorum=2)) == "p2"
    assert leader_of(canonical_manifest([listing("c", 0)], 3, coordinator="c", agreed="good", quorum=2)) == "c"


def test_a_coordinator_that_fell_behind_takes_the_round_its_peers_already_applied():
    """Peers lead while the coordinator does not hold the round's state. When it catches up, it must
    take their manifest if most of them applied it (publishing its own would fork the swarm), and
    otherwise lead as usual: a peer's manifest the others did not apply decides nothing."""
    from types import SimpleNamespace

    from swarm.round.agreement import RoundAgreement

    node = SimpleNamespace(peer_id="c", run=SimpleNamespace(coordinator="c"))
    agreement = RoundAgreement(node, None, None, SimpleNamespace(scored=False))  # type: ignore[arg-type]  # no probation: all have standing
    me = beat("c", 5, "h")
    assert agreement._peers_may_lead(5, [me], "h", started=None), "its first round after a (re)start: peers may have led it"
    agreement.returning = False  # it has settled a round since
    moved_on = [me, beat("a", 6, "n"), beat("b", 6, "n"), beat("d", 5, "h"), beat("j", 0, "", phase="joining")]
    assert agreement._peers_may_lead(5, moved_on, "h", started=None)
    assert agreement._lookup_quorum(5, moved_on) == 2  # a majority of the 3 trainers around round 5
    waiting = [me, beat("a", 5, "h"), beat("b", 6, "n"), beat("d", 5, "h")]
    assert not agreement._peers_may_lead(5, waiting, "h", started=None)


def test_peers_give_a_coordinator_one_round_behind_the_view_timeout_before_leading():
    """A coordinator still applying round r − 1 is not away: peers that led at once split the swarm
    when it caught up and published its own manifest (a 2-peer swarm, where one peer is a quorum).
    Absent, further behind or on another state, it is away; present, the view timeout still ends the wait."""
    import time
    from types import SimpleNamespace

    from swarm.round.agreement import RoundAgreement

    node = SimpleNamespace(peer_id="a", run=SimpleNamespace(coordinator="c", leader_timeout_s=27.5))
    agreement = RoundAgreement(node, None, None, None)  # type: ignore[arg-type]
    peers = [beat("a", 5, "h"), beat("b", 5, "h")]
    assert not agreement._peers_may_lead(5, [*peers, beat("c", 5, "h")], "h", started=None)
    assert not agreement._peers_may_lead(5, [*peers, beat("c", 4, "g")], "h", started=None)  # catching up
    assert agreement._peers_may_lead(5, peers, "h", started=None)  # away
    assert agreement._peers_may_lead(5, [*peers, beat("c", 3, "f")], "h", started=None)  # fell behind
    assert agreement._peers_may_lead(5, [*peers, beat("c", 5, "x")], "h", started=None)  # on another state
    assert agreement._peers_may_lead(5, [*peers, beat("c", 4, "g")], "h", started=time.monotonic() - 30)


def test_a_peer_led_manifest_counts_once_a_majority_endorses_it_and_two_faced_endorsers_do_not_count():
    """Consent, not a majority of payloads: a peer cut off from the rest can still list most payloads
    (it saw them before the cut). An endorser seen endorsing two manifests of a round counts for
    neither; ours counts at once; only members with standing count (docs/security.md)."""
    import asyncio
    from types import SimpleNamespace

    from swarm.net.records import Endorsement
    from swarm.round.agreement import RoundAgreement

    shown: list[Signed[Endorsement]] = []

    async def get_all(key, cls):
        return list(shown)

    events: list[str] = []
    node = SimpleNamespace(
        peer_id="a",
        run=SimpleNamespace(coordinator="c", run_id="r"),
        dht=SimpleNamespace(get_all=get_all),
        log_event=lambda kind, text: events.append(text),
    )
    agreement = RoundAgreement(node, None, None, SimpleNamespace(scored=False))  # type: ignore[arg-type]
    x, y = "1" * 64, "2" * 64

    def endorse(signer: str, digest: str) -> Signed[Endorsement]:
        return Signed(signer, Endorsement(round=5, peer_id=signer, leader="p", digest=digest), 0.0)

    electorate = agreement._electorate({"a", "b", "d", "e", "c"})
    assert electorate == {"a", "b", "d", "e"}  # the coordinator's manifests need no endorsement; it casts none
    agreement._partial = {"e"}  # a pipeline stage's heartbeat says it holds part of the state: it never endorses
    assert agreement._electorate({"a", "b", "d", "e", "c"}) == {"a", "b", "d"}
    agreement._partial = set()
    shown[:] = [endorse("b", x), endorse("d", y), endorse("z", x), Signed("e", Endorsement(5, "b", "p", x), 0.0)]
    assert asyncio.run(agreement._endorsements(5, electorate)) == {x: 1, y: 1}  # z is no member; e signed as b
    agreement._endorsed[5] = x
    assert asyncio.run(agreement._endorsements(5, electorate)) == {x: 2, y: 1}
    shown[:] = [endorse("b", x), endorse("d", x)]  # d changed its endorsement: neither counts
    assert asyncio.run(agreement._endorsements(5, electorate)) == {x: 2}
    assert any("endorsed two manifests" in e for e in events)

    def listing(leader: str) -> Signed[Manifest]:
        return Signed(leader, Manifest(5, leader, "good", [], [], 0.0), 0.0)

    found = [listing("p1"), listing("p2")]
    first = canonical_manifest(found, 5, coordinator="c", agreed="good")
    assert leader_of(first) in ("p1", "p2")
    other = next(m for m in found if m.record is not first)
    assert canonical_manifest(found, 5, coordinator="c", agreed="good", endorsed=lambda m: m is other) is other.record
    assert canonical_manifest(found, 5, coordinator="c", agreed="good", endorsed=lambda m: False) is None


def test_the_coordinator_closes_a_round_empty_when_no_live_peer_can_contribute():
    """A pipeline group alone that gave a round up sits it out (phase "joining") and waits for its
    manifest; the coordinator, seeing nobody who could still submit, closes it empty after the round
    timeout instead of waiting for ever. Banned trainers count as unable; anyone training does not."""
    from types import SimpleNamespace

    from swarm.round.agreement import RoundAgreement

    banned = {"x"}
    node = SimpleNamespace(peer_id="c", run=SimpleNamespace(coordinator="c"))
    agreement = RoundAgreement(node, None, None, SimpleNamespace(scored=False))  # type: ignore[arg-type]
    agreement.validator = SimpleNamespace(banned=lambda p: p in banned)  # type: ignore[assignment]
    me = beat("c", 5, "h")
    sitting = [beat(p, 5, "h", phase="joining") for p in ("s0", "s1", "s2", "s3")]
    assert agreement._nobody_admissible(5, [me, *sitting])
    assert agreement._nobody_admissible(5, [me, *sitting, beat("x", 5, "h")])  # and one banned trainer
    assert not agreement._nobody_admissible(5, [me, *sitting, beat("f", 5, "h")])  # someone trains: wait for it
    assert not agreement._nobody_admissible(5, [me])  # nobody at all: nothing to close a round for
    downloading = beat("j", -1, "", phase="joining")  # a joiner still fetching the state
    assert not agreement._nobody_admissible(5, [me, *sitting, downloading])  # an empty round would move its download
    node.peer_id = "a"
    assert not agreement._nobody_admissible(5, [me, *sitting])  # peers never close a round empty


def test_followers_look_less_often_as_the_swarm_grows_and_fetch_holders_skip_the_sender():
    """Each look reads every member's heartbeat: beyond 250 members a follower's interval grows so
    the swarm's looks stay near 250 a second. A payload's other holders are the manifest's other
    senders, in order (sliced from one list per manifest)."""
    from types import SimpleNamespace

    from swarm.net.records import Manifest, ManifestEntry
    from swarm.round.agreement import RoundAgreement

    node = SimpleNamespace(peer_id="a", run=SimpleNamespace(coordinator="c", leader_timeout_s=27.5))
    agreement = RoundAgreement(node, None, None, None)  # type: ignore[arg-type]
    assert agreement._follow_every(16) == agreement.follow_s == 1.0
    assert agreement._follow_every(250) == 1.0
    assert agreement._follow_every(1000) == agreement._follow_every(1000, watching=False) == 4.0
    node.run.leader_timeout_s = 455.0  # rounds of minutes: beyond 250 members, 8 full looks a view timeout
    assert agreement._follow_every(1000, watching=False) == 455.0 / 8 and agreement._follow_every(1000) == 4.0
    assert agreement._follow_every(250, watching=False) == 1.0  # at most 250 members nothing changes
    entries = [ManifestEntry(p, f"d{p}", 10) for p in ("p1", "p2", "p3")]
    manifest = Manifest(round=1, leader="c", base_hash="h", entries=entries, rejected=[], closed_at=0.0)
    assert agreement._other_senders(manifest, entries[1]) == ["p1", "p3"]
    assert agreement._other_senders(manifest, entries[0]) == ["p2", "p3"]
    stranger = ManifestEntry("p9", "d9", 10)
    assert agreement._other_senders(manifest, stranger) == ["p1", "p2", "p3"]


def test_while_peers_may_lead_only_the_best_ranked_few_look_at_a_leaders_pace():
    """Past the view timeout of a 1,000-member round every peer looked every 0.25 s (4,000 looks
    a second, each reading every heartbeat): now only the LEADER_PACE_RANKS best-ranked peers free
    to lead do; the rest look at the follower's interval and move up as those ahead go."""
    from types import SimpleNamespace

    from swarm.round.agreement import LEADER_PACE_RANKS, RoundAgreement
    from swarm.round.leadership import lead_place

    peers = [f"p{i}" for i in range(12)]
    beats = [beat(p, 5, "h", phase="exchanging") for p in peers] + [beat("c", 4, "h0", coordinator=True)]
    ranked = sorted(peers, key=lambda p: leader_rank(5, p, "c"))
    assert [lead_place(p, 5, beats, "h", "c") for p in ranked] == list(range(12))
    assert lead_place("c", 5, beats, "h", "c") is None and lead_place("gone", 5, beats, "h", "c") is None
    training = [beat(ranked[0], 5, "h")] + [b for b in beats if b.peer_id != ranked[0]]
    assert lead_place(ranked[1], 5, training, "h", "c") == 0  # the best-ranked one is busy: the next moves up
    assert should_lead(ranked[1], 5, training, "h", "c", True)

    def next_in_line(me: str) -> bool:
        node = SimpleNamespace(peer_id=me, run=SimpleNamespace(coordinator="c"))
        agreement = RoundAgreement(node, None, None, None)  # type: ignore[arg-type]
        agreement.validator = SimpleNamespace(with_standing=set)  # type: ignore[assignment]
        return agreement._next_in_line(5, beats, "h")

    assert [next_in_line(p) for p in ranked] == [True] * LEADER_PACE_RANKS + [False] * (12 - LEADER_PACE_RANKS)
    assert not next_in_line("c")  # the coordinator looks at its own pace anyway


def test_a_follower_of_a_large_swarm_reads_only_the_manifests_between_looks():
    """Beyond 250 members a follower's full looks are R / 250 s apart; between them it reads the
    round's manifest key every second and looks again as soon as a manifest appears."""
    import asyncio
    from types import SimpleNamespace

    from swarm.round.agreement import RoundAgreement

    reads: list[float] = []
    shown: list[Signed[Manifest]] = []

    async def get_all(key: str, cls: type) -> list[Signed[Manifest]]:
        reads.append(asyncio.get_running_loop().time())
        return list(shown)

    async def members() -> set[str]:
        return {"c", "m"}

    run = SimpleNamespace(coordinator="c", run_id="r")
    node = SimpleNamespace(peer_id="a", run=run, dht=SimpleNamespace(get_all=get_all), members=members)
    agreement = RoundAgreement(node, None, None, None)  # type: ignore[arg-type]
    agreement.follow_s = 0.01
    valid: set[str] = {"c", "m"}  # whose proofs check out (the signature itself is evidence.py's, tested there)
    agreement._signed_by_leader = lambda m: m.signer in valid and m.record.proof == b"ok"  # type: ignore[method-assign, assignment]

    def signed(leader: str, proof: bytes = b"ok", expires_at: float = 0.0) -> Signed[Manifest]:
        return Signed(leader, Manifest(5, leader, "h", [], [], 0.0, proof=proof), expires_at)

    async def follow(interval: float, appear: list[Signed[Manifest]]) -> float:
        loop = asyncio.get_running_loop()
        if appear:
            loop.call_later(0.05, shown.extend, appear)
        start = loop.time()
        await agreement._follow(5, interval)
        return loop.time() - start

    assert asyncio.run(follow(0.01, [])) >= 0.01 and reads == []  # a small swarm: a plain sleep
    waited = asyncio.run(follow(0.3, []))
    assert waited >= 0.3 and len(reads) >= 5  # the whole interval, reading only the manifests
    reads.clear()
    # A stranger's manifest, a member's with a bad proof, and a refused leader's do not wake it ...
    agreement.ignored.add((5, "m"))
    assert asyncio.run(follow(0.3, [signed("x"), signed("c", proof=b"forged")])) >= 0.3
    assert asyncio.run(follow(0.3, [signed("m")])) >= 0.3
    agreement.ignored.clear()
    shown.clear()
    # ... the coordinator's does, at once; the same manifest stored again later does not.
    assert asyncio.run(follow(5.0, [signed("c")])) < 2.0
    shown[:] = [signed("c", expires_at=99.0)]
    assert asyncio.run(follow(0.3, [])) >= 0.3
    # What the last full look read counts as seen: a follower never waits out an interval on it.
    agreement._read_manifests = (5, frozenset())
    assert asyncio.run(follow(5.0, [])) < 2.0
