"""Who leads a round and which manifest counts: pure functions of what the DHT shows."""

from __future__ import annotations

from swarm.net.dht import Signed
from swarm.net.records import Heartbeat, Manifest
from swarm.rounds import agreed_hash, canonical_manifest, leader_rank


def beat(pid: str, round_no: int, h: str, *, coordinator: bool = False, phase: str = "training") -> Heartbeat:
    return Heartbeat(pid, pid, "replica", "cpu", phase, round_no, 0.0, None, 0, 0, h, "0", 0.0, is_coordinator=coordinator)


def manifest(leader: str, round_no: int, base: str, signer: str | None = None) -> Signed[Manifest]:
    return Signed(signer or leader, Manifest(round_no, leader, base, [], [], 0.0), 0.0)


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
    coordinator = beat("c0", 7, "h", coordinator=True)
    assert min([*peers, coordinator], key=lambda b: leader_rank(7, b)) is coordinator
    firsts = {min(peers, key=lambda b: leader_rank(r, b)).peer_id for r in range(40)}
    assert len(firsts) > 1, "leadership among peers should rotate with the round"


def test_canonical_manifest_needs_the_leaders_signature_and_the_agreed_base():
    found = [manifest("p1", 3, "fork"), manifest("p2", 3, "good"), manifest("c", 3, "good", signer="p3")]
    assert canonical_manifest(found, 3, coordinator="c", agreed="good").leader == "p2"
    assert canonical_manifest(found, 3, coordinator="c", agreed="other") is None
    assert canonical_manifest([*found, manifest("c", 3, "good")], 3, coordinator="c", agreed="good").leader == "c"
    assert canonical_manifest(found, 4, coordinator="c") is None
