"""Simulated nodes: what each shares (its round agreement, payload store, timed fetches and
reloads), the ledger the invariants read, and the coordinator. The volunteer is peer.py.

What is real: every decision of a round (`RoundAgreement`: who leads, when a leader stops waiting,
what it accepts, clips, refuses and strikes, which manifest a follower takes, equivocation
evidence, reloading; `RoleKeeper`: admission and roles; `SwarmNode`: heartbeats, roster, members),
the payload codec and the outer step on a small model's tensors, signatures. What is modelled: a
peer's H inner steps (a pause, then a seeded pseudo-gradient or a real Replica's steps: peer.py),
and the transfers, which take the time the network books for them.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

from swarm.modes import mode_for
from swarm.modes.base import TrainingMode
from swarm.net.records import Manifest
from swarm.net.transfer import TransferError
from swarm.processes.roles import RoleKeeper
from swarm.round.agreement import RoundAgreement
from swarm.round.payloads import PayloadStore
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
