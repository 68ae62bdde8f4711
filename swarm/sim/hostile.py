"""Hostile peers for the simulator: the attacks of tests/adversary/, at sizes real processes cannot reach.

Each is a `SimPeer` that deviates in one way. The round code they run against is the production
one, so what an attack gets in the simulator is what it gets in a real swarm, up to the network
model. `ATTACKS` maps the names used by `swarm-sim --attack NAME` and `SimConfig.attackers`.
"""

from __future__ import annotations

import asyncio
import hashlib

import torch

from swarm.net.records import Endorsement, Manifest, ManifestEntry, endorse_key, manifest_key
from swarm.net.schema import encode_record
from swarm.net.transfer import TransferError
from swarm.round.admission import MAX_PAID_HARM
from swarm.round.evidence import sign_manifest
from swarm.round.leadership import peer_quorum
from swarm.round.payloads import Encoded, PayloadEncoder
from swarm.round.robust import clip_scales, summarise
from swarm.sim.peer import SimPeer


class Idle(SimPeer):
    """Says it trains (heartbeats at the round) but never submits: a free delay for every leader
    that waits for it."""

    honest = False

    async def one_round(self) -> None:
        node, r = self.node, self.agreement.state.round
        node.status.round, node.status.param_hash, node.status.phase = r, self.agreement.state.hash, "training"
        await node.publish_heartbeat()
        await self.settle(r)


class Ahead(SimPeer):
    """Trains and submits honestly, but every heartbeat claims a round past its real one with a
    made-up state: enough of them make the round look settled without the others. Honest peers do
    not believe trainers while the coordinator is live; the coordinator waits one view timeout for
    the manifest they claim, then leads and stops counting them."""

    honest = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        publish = self.node.publish_heartbeat

        async def claim_ahead() -> None:
            s = self.node.status
            real = s.round, s.param_hash
            s.round, s.param_hash = real[0] + 1, hashlib.sha256(f"ahead {real[0]}".encode()).hexdigest()
            try:
                await publish()
            finally:
                s.round, s.param_hash = real

        self.node.publish_heartbeat = claim_ahead  # type: ignore[method-assign]


class SlowServe(SimPeer):
    """Submits, then never delivers its payload: a fetch from it hangs until the fetcher gives up."""

    honest = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.network.hanging.add(self.peer_id)


class SignFlip(SimPeer):
    """Sends its honest update times −1000."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        return {n: t.mul(-1000.0) for n, t in self.pseudo_gradient(r).items()}


class Noise(SimPeer):
    """Sends noise a thousand times the size of an honest update."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        g = torch.Generator().manual_seed(self.rng.getrandbits(62))
        return {n: torch.randn(t.shape, generator=g).mul_(1.0) for n, t in self.pseudo_gradient(r).items()}


class Zero(SimPeer):
    """A free rider: sends nothing useful (all zeros)."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        return {n: torch.zeros_like(t) for n, t in self.pseudo_gradient(r).items()}


class Evade(SimPeer):
    """Stays above a cosine cut: mostly against its own honest update (−0.85 of it), plus enough of
    the swarm's last step (which everyone can compute: θ(r−1) − θ(r)) to look aligned with the rest."""

    honest = False

    previous: dict[str, torch.Tensor] | None = None  # θ of the last round we worked on

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        own = self.pseudo_gradient(r)
        now = self.agreement.state.params
        last = {n: self.previous[n] - t for n, t in now.items()} if self.previous is not None else {}
        self.previous = {n: t.clone() for n, t in now.items()}
        out = {}
        for name, t in own.items():
            along = last.get(name)
            push = along * (t.norm() / along.norm()) if along is not None and along.norm() > 0 else torch.zeros_like(t)
            out[name] = -0.85 * t + 0.5 * push
        return out


