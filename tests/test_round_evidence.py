"""Signed manifests and equivocation proofs: anyone can check one, nobody can forge one."""

from __future__ import annotations

import dataclasses

import pytest

from swarm.net.dht import Signed
from swarm.net.identity import Identity
from swarm.net.records import Equivocation, Manifest, ManifestEntry
from swarm.net.schema import encode_record
from swarm.round.evidence import EquivocationWitness, check_equivocation, proof_ok, sign_manifest


@pytest.fixture(scope="module")
def keys() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def signed(identity: Identity, base: str, round_no: int = 5) -> Manifest:
    leader = str(identity.peer_id)
    entries = [ManifestEntry("peer-a", "d" * 64, 100, scales={"w": 0.5})]
    return sign_manifest(identity, Manifest(round_no, leader, base, entries, [], 12.5))


def proof(identity: Identity, first: Manifest, second: Manifest, round_no: int = 5) -> Equivocation:
    return Equivocation(round_no, str(identity.peer_id), identity.owner_marker, encode_record(first), encode_record(second))


def test_a_signed_manifest_verifies_only_for_its_signer_and_content(keys):
    alice, bob = keys
    m = signed(alice, "good")
    assert proof_ok(m, alice.owner_marker, str(alice.peer_id))
    assert not proof_ok(m, bob.owner_marker, str(bob.peer_id)), "another key"
    assert not proof_ok(m, bob.owner_marker, str(alice.peer_id)), "a key that is not the signer's"
    assert not proof_ok(dataclasses.replace(m, base_hash="evil"), alice.owner_marker, str(alice.peer_id)), "edited content"
    assert not proof_ok(dataclasses.replace(m, proof=b""), alice.owner_marker, str(alice.peer_id)), "no proof"
    assert not proof_ok(m, b"[owner:garbage]", str(alice.peer_id))


def test_two_signed_manifests_for_one_round_prove_equivocation(keys):
    alice, _ = keys
    assert check_equivocation(proof(alice, signed(alice, "good"), signed(alice, "other"))) is None


def test_forged_or_empty_accusations_convict_nobody(keys):
    alice, bob = keys
    a1, a2 = signed(alice, "good"), signed(alice, "other")
    assert "same" in (check_equivocation(proof(alice, a1, a1)) or "")
    forged = dataclasses.replace(a2, proof=signed(bob, "other").proof)  # bob cannot sign for alice
    assert "signature" in (check_equivocation(proof(alice, a1, forged)) or "")
    assert "round" in (check_equivocation(proof(alice, a1, signed(alice, "other", round_no=6))) or "")
    framed = Equivocation(5, str(alice.peer_id), bob.owner_marker, encode_record(a1), encode_record(a2))
    assert check_equivocation(framed) is not None, "the key must be the accused's"
    assert "not manifests" in (check_equivocation(dataclasses.replace(proof(alice, a1, a2), first=b"\x00junk")) or "")


class _Node:
    def __init__(self) -> None:
        self.events: list[str] = []

    def log_event(self, kind: str, text: str) -> None:
        self.events.append(kind)


def test_the_witness_builds_a_proof_others_can_check(keys):
    alice, _ = keys
    witness, node = EquivocationWitness(), _Node()
    owner = alice.owner_marker
    witness.saw(5, Signed(str(alice.peer_id), signed(alice, "good"), 0.0, owner), node)  # type: ignore[arg-type]
    witness.saw(5, Signed(str(alice.peer_id), signed(alice, "other"), 0.0, owner), node)  # type: ignore[arg-type]
    assert witness.equivocators == {str(alice.peer_id)}
    assert check_equivocation(witness.proofs[str(alice.peer_id)]) is None


def test_evidence_against_large_manifests_is_published_as_far_as_it_fits():
    """Proofs carry both manifests whole: against 1,000-entry manifests one proof takes most of an
    Evidence record, so a witness publishes the newest proofs that fit instead of failing every time."""
    import asyncio
    import hashlib
    from types import SimpleNamespace

    from swarm.net.records import Equivocation, Evidence, Manifest, ManifestEntry
    from swarm.net.schema import encode_record, record_limit
    from swarm.round.evidence import EquivocationWitness

    ids = sorted(f"Qm{hashlib.sha256(str(i).encode()).hexdigest()[:44]}" for i in range(1000))
    scales = {f"blocks.{j}.mlp.weight": 0.5 for j in range(20)}  # 20 clipped tensors each: about 800 KB
    big = encode_record(Manifest(3, ids[0], "h", [ManifestEntry(p, "d" * 64, 1, scales) for p in ids], [], 0.0))
    witness = EquivocationWitness()
    for r, accused in enumerate(("a", "b", "c")):
        witness.proofs[accused] = Equivocation(r, accused, b"", big, big + b"")
    witness.unpublished = True
    stored: list[Evidence] = []

    async def put(key: str, record: Evidence, ttl: float) -> bool:
        stored.append(record)
        return len(encode_record(record)) <= record_limit(Evidence)

    node = SimpleNamespace(run=SimpleNamespace(run_id="r"), dht=SimpleNamespace(put=put))
    asyncio.run(witness.publish(node))
    assert not witness.unpublished and stored
    assert [p.accused for p in stored[-1].items] == ["c"]  # the newest proof, alone: two would not fit
