# mypy: disable-error-code="method-assign"
"""A hostile volunteer: `python -m tests.adversary.hostile ATTACK ADDRESS [join-swarm args]`.

It joins like anyone (it is admitted and gets a role), then misbehaves in one way:
  sign-flip        sends its pseudo-gradient × −1000 (well-formed poison)
  noise            sends Gaussian noise × 1000 the size of its pseudo-gradient
  zero             sends an all-zero update (a free rider)
  usurp            publishes its own manifest for every round at once, listing only itself
  stall            publishes an empty manifest for every round at once
  junk-manifests   publishes manifests for the next 20 rounds on made-up states
  claim-coordinator  says it is the coordinator in every heartbeat (and never leads)
  copy             submits another peer's payload, re-encoded under its own name
  equivocate       publishes two different signed manifests for every round, a few seconds apart
  idle             says it is training every round but never submits (a free delay)
  slow-serve       submits every round but serves its payload only after an hour
  malformed        each round sends a differently broken payload (truncated, unknown version, NaN or
                   absurd quantisation table, out-of-range indices, wrong shape), cycling
  diverge          after the first round it applies, silently perturbs its copy of the global weights
Each attack is a small patch of the honest peer's code; everything else is join-swarm.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import sys

import torch
from hivemind.utils import get_dht_time

from launch import join
from swarm.codec import PayloadError, PayloadMeta, SparseLoCoCompressor, encode_payload, inline_digest, payload_digest
from swarm.modes import replica
from swarm.net.dht import SwarmDHT
from swarm.net.records import Manifest, ManifestEntry, Submission, manifest_key, submit_key
from swarm.processes import volunteer as peer
from swarm.round import agreement as rounds
from swarm.round import payloads as exchange
from swarm.round.evidence import sign_manifest

ATTACKS = [
    "sign-flip",
    "noise",
    "zero",
    "usurp",
    "stall",
    "junk-manifests",
    "claim-coordinator",
    "copy",
    "equivocate",
    "idle",
    "slow-serve",
    "malformed",
    "diverge",
]
MALFORMED = ["truncated", "version", "nan-table", "huge-table", "bad-index", "wrong-shape"]
say = lambda text: print(f"hostile: {text}", file=sys.stderr, flush=True)  # noqa: E731


def poison(kind: str) -> None:
    original = replica.Replica.train_round

    def train_round(self, state, stop=None):
        work = original(self, state, stop)
        if work is not None:
            if kind == "sign-flip":
                work.delta = {n: d * -1000 for n, d in work.delta.items()}
            elif kind == "noise":
                work.delta = {n: torch.randn_like(d) * d.std() * 1000 for n, d in work.delta.items()}
            else:
                work.delta = {n: torch.zeros_like(d) for n, d in work.delta.items()}
            say(f"round {state.round}: sending a {kind} update")
        return work

    replica.Replica.train_round = train_round
    # It trains on from the agreed state, not from its own poison (an overlapped peer's next start).
    peer.Peer._next_base = lambda self, state, encoded, r: None


def publish_manifests(kind: str) -> None:
    """Patch close_round: before waiting like everyone, publish our own manifest(s)."""
    original = rounds.RoundAgreement.close_round

    async def close_round(self, round_no):
        me, run = self.node.peer_id, self.run
        targets = range(round_no, round_no + 20) if kind == "junk-manifests" else [round_no]
        for r in targets:
            entries = []
            base = secrets.token_hex(16) if kind == "junk-manifests" else self.state.hash
            if kind == "usurp":
                subs = await self.node.dht.get_all(submit_key(run.run_id, r), Submission)
                entries = [ManifestEntry(s.signer, s.record.digest, s.record.size) for s in subs if s.signer == me]
            manifest = sign_manifest(self.node.dht.identity, Manifest(r, me, base, entries, [], get_dht_time()))
            await self.node.dht.put(manifest_key(run.run_id, r), manifest, 3600)
        say(f"round {round_no}: published {kind} manifest(s)")
        return await original(self, round_no)

    rounds.RoundAgreement.close_round = close_round


def equivocate() -> None:
    """While waiting like everyone, sign one manifest for the round, then a different one. The two go
    out in the background: an equivocator that paused its own loop for them fell behind the swarm
    and from then on published for rounds nobody was reading any more, so nobody could catch it."""
    original = rounds.RoundAgreement.close_round
    pending: set[asyncio.Task] = set()

    async def publish_two(self, round_no):
        key = manifest_key(self.run.run_id, round_no)
        for variant in range(2):
            manifest = Manifest(round_no, self.node.peer_id, self.state.hash, [], [], get_dht_time() + variant)
            await self.node.dht.put(key, sign_manifest(self.node.dht.identity, manifest), 3600 + variant)
            await asyncio.sleep(3.0)
        say(f"round {round_no}: published two different manifests")

    async def close_round(self, round_no):
        task = asyncio.create_task(publish_two(self, round_no))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return await original(self, round_no)

    rounds.RoundAgreement.close_round = close_round


def idle() -> None:
    """Heartbeats say 'training' then 'exchanging', but no submission is ever stored."""
    original = SwarmDHT.put

    async def put(self, key, record, ttl_s):
        if isinstance(record, Submission):
            say(f"round {record.round}: pretending to have submitted")
            return True
        return await original(self, key, record, ttl_s)

    SwarmDHT.put = put


def slow_serve() -> None:
    original = exchange.PayloadStore.serve

    async def serve(self, request):
        say("holding a payload request for an hour")
        await asyncio.sleep(3600)
        return await original(self, request)

    exchange.PayloadStore.serve = serve


def claim_coordinator() -> None:
    original = peer.Peer.main

    async def main(self):
        self.status.is_coordinator = True
        say("claiming to be the coordinator")
        await original(self)

    peer.Peer.main = main
    original_lead = rounds.RoundAgreement._should_lead

    async def never_lead(self, *args, **kwargs):
        return False if self.node.status.is_coordinator else await original_lead(self, *args, **kwargs)

    rounds.RoundAgreement._should_lead = never_lead


def copy_others() -> None:
    """Replace our payload by another member's payload of the same round, re-encoded as ours."""
    loop_box: list[asyncio.AbstractEventLoop] = []
    nodes: list[peer.Peer] = []
    original_main = peer.Peer.main

    async def main(self):
        loop_box.append(asyncio.get_running_loop())
        nodes.append(self)
        await original_main(self)

    async def someone_elses(node: peer.Peer, round_no: int) -> dict[str, torch.Tensor] | None:
        for _ in range(200):
            subs = await node.dht.get_all(submit_key(node.run.run_id, round_no), Submission)
            others = [s for s in subs if s.signer != node.peer_id]
            if others:
                victim = min(others, key=lambda s: s.signer)
                data = await node.store.get(victim.record.digest, [victim.signer])
                say(f"round {round_no}: copying the payload of {victim.signer[-8:]}")
                return node.store.decode(data, sender=victim.signer, round_no=round_no)
            await asyncio.sleep(0.1)
        return None

    def encode(self, delta, round_no):  # runs in a worker thread: hop back onto the event loop
        stolen = asyncio.run_coroutine_threadsafe(someone_elses(nodes[0], round_no), loop_box[0]).result(timeout=60)
        if stolen is None:
            return original_encode(self, delta, round_no)
        config = self.compressor.config
        meta = PayloadMeta.for_sparseloco(config, run_id=self.run.run_id, round=round_no, sender=self.sender)
        fresh = SparseLoCoCompressor(config)
        data = encode_payload(meta, {n: fresh.compress(n, t) for n, t in stolen.items()})
        return exchange.Encoded(data, payload_digest(data))

    original_encode = exchange.PayloadEncoder.encode
    peer.Peer.main = main
    exchange.PayloadEncoder.encode = encode


