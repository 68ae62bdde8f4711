"""Signed manifests and shareable proof of equivocation.

A leader signs each manifest it publishes (`Manifest.proof`: RSA PKCS#1 v1.5 / SHA-256 over the
encoded manifest without its proof, with the key that is also its peer id and DHT owner marker).
Followers refuse a manifest whose proof does not verify against the key in its DHT subkey, so every
manifest a node acts on is a statement its signer cannot deny.

A node that sees one signer's manifest for a round change has two such statements: an
`Equivocation` record (both encoded manifests and the signer's owner marker). It publishes the
proofs it holds under the run's "evidence" key; every node reads them, checks each one itself
(`check_equivocation`) and excludes the accused from leading and from rounds. A forged or
mismatched proof convicts nobody: it needs the accused's private key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swarm.log import get_logger
from swarm.net.dht import Signed
from swarm.net.identity import Identity, peer_id_from_public_key, public_key_from_owner_marker, sign_bytes, verify_bytes
from swarm.net.records import Equivocation, Evidence, Manifest, run_key
from swarm.net.schema import SchemaError, decode_record, encode_record, record_limit
from swarm.round.world import monotonic

if TYPE_CHECKING:
    from swarm.round.world import World

logger = get_logger(__name__)
EVIDENCE_TTL_S = 24 * 3600
MAX_PUBLISHED = 4  # proofs per publisher record (each holds two manifests; records are size-bounded)
READ_EVERY_S = 5.0


def manifest_body(manifest: Manifest) -> bytes:
    """The bytes a manifest's proof signs: the manifest encoded without its proof."""
    return encode_record(dataclasses.replace(manifest, proof=b""))


def sign_manifest(identity: Identity, manifest: Manifest) -> Manifest:
    return dataclasses.replace(manifest, proof=sign_bytes(identity, manifest_body(manifest)))


def proof_ok(manifest: Manifest, owner: bytes, signer: str) -> bool:
    """Whether `manifest` carries a valid signature by the key in `owner`, which belongs to `signer`."""
    key = public_key_from_owner_marker(owner)
    if key is None or str(peer_id_from_public_key(key)) != signer or manifest.leader != signer:
        return False
    return bool(manifest.proof) and verify_bytes(key, manifest_body(manifest), manifest.proof)


def check_equivocation(item: Equivocation) -> str | None:
    """None if `item` proves its accused signed two different manifests for its round; else why not."""
    try:
        first, second = decode_record(Manifest, item.first), decode_record(Manifest, item.second)
    except SchemaError as e:
        return f"not manifests: {e}"
    if first.round != item.round or second.round != item.round:
        return "the manifests are not of the accused round"
    if manifest_body(first) == manifest_body(second):
        return "the two manifests are the same"
    for manifest in (first, second):
        if not proof_ok(manifest, item.owner, item.accused):
            return "a signature does not verify against the accused's key"
    return None


@dataclass
class EquivocationWitness:
    """Remembers the manifest each signer published for each recent round. A signer whose manifest
    for a round changes has signed two different ones: it is excluded for good, and the proof is
    kept to be published (`publish`); proofs published by others are checked and adopted (`read`)."""

    keep_rounds: int = 16
    seen: dict[tuple[int, str], Signed[Manifest]] = field(default_factory=dict)
    equivocators: set[str] = field(default_factory=set)
    proofs: dict[str, Equivocation] = field(default_factory=dict)
    unpublished: bool = False
    checked: set[str] = field(default_factory=set)  # digests of published proofs already checked
    read_at: float = float("-inf")

    def saw(self, round_no: int, signed: Signed[Manifest], node: World) -> None:
        """Note a manifest read from the DHT (its proof already verified)."""
        first = self.seen.setdefault((round_no, signed.signer), signed)
        again = first.record is signed.record or first.record == signed.record  # read again: no need to encode it
        if not again and manifest_body(first.record) != manifest_body(signed.record) and signed.signer not in self.equivocators:
            proof = Equivocation(round_no, signed.signer, signed.owner, encode_record(first.record), encode_record(signed.record))
            self._convict(proof, node, f"{signed.signer[-8:]} signed two different manifests for round {round_no}: excluded")
            self.unpublished = True
        for key in [k for k in self.seen if k[0] < round_no - self.keep_rounds]:
            del self.seen[key]

    def _convict(self, proof: Equivocation, node: World, text: str) -> None:
        self.equivocators.add(proof.accused)
        self.proofs[proof.accused] = proof
        node.log_event("equivocation", text)

    async def publish(self, node: World) -> None:
        """Publish the proofs we hold (the most recent few) if we found a new one."""
        if not self.unpublished:
            return
        items: list[Equivocation] = []
        for proof in sorted(self.proofs.values(), key=lambda p: p.round, reverse=True)[:MAX_PUBLISHED]:
            if len(encode_record(Evidence([proof, *items]))) <= record_limit(Evidence):  # proofs against large manifests
                items.insert(0, proof)
        if await node.dht.put(run_key(node.run.run_id, "evidence"), Evidence(items), EVIDENCE_TTL_S):
            self.unpublished = False

    async def read(self, node: World) -> None:
        """Check the proofs other nodes published (every few seconds) and adopt the valid ones."""
        now = monotonic()
        if now - self.read_at < READ_EVERY_S:
            return
        self.read_at = now
        for published in await node.dht.get_all(run_key(node.run.run_id, "evidence"), Evidence):
            for item in published.record.items:
                digest = hashlib.sha256(encode_record(item)).hexdigest()
                if item.accused in self.equivocators or digest in self.checked:
                    continue
                self.checked.add(digest)
                problem = check_equivocation(item)
                if problem is None:
                    self._convict(
                        item,
                        node,
                        f"{item.accused[-8:]} equivocated in round {item.round} (proof from {published.signer[-8:]}): excluded",
                    )
                else:  # a false accusation proves something about its publisher only
                    logger.warning("ignoring evidence from %s against %s: %s", published.signer[-8:], item.accused[-8:], problem)
