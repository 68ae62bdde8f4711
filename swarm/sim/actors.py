"""The simulated coordinator and peers: the production round code, driven by simple loops.

What is real: every decision of a round (`RoundAgreement`: who leads, when a leader stops waiting,
what it accepts, clips, refuses and strikes, which manifest a follower takes, equivocation
evidence, reloading; `RoleKeeper`: admission and roles; `SwarmNode`: heartbeats, roster, members),
the payload codec and the outer step on a small model's tensors, signatures. What is modelled: a
peer's H inner steps are a pause of its drawn step time followed by a pseudo-gradient drawn from
the round's seed (a shared direction plus the peer's own noise, which is what honest replicas'
updates look like to the robust aggregator); the transfers take the time the network books for them.

A peer's loop follows `swarm.processes.volunteer.Peer` in step (train, submit, settle): heartbeat
before training, submission record plus heartbeat after, a round that closed while it trained is
dropped (error feedback takes the work back), a manifest on another state makes it reload the agreed
state from a node that holds it.
"""

from __future__ import annotations

import asyncio
import functools
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.modes import mode_for
from swarm.modes.base import TrainingMode
from swarm.modes.replica import Replica
from swarm.net.records import Capacity, Manifest, Submission, run_key, submit_key
from swarm.net.transfer import TransferError
from swarm.processes.roles import RoleKeeper
from swarm.round.agreement import RoundAgreement
from swarm.round.overlap import next_base
from swarm.round.payloads import Encoded, PayloadEncoder, PayloadStore
from swarm.run import RunConfig
from swarm.sim.network import SimNetwork
from swarm.sim.node import SimNode
from swarm.state import GlobalState

FOREVER = 1 << 30  # rounds a node goes on for: until the simulation ends it


@dataclass
class Applied:
    """One round as a node settled it (for the invariants)."""

    node: str
    round: int
    base: str
    result: str
    leader: str
    entries: tuple[str, ...]
    at: float
    reloaded: bool = False


@dataclass
class Flight:
    """A round we submitted to whose manifest is being awaited while the next round trains."""

    round: int
    settle: asyncio.Future[tuple[Manifest, int | None]]
    next_base: GlobalState


@dataclass
class Ledger:
    """What every honest node did, in order: the invariants read it after every event."""

    applied: list[Applied] = field(default_factory=list)
    submitted: dict[tuple[int, str], float] = field(default_factory=dict)  # (round, peer) -> when
    first_submission: dict[int, float] = field(default_factory=dict)


class Actor:
    """A simulated node with its round agreement, payload store and role in the run."""

    honest = True

    def __init__(self, network: SimNetwork, run: RunConfig, state: GlobalState, *, name: str, index: int, ledger: Ledger):
        self.network, self.ledger, self.name = network, ledger, name
        self.node = SimNode(network, run, name=name, index=index)
        self.mode: TrainingMode = mode_for(run)
        shapes = {n: tuple(t.shape) for n, t in state.params.items()}
        self.store = PayloadStore(run, shapes, self.node.traffic, fetch=self.fetch)
        network.stores[self.peer_id] = self.store
        self.store.decode = functools.partial(network.decode, self.store.decode)  # type: ignore[method-assign]
        network.states[self.peer_id] = lambda: self.agreement.state
        self.agreement = RoundAgreement(self.node, self.store, state.copy(), self.mode)
        self.task: asyncio.Task[None] | None = None
        self.background: set[asyncio.Future[Any]] = set()  # records written without waiting, rounds settling

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    async def main(self, rounds: int) -> None:
        """The node's life until it has settled `rounds` rounds."""
        raise NotImplementedError

    @property
    def run(self) -> RunConfig:
        return self.node.run

    async def fetch(self, holder: str, request: dict, max_bytes: int, timeout_s: float) -> bytes | None:
        """One blob from one holder, in the time the network books for it."""
        net = self.network
        if not net.reachable(self.peer_id, holder) or net.lost():
            await asyncio.sleep(min(timeout_s, 2 * net.links[holder].latency_s + 1.0))
            raise TransferError(f"{holder[-8:]} unreachable")
        if holder in net.hanging:  # accepts the request, never answers (a free delay)
            await asyncio.sleep(timeout_s)
            raise TransferError(f"{holder[-8:]}: timed out")
        data = await net.stores[holder].serve(request)
        if data is None:
            await asyncio.sleep(net.links[self.peer_id].latency_s + net.links[holder].latency_s)
            return None
        done = net.transfer_time(holder, self.peer_id, net.sized.get(request.get("digest", ""), len(data)), within_s=timeout_s)
        if done is None:  # would not finish in time: the fetcher waits out its timeout and gives up
            await asyncio.sleep(timeout_s)
            raise TransferError(f"{holder[-8:]}: timed out")
        await asyncio.sleep(done - net.now())
        if not net.reachable(self.peer_id, holder):  # crashed or cut off meanwhile
            raise TransferError(f"{holder[-8:]} went away mid-transfer")
        return data

    async def reload(self) -> GlobalState:
        """The agreed state, from any node that holds it (as statesync does), after the time it takes."""
        net = self.network
        _, agreed = await self.agreement._view(self.agreement.state.round)
        while True:
            donors = [p for p, state in sorted(net.states.items()) if p != self.peer_id and state().hash == agreed]
            donors = [p for p in donors if net.reachable(self.peer_id, p)]
            if donors:
                state = net.states[donors[0]]()
                size = net.state_bytes or 4 * sum(t.numel() for t in state.params.values())
                done = net.transfer_time(donors[0], self.peer_id, size)
                assert done is not None  # no deadline: always booked
                await asyncio.sleep(max(0.0, done - net.now()))
                return state.copy()
            await asyncio.sleep(1.0)
            _, agreed = await self.agreement._view(self.agreement.state.round)

    def note(self, manifest: Manifest, base: str, reloaded: bool) -> None:
        if self.honest:
            self.ledger.applied.append(
                Applied(
                    self.name,
                    manifest.round,
                    base,
                    self.agreement.state.hash,
                    manifest.leader,
                    tuple(e.peer_id for e in manifest.entries),
                    self.network.now(),
                    reloaded,
                )
            )

    async def settle(self, r: int) -> tuple[Manifest, int | None]:
        base = self.agreement.state.hash
        manifest, applied = await self.agreement.settle_round(r, self.reload)
        self.note(manifest, base, applied is None)
        return manifest, applied