def malformed() -> None:
    """Patch the encoder: every round's payload is broken in the next of MALFORMED's ways."""
    original = exchange.PayloadEncoder.encode

    def encode(self, delta, round_no):
        fault = MALFORMED[round_no % len(MALFORMED)]
        good = original(self, delta, round_no)
        if fault == "truncated":
            data = good.data[: len(good.data) // 2]
        elif fault == "version":
            data = good.data[:3] + bytes([99]) + good.data[4:]
        else:
            meta = PayloadMeta.for_sparseloco(self.compressor.config, run_id=self.run.run_id, round=round_no, sender=self.sender)
            fresh = SparseLoCoCompressor(self.compressor.config)
            tensors = {n: fresh.compress(n, d) for n, d in delta.items()}
            name = sorted(tensors)[0]
            t = tensors[name]
            if fault == "nan-table":
                sections = (struct.pack("<4f", *([float("nan")] * 4)), *t.sections[1:])
            elif fault == "huge-table":
                sections = (struct.pack("<4f", *([1e30] * 4)), *t.sections[1:])
            elif fault == "bad-index":
                sections = (*t.sections[:-1], b"\xff" * len(t.sections[-1]))
            else:  # wrong-shape: a tensor of another shape under a real name
                wrong = fresh.compress("x", torch.randn(3, 5))
                sections, t = wrong.sections, wrong
            tensors[name] = type(t)(t.codec, t.shape, sections, t.params)
            data = encode_payload(meta, tensors)
        say(f"round {round_no}: sending a {fault} payload")
        try:
            digest = payload_digest(data)
        except PayloadError:  # not even framed: all it can announce is the bytes' sha256
            digest = inline_digest(data)
        return exchange.Encoded(data, digest)

    exchange.PayloadEncoder.encode = encode


def diverge() -> None:
    """Patch apply: once, after the first round we apply (whenever we joined), nudge our weights."""
    original = rounds.RoundAgreement.apply
    perturbed: list[int] = []

    async def apply(self, manifest):
        applied = await original(self, manifest)
        if not perturbed:
            perturbed.append(manifest.round)
            with torch.no_grad():
                next(iter(self.state.params.values())).add_(1e-3)
            self.state.invalidate_hash()
            say("perturbed our global weights")
        return applied

    rounds.RoundAgreement.apply = apply


if __name__ == "__main__":
    attack, args = sys.argv[1], sys.argv[2:]
    if attack in ("sign-flip", "noise", "zero"):
        poison(attack)
    elif attack in ("usurp", "stall", "junk-manifests"):
        publish_manifests(attack)
    elif attack == "claim-coordinator":
        claim_coordinator()
    elif attack == "copy":
        copy_others()
    elif attack == "equivocate":
        equivocate()
    elif attack == "idle":
        idle()
    elif attack == "slow-serve":
        slow_serve()
    elif attack == "malformed":
        malformed()
    elif attack == "diverge":
        diverge()
    else:
        raise SystemExit(f"unknown attack {attack!r}; one of {', '.join(ATTACKS)}")
    sys.exit(join.main(args))
