"""A simulated volunteer: capacity, role, then train, submit and settle round after round, in step
or overlapped, as `swarm.processes.volunteer.Peer._round_loop` does (see actors.py for what is
real and what is modelled)."""

from __future__ import annotations

import asyncio
import random

import torch

from swarm.modes.replica import Replica
from swarm.net.records import Capacity, Submission, run_key, submit_key
from swarm.round.overlap import next_base
from swarm.round.payloads import Encoded, PayloadEncoder
from swarm.round.world import put_surely
from swarm.run import RunConfig
from swarm.sim.actors import Actor, Flight, Ledger
from swarm.sim.network import SimNetwork
from swarm.state import GlobalState

# A peer's own part of its pseudo-gradient beside the round's shared direction. At 0.75 two honest
# payloads select 13-17% of the same positions, as real `nano` replicas' do (14-27% over their first
# rounds, 8 replicas); at 0.5 they shared 26-32%, and the leader's copy check compared every pair
# exactly (most of a 1,000-peer round of the simulator).
OWN_NOISE = 0.75


class SimPeer(Actor):
    """A volunteer: capacity, role, then train / submit / settle, round after round."""

    def __init__(
        self, network: SimNetwork, run: RunConfig, state: GlobalState, *, name: str, index: int, ledger: Ledger, step_s: float
    ):
        super().__init__(network, run, state, name=name, index=index, ledger=ledger)
        self.step_s = step_s
        self.worker: Replica | None = None  # real training (SimConfig.model); None: seeded pseudo-gradients
        self.encoder = PayloadEncoder(run, self.peer_id)
        self.rng = random.Random(f"{run.seed}/{name}")

    async def main(self, rounds: int) -> None:
        node = self.node
        node.start_heartbeats()
        cap = Capacity(peer_id=self.peer_id, name=self.name, device="cpu", memory_gb=8.0, tokens_per_s=1.0)
        await node.dht.put(run_key(self.run.run_id, "peers"), cap, 3600.0)
        if self.run.outer.overlap:
            await self.overlapped(rounds)
            return
        while self.agreement.state.round < rounds:
            await self.one_round()

    async def overlapped(self, rounds: int) -> None:
        """The overlapped schedule of `Peer._round_loop`: round r+1 trains from θ(r) advanced by our
        own payload while round r settles; a round that landed on another state (reload) or closed
        before we submitted drops the work trained on it."""
        node, flight = self.node, None
        while True:
            if flight is None:
                state = self.agreement.state
                if state.round >= rounds:
                    return
                node.status.round, node.status.param_hash = state.round, state.hash
                if await self.agreement.closed(state.round):  # behind: apply it without training
                    await self.settle(state.round)
                    continue
                base = state
            else:
                base = flight.next_base
                if base.round >= rounds:
                    await self.land(flight)
                    flight = None
                    continue
            r = base.round
            steady = node.status.phase in ("training", "exchanging")
            node.status.phase = "training"
            if steady:
                self.background.add(asyncio.ensure_future(node.publish_heartbeat()))
            else:  # a leader waits only for peers whose heartbeat says they train: say so first
                await node.publish_heartbeat()
            await asyncio.sleep(self.step_s * self.run.inner_steps_at(r))
            delta = self.work(r)
            late = False
            if flight is not None:
                landed = await self.land(flight)
                flight = None
                if not landed or self.agreement.state.round != r:
                    continue  # reloaded, or too late for round r: its work is dropped
                late = await self.agreement.closed(r)
            if delta is None:
                continue
            encoded = self.encoder.encode(delta, r)
            if late:
                self.encoder.excluded()
                continue
            state = self.agreement.state
            self.background.add(asyncio.ensure_future(self.submit(r, encoded, state.hash)))
            own = self.store.decode(encoded.data, sender=self.peer_id, round_no=r)
            settle = asyncio.ensure_future(self.settle(r))
            self.background.add(settle)
            flight = Flight(r, settle, next_base(state, own, self.mode), encoded)

    async def land(self, flight: Flight) -> bool:
        """Wait for an overlapped round to be applied; False if we had to reload."""
        manifest, applied = await flight.settle
        s = self.node.status
        s.round, s.param_hash, s.phase = self.agreement.state.round, self.agreement.state.hash, "idle"
        if applied is None or manifest is None:
            return False
        if all(e.peer_id != self.peer_id for e in manifest.entries):
            self.encoder.excluded()
        elif flight.sent is not None:
            self.returned(flight.sent, manifest.round)
        return True

    def returned(self, sent: Encoded, r: int) -> None:
        """Round r applied an aggregate: what it dropped of our payload goes back to our error
        buffer (the volunteer's `_returned`)."""
        kept = self.agreement.applied_aggregate(r)
        if kept is not None:
            self.encoder.returned(self.store.decode(sent.data, sender=self.peer_id, round_no=r), kept)

    def pseudo_gradient(self, r: int) -> dict[str, torch.Tensor]:
        """What H inner steps from θ(r) give this peer: real ones when it has a worker, else the
        round's shared direction plus its own noise."""
        if self.worker is not None:
            work = self.worker.train_round(self.agreement.state)
            assert work is not None  # no stop event: a round always finishes
            return work.delta
        shared = torch.Generator().manual_seed(self.run.seed * 1_000_003 + r)
        own = torch.Generator().manual_seed(self.rng.getrandbits(62))
        delta = {}
        for name, t in sorted(self.agreement.state.params.items()):
            g = torch.randn(t.shape, generator=shared) + OWN_NOISE * torch.randn(t.shape, generator=own)
            delta[name] = g.mul_(1e-3)
        return delta

    def work(self, r: int) -> dict[str, torch.Tensor] | None:
        """This round's contribution (hostile peers override it)."""
        return self.pseudo_gradient(r)

    async def one_round(self) -> None:
        node, state = self.node, self.agreement.state
        r = state.round
        node.status.round, node.status.param_hash = r, state.hash
        if await self.agreement.closed(r):  # behind: apply it without training
            await self.settle(r)
            return
        node.status.phase = "training"
        await node.publish_heartbeat()
        await asyncio.sleep(self.step_s * self.run.inner_steps_at(r))
        delta = self.work(r)
        if delta is None or self.agreement.state.round != r:
            await self.settle(r)
            return
        encoded = self.encoder.encode(delta, r)
        if await self.agreement.closed(r):
            self.encoder.excluded()  # never sent: the whole Δ goes back into the error buffer
            await self.settle(r)
            return
        await self.submit(r, encoded, state.hash)
        manifest, applied = await self.settle(r)
        if manifest is not None and applied is not None and all(e.peer_id != self.peer_id for e in manifest.entries):
            self.encoder.excluded()
        elif manifest is not None and applied is not None:
            self.returned(encoded, r)

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        self.store.hold(encoded.digest, encoded.data)
        if self.network.payload_bytes:  # `sized` payloads: the transfers take the declared size's time
            self.network.sized[encoded.digest] = self.network.payload_bytes
        sub = Submission(self.peer_id, r, encoded.digest, len(encoded.data), base, 0, None)
        self.ledger.submitted[(r, self.peer_id)] = self.network.now()
        self.ledger.first_submission.setdefault(r, self.network.now())
        self.node.status.phase = "exchanging"
        await put_surely(self.node.dht, submit_key(self.run.run_id, r), sub, ttl_s=self.run.round_timeout_s * 4 + 60)
        await self.node.publish_heartbeat()