class SimCoordinator(Actor):
    """Admits peers, signs roles and the roster, leads while it is live (the real RoleKeeper and round code)."""

    def __init__(self, network: SimNetwork, run: RunConfig, state: GlobalState, *, ledger: Ledger, apply_s: float = 0.0):
        """apply_s: how long the coordinator takes after applying a round before it reports the next one
        (a loaded machine, a slow evaluation): its heartbeat says the old round meanwhile."""
        super().__init__(network, run, state, name="coordinator", index=0, ledger=ledger)
        self.apply_s = apply_s
        self.node.status.is_coordinator = True
        self.node.status.role = "coordinator"
        self.roles = RoleKeeper(self.node, self.mode)

    async def main(self, rounds: int) -> None:
        self.node.start_heartbeats()
        self.node.spawn(self._role_loop())
        for _ in range(rounds):
            state = self.agreement.state
            s = self.node.status
            s.round, s.param_hash, s.phase = state.round, state.hash, "coordinating"
            await self.node.publish_heartbeat()
            await self.settle(state.round)
            if self.apply_s:
                await asyncio.sleep(self.apply_s)

    async def _role_loop(self) -> None:
        while True:
            await self.roles.update()
            await asyncio.sleep(1.0)


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
            await asyncio.sleep(self.step_s * self.run.inner_steps)
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
            flight = Flight(r, settle, next_base(state, own, self.mode))

    async def land(self, flight: Flight) -> bool:
        """Wait for an overlapped round to be applied; False if we had to reload."""
        manifest, applied = await flight.settle
        s = self.node.status
        s.round, s.param_hash, s.phase = self.agreement.state.round, self.agreement.state.hash, "idle"
        if applied is None:
            return False
        if all(e.peer_id != self.peer_id for e in manifest.entries):
            self.encoder.excluded()
        return True

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
            g = torch.randn(t.shape, generator=shared) + 0.5 * torch.randn(t.shape, generator=own)
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
        await asyncio.sleep(self.step_s * self.run.inner_steps)
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
        if applied is not None and all(e.peer_id != self.peer_id for e in manifest.entries):
            self.encoder.excluded()

    async def submit(self, r: int, encoded: Encoded, base: str) -> None:
        self.store.blobs.put(encoded.digest, encoded.data)
        if self.network.payload_bytes:  # `sized` payloads: the transfers take the declared size's time
            self.network.sized[encoded.digest] = self.network.payload_bytes
        sub = Submission(self.peer_id, r, encoded.digest, len(encoded.data), base, 0, None)
        self.ledger.submitted[(r, self.peer_id)] = self.network.now()
        self.ledger.first_submission.setdefault(r, self.network.now())
        self.node.status.phase = "exchanging"
        await self.node.dht.put(submit_key(self.run.run_id, r), sub, ttl_s=self.run.round_timeout_s * 4 + 60)
        await self.node.publish_heartbeat()
