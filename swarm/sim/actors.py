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
from swarm.net.records import Manifest, ManifestEntry, Rejection, Submission
from swarm.net.transfer import TransferError, transfer_deadline_s
from swarm.processes.coordinator import SAVED_STATE_PATIENCE_S
from swarm.processes.roles import RoleKeeper
from swarm.processes.statesync import pick_donors
from swarm.round.agreement import RoundAgreement
from swarm.round.payloads import AGGREGATE_DENSITY, REVEAL_S, Encoded, PayloadStore
from swarm.run import RunConfig
from swarm.sim.network import SimNetwork
from swarm.sim.node import EPOCH, SimNode
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
    closed_at: float = 0.0  # virtual time the leader signed the manifest
    rejected: tuple[tuple[str, str], ...] = ()  # (peer, reason) the manifest lists


@dataclass
class Flight:
    """A round we submitted to whose manifest is being awaited while the next round trains."""

    round: int
    settle: asyncio.Future[tuple[Manifest | None, int | None]]
    next_base: GlobalState
    sent: Encoded | None = None  # our payload of the round (what an aggregate dropped of it comes back)


@dataclass
class Ledger:
    """What every honest node did, in order: the invariants read it after every event."""

    applied: list[Applied] = field(default_factory=list)
    submitted: dict[tuple[int, str], float] = field(default_factory=dict)  # (round, peer) -> when
    first_submission: dict[int, float] = field(default_factory=dict)
    departed: dict[str, float] = field(default_factory=dict)  # node -> when it left for good
    honest: set[str] = field(default_factory=set)  # peer ids of the honest nodes
    cut_off: list[tuple[str, float, float]] = field(default_factory=list)  # (peer id, from, until): crashed or partitioned
    polled: dict[tuple[int, str], tuple[float, frozenset[str]]] = field(default_factory=dict)
    # (round, node) -> its last read of the round's submissions: when, and the members it counted then


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
        self.store.decode_aggregate = functools.partial(network.decode_aggregate, self.store.decode_aggregate)  # type: ignore[method-assign]
        self.store.matches = network.matches
        network.states[self.peer_id] = lambda: self.agreement.state
        self.agreement = RoundAgreement(self.node, self.store, state.copy(), self.mode)
        self.agreement._mean_of = functools.partial(network.mean_of, self.agreement._mean_of)  # type: ignore[method-assign]
        self._charge_compute()
        self.task: asyncio.Task[None] | None = None
        if self.honest:
            ledger.honest.add(self.peer_id)
        read = self.agreement._submissions

        async def submissions(round_no: int) -> dict[str, Submission]:
            """The round code's read of a round's submissions, timed: a leader's last one is what it
            could see when it stopped waiting (the fairness invariant)."""
            found = await read(round_no)
            ledger.polled[(round_no, self.peer_id)] = (network.now(), frozenset(await self.node.members()))
            return found

        self.agreement._submissions = submissions  # type: ignore[method-assign]
        self.background: set[asyncio.Future[Any]] = set()  # records written without waiting, rounds settling

    def _charge_compute(self) -> None:
        """The virtual time a leader's checks and a node's apply take, per payload (`SimConfig.cpu_s`):
        the round code's own work runs at once here; a real node spends it between transfers."""
        validate, apply, (check_s, apply_s) = self.agreement.validator.validate, self.agreement.apply, self.network.cpu_s

        async def timed_validate(
            state: GlobalState, subs: dict[str, Submission], seen: dict[str, int]
        ) -> tuple[list[ManifestEntry], list[Rejection], dict[str, float]]:
            found = await validate(state, subs, seen)
            await asyncio.sleep(check_s * len(subs))
            return found

        async def timed_apply(manifest: Manifest) -> int:
            applied = await apply(manifest)
            await asyncio.sleep(apply_s * len(manifest.entries))
            return applied

        if check_s:
            self.agreement.validator.validate = timed_validate  # type: ignore[method-assign]
        if apply_s:
            self.agreement.apply = timed_apply  # type: ignore[method-assign]

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
        net, me = self.network, self.node.dht.peer_id  # (R² calls a round: no property chains)
        if not net.reachable(me, holder) or net.lost():
            await asyncio.sleep(min(timeout_s, 2 * net.links[holder].latency_s + 1.0))
            raise TransferError(f"{holder[-8:]} unreachable")
        if holder in net.hanging:  # accepts the request, never answers (a free delay)
            await asyncio.sleep(timeout_s)
            raise TransferError(f"{holder[-8:]}: timed out")
        data = await net.stores[holder].serve(request)
        if data is None:
            await asyncio.sleep(net.links[me].latency_s + net.links[holder].latency_s)
            return None
        digest = request.get("digest", "")
        nbytes = net.sized.get(digest, len(data))
        if "names" in request and digest in net.sized:  # a part: its tensors' share of the declared size
            nbytes = int(nbytes * net.share(request["names"], net.stores[holder].shapes))
        deadline_s = transfer_deadline_s(timeout_s, nbytes)  # production's rule (swarm/net/transfer.py)
        done = net.transfer_time(holder, me, nbytes, within_s=deadline_s)
        if done is None:  # would not finish in time: the fetcher waits out its deadline and gives up
            await asyncio.sleep(deadline_s)
            raise TransferError(f"{holder[-8:]}: timed out")
        await asyncio.sleep(done - net.now())
        if not net.reachable(me, holder):  # crashed or cut off meanwhile
            raise TransferError(f"{holder[-8:]} went away mid-transfer")
        return data

    async def reload(self) -> GlobalState:
        """The state most live members hold (`pick_donors`, as production's reload_state), from the
        first reachable node holding it, after the time its bytes take."""
        while True:
            state = await self.download()
            if state is not None:
                return state
            await asyncio.sleep(1.0)

    async def download(self) -> GlobalState | None:
        """One try at the swarm's state (None: nobody reachable holds it now)."""
        net = self.network
        choice = pick_donors(await self.node.member_peers(), exclude=self.peer_id)
        if choice is None:
            return None
        _, wanted, _ = choice
        donors = [p for p, state in sorted(net.states.items()) if p != self.peer_id and state().hash == wanted]
        donors = [p for p in donors if net.reachable(self.peer_id, p)]
        if not donors:
            return None
        state = net.states[donors[0]]()
        size = net.state_bytes or 4 * sum(t.numel() for t in state.params.values())
        done = net.transfer_time(donors[0], self.peer_id, size)
        assert done is not None  # no deadline: always booked
        await asyncio.sleep(max(0.0, done - net.now()))
        return state.copy()

    async def restart(self) -> None:
        """Back from a crash with what it held (its disk)."""
        await self.main(FOREVER)

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
                    manifest.closed_at - EPOCH,
                    tuple((r.peer_id, r.reason) for r in manifest.rejected),
                )
            )

    async def settle(self, r: int) -> tuple[Manifest | None, int | None]:
        base = self.agreement.state.hash
        manifest, applied = await self.agreement.settle_round(r, self.reload)
        if manifest is not None:
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
        if network.payload_bytes:  # `sized` payloads: a round's aggregate travels as AGGREGATE_DENSITY of them
            hold = self.store.hold

            def sized_hold(digest: str, data: bytes, *, reveal_s: float = REVEAL_S) -> None:
                network.sized[digest] = AGGREGATE_DENSITY * network.payload_bytes  # the coordinator holds aggregates only
                hold(digest, data, reveal_s=reveal_s)

            self.store.hold = sized_hold  # type: ignore[method-assign]

    async def restart(self) -> None:
        """As `Coordinator._obtain_state`: for SAVED_STATE_PATIENCE_S, look for a state in the swarm
        at least as new as the saved one and take it; else resume from the saved state."""
        self.agreement.returning = True  # a new process would start so
        deadline = self.network.now() + SAVED_STATE_PATIENCE_S
        while self.network.now() < deadline:
            choice = pick_donors(await self.node.member_peers(), exclude=self.peer_id)
            if choice is not None and choice[0] >= self.agreement.state.round:
                state = await self.download()
                if state is not None and state.round >= self.agreement.state.round:
                    self.agreement.state = state
                    await self.agreement.adopt_ledger()
                    break
            await asyncio.sleep(1.0)
        await self.main(FOREVER)

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