class Shrink(SimPeer):
    """Sends its honest update × 0.01: it lowers the loss (so a loss probe accepts it), and with half
    the identities it would set a lower-median clip threshold and dilute the mean, which divides by
    the number of contributions."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        return {n: t.mul(0.01) for n, t in self.pseudo_gradient(r).items()}


class Copy(SimPeer):
    """A free rider: waits for an honest peer's payload of the round, takes 80% of its entries (its
    values and positions) and fills the rest from its own update, re-encoded under its own name."""

    honest = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.copied: list[int] = []  # the rounds it found a payload to copy

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        for _ in range(40):
            subs = await self.agreement._submissions(r)
            victims = sorted(p for p, sub in subs.items() if p != self.peer_id and sub.base_hash == base)
            if victims:
                try:
                    data = await self.store.get(subs[victims[0]].digest, [victims[0]])
                except TransferError:  # the victim is out of reach (a partition, a crash): look again
                    await asyncio.sleep(0.25)
                    continue
                theirs = self.store.decode(data, sender=victims[0], round_no=r)
                own = self.store.decode(encoded.data, sender=self.peer_id, round_no=r)
                g = torch.Generator().manual_seed(r)
                mixed = {}
                for name, t in theirs.items():
                    take = (torch.rand(t.shape, generator=g) < 0.8) & (t != 0)
                    # Their values outrank ours, so a fresh encoder's top-k keeps every one taken
                    # and fills the rest of the budget from our own update.
                    mixed[name] = torch.where(take, t, own[name] * (t == 0) * 1e-3)
                encoded = PayloadEncoder(self.run, self.peer_id).encode(mixed, r)
                self.copied.append(r)
                break
            await asyncio.sleep(0.25)
        await super().submit(r, encoded, base)


class SpendCredit(SimPeer):
    """Earns credit with honest work, then spends it: whenever its ledger (every node counts credit
    from the coordinator's manifests) shows credit, it sends its honest update flipped and scaled so
    that the harm measured should just fit what a paid harm may be (its credit, at most 1% of the
    loss), judged from the gain its last honest share was measured for. A harm within that is
    applied and debited (swarm/round/admission.py): the rounds it spends in make less progress.
    It waits for standing first (a newcomer's harm is never paid for). Refused once its credit is
    gone, it turns honest again and earns anew."""

    honest = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.last_gain = 0.0  # what its last applied honest share was measured to gain
        self.spent: list[int] = []  # rounds it sent a harmful share in
        self.scores: list[tuple[int, float, bool]] = []  # (round, its share's score, applied) from the manifests
        self._spending = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        own = self.pseudo_gradient(r)
        ledger = self.agreement.validator
        credit = ledger.credit.get(self.peer_id, 0.0)  # a newcomer's harm is never paid for: standing first
        self._spending = credit > 0 and self.last_gain > 0 and ledger.standing(self.peer_id)
        if not self._spending:
            return own
        self.spent.append(r)
        scale = 0.9 * min(credit, MAX_PAID_HARM) / self.last_gain  # harm grows about as the share's size
        return {n: t.mul(-scale) for n, t in own.items()}

    async def settle(self, r: int) -> tuple[Manifest | None, int | None]:
        manifest, applied = await super().settle(r)
        gain = manifest.scores.get(self.peer_id) if manifest is not None else None
        if manifest is None or gain is None:
            return manifest, applied
        listed = any(e.peer_id == self.peer_id for e in manifest.entries)
        self.scores.append((manifest.round, gain, listed))
        if gain > 0 and listed and not self._spending:
            self.last_gain = gain
        return manifest, applied


class Frame(SimPeer):
    """Colludes to make honest work look like the odd one out: every framer sends the negation of its
    honest update at an honest size, so together they outweigh the honest peers in any cosine with
    "the others" (the attack that got honest peers struck and banned under the geometric rule)."""

    honest = False

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        return {n: -t for n, t in self.pseudo_gradient(r).items()}


class Usurp(SimPeer):
    """Earns standing with honest work while the coordinator watches, and every round publishes its
    own manifest as soon as enough others have submitted to make a quorum: their payloads (public in
    the DHT) plus its own update flipped, at an honest size so it passes the clipping check, every
    member it left out marked missing (attack 2 of the trust issue, made as strong as the rules
    allow: before, absence marks shrank the quorum to 1 and a one-entry ×−1000 manifest was applied)."""

    honest = False

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        await super().submit(r, encoded, base)
        self.background.add(asyncio.ensure_future(self._usurp(r, encoded, base)))

    async def _usurp(self, r: int, encoded: Encoded, base: str) -> None:
        poison = {n: -t for n, t in self.store.decode(encoded.data, sender=self.peer_id, round_no=r).items()}
        bad = PayloadEncoder(self.run, self.peer_id).encode(poison, r)
        self.store.blobs.put(bad.digest, bad.data)
        members = [b.peer_id for b in await self.node.member_peers() if b.peer_id != self.run.coordinator]
        needed = peer_quorum(len(members)) - 1
        for _ in range(40):  # until enough others have submitted, or the round is long gone
            subs = await self.agreement._submissions(r)
            others = sorted(p for p, sub in subs.items() if p != self.peer_id and sub.base_hash == base)
            if len(others) >= needed:
                chosen = others[:needed]
                contributions = {self.peer_id: poison}
                for p in chosen:  # clipped as the rule says, so followers' clipping check passes
                    data = await self.store.get(subs[p].digest, [p])
                    contributions[p] = self.store.decode(data, sender=p, round_no=r)
                listed = sorted(contributions)
                scales = clip_scales([summarise(contributions[p], sparse=True) for p in listed])
                digests = {p: (subs[p].digest, subs[p].size) for p in chosen} | {self.peer_id: (bad.digest, len(bad.data))}
                entries = [ManifestEntry(p, *digests[p], scales=sc) for p, sc in zip(listed, scales)]
                manifest = Manifest(
                    round=r,
                    leader=self.peer_id,
                    base_hash=base,
                    entries=entries,
                    rejected=[],
                    closed_at=self.node.wall_time(),
                    missing=sorted(p for p in members if p not in listed),
                )
                signed = sign_manifest(self.node.dht.identity, manifest)
                await self.node.dht.put(manifest_key(self.run.run_id, r), signed, 3600.0)
                return
            await asyncio.sleep(0.25)


class Stall(SimPeer):
    """Every round, as soon as it has submitted, publishes a manifest of the round on the agreed state
    that lists nothing: a round closed empty, if anyone took it."""

    honest = False

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        await super().submit(r, encoded, base)
        await self._publish(Manifest(r, self.peer_id, base, [], [], self.node.wall_time()))

    async def _publish(self, manifest: Manifest) -> None:
        signed = sign_manifest(self.node.dht.identity, manifest)
        await self.node.dht.put(manifest_key(self.run.run_id, manifest.round), signed, 3600.0)


class JunkManifests(Stall):
    """Every round, signed manifests for the next 20 rounds on made-up states."""

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        await SimPeer.submit(self, r, encoded, base)
        for ahead in range(r, r + 20):
            junk = hashlib.sha256(f"junk {self.peer_id} {ahead}".encode()).hexdigest()
            await self._publish(Manifest(ahead, self.peer_id, junk, [], [], self.node.wall_time()))


class Equivocate(Stall):
    """Every round, signs one manifest of the round, then 3 s later a different one (in the
    background, so it keeps up with the swarm and its two statements are read)."""

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        await SimPeer.submit(self, r, encoded, base)
        self.background.add(asyncio.ensure_future(self._two(r, base)))

    async def _two(self, r: int, base: str) -> None:
        for variant in range(2):
            await self._publish(Manifest(r, self.peer_id, base, [], [], self.node.wall_time() + variant))
            await asyncio.sleep(3.0)


class ClaimCoordinator(SimPeer):
    """Its heartbeats say it is the coordinator; it never leads (it waits for someone to follow it)."""

    honest = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.node.status.is_coordinator = True

        async def never_lead(*_: object) -> bool:
            return False

        self.agreement._should_lead = never_lead  # type: ignore[method-assign,assignment]


class TwoFaced(Usurp):
    """A usurper (its own manifest every round, honest work otherwise) that also endorses every
    peer-led manifest of the round it sees, switching its endorsement among them every 0.5 s: to
    make two manifests of one round each look endorsed by a majority to different nodes. Whoever
    reads two of its endorsements of a round counts neither."""

    endorsing: asyncio.Future[None] | None = None

    async def main(self, rounds: int) -> None:
        if self.endorsing is None or self.endorsing.done():  # once, and again after a restart
            self.endorsing = asyncio.ensure_future(self._endorse_all())
            self.background.add(self.endorsing)
        await super().main(rounds)

    async def _endorse_all(self) -> None:
        flips = 0
        while True:
            await asyncio.sleep(0.5)
            r = self.agreement.state.round
            found = await self.node.dht.get_all(manifest_key(self.run.run_id, r), Manifest)
            peer_led = sorted((m for m in found if m.signer != self.run.coordinator), key=lambda m: m.signer)
            if peer_led:
                m = peer_led[flips % len(peer_led)]
                digest = hashlib.sha256(encode_record(m.record)).hexdigest()
                await self.node.dht.put(endorse_key(self.run.run_id, r), Endorsement(r, self.peer_id, m.signer, digest), 3600.0)
                flips += 1


ATTACKS: dict[str, type[SimPeer]] = {
    "two-faced": TwoFaced,
    "stall": Stall,
    "junk-manifests": JunkManifests,
    "equivocate": Equivocate,
    "claim-coordinator": ClaimCoordinator,
    "ahead": Ahead,
    "usurp": Usurp,
    "evade": Evade,
    "copy": Copy,
    "shrink": Shrink,
    "frame": Frame,
    "spend-credit": SpendCredit,
    "idle": Idle,
    "slow-serve": SlowServe,
    "sign-flip": SignFlip,
    "noise": Noise,
    "zero": Zero,
}
