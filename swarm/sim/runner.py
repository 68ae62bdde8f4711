"""One simulated run: a coordinator and N peers on one virtual loop, a fault schedule, invariants.

`simulate(SimConfig(...))` builds the swarm, runs it until every honest peer has settled the last
round (or the virtual deadline passes), checks the invariants after every round any node settles,
and returns what happened: rounds, latencies, bytes, and the violations with the seed and a short
trace to reproduce them (`swarm-sim --seed N ...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from swarm.data.corpus import load_corpus
from swarm.log import get_logger
from swarm.modes import default_outer
from swarm.modes.replica import Replica, data_config, initial_state
from swarm.run import AdmissionConfig, RunConfig
from swarm.sim.actors import FOREVER, Actor, Ledger, SimCoordinator
from swarm.sim.clock import VirtualLoop
from swarm.sim.faults import Fault, draw_faults
from swarm.sim.hostile import ATTACKS
from swarm.sim.invariants import Violation, check
from swarm.sim.network import Profile, SimNetwork
from swarm.sim.peer import SimPeer

logger = get_logger(__name__)

# A small model: the real codec, the real outer step, cheap enough for thousands of runs.
SIM_MODEL = {"d_model": 64, "n_layers": 1, "n_heads": 2, "d_ff": 128, "max_seq_len": 32, "vocab_size": 256}


@dataclass
class SimConfig:
    """What to simulate. Times are virtual seconds."""

    seed: int = 0
    peers: int = 4
    rounds: int = 6
    profile: str = "lan"
    step_s: tuple[float, float] = (0.5, 1.5)  # each peer's inner-step time is drawn from this range
    inner_steps: int = 10
    round_timeout_s: float = 20.0
    # How often a node publishes its heartbeat (a heartbeat lives 5× as long). 2 s stresses the
    # rounds' timing; at hundreds of peers production's 5 s halves the simulator's record traffic.
    heartbeat_s: float = 2.0
    attackers: list[str] = field(default_factory=list)  # one hostile peer per entry (swarm.sim.hostile.ATTACKS)
    faults: list[str] = field(default_factory=list)  # fault kinds drawn at random (swarm.sim.faults.KINDS), or "all"
    schedule: list[Fault] = field(default_factory=list)  # faults at given times (named scenarios)
    payload_bytes: int = 0  # `sized` payloads: every payload travels as if it were this big (0: real size)
    state_bytes: int = 0  # and a state download as if the state were this big (0: real size)
    overlap: bool = False  # peers train round r+1 while round r settles (the production default)
    coordinator_apply_s: float = 0.0  # the coordinator reports a round this long after applying it
    # Compute the round code does between transfers, per payload: a leader's checks of a submission,
    # and a node's decoding and applying of a listed payload (measured: `swarm-bench scale` prints
    # both). 0: instant, as the simulator's own shortcuts make them.
    cpu_s: tuple[float, float] = (0.0, 0.0)
    horizon_s: float = 0.0  # stop the run at this virtual time (0: derived from rounds and timeouts)
    # Real training: peers run H inner AdamW steps of this preset on `data` (a Replica each, CPU) and
    # the result carries the final eval loss. "" (default): seeded pseudo-gradients on a small model.
    model: str = ""
    mode: str = "sparseloco"  # a full-replica mode: sparseloco or diloco (their peers are Replicas)
    data: str = "stdlib"
    batch_size: int = 4
    seq_len: int = 64
    min_peers: int = 1
    aggregate_from: int = 0  # the run's aggregate_from: coordinator-led rounds of this many contributions carry an aggregate

    def __post_init__(self) -> None:
        if self.peers < 1 or self.rounds < 1:
            raise ValueError("peers and rounds must be >= 1")
        if not 0 < self.step_s[0] <= self.step_s[1]:
            raise ValueError("step_s must be a range 0 < low <= high")
        if self.mode not in ("sparseloco", "diloco"):
            raise ValueError(f"the simulator runs full-replica modes (sparseloco, diloco), not {self.mode!r}")
        if unknown := sorted(set(self.attackers) - set(ATTACKS)):
            raise ValueError(f"unknown attack(s) {', '.join(unknown)} (attacks: {', '.join(sorted(ATTACKS))})")

    def run_config(self) -> RunConfig:
        trained = {"preset": self.model, "data_source": self.data, "batch_size": self.batch_size, "seq_len": self.seq_len}
        return RunConfig(
            run_id=f"sim-{self.seed}",
            **(trained if self.model else {"preset": "nano", "model_overrides": dict(SIM_MODEL)}),
            warmup_steps=self.inner_steps,
            eval_batches=2,
            min_peers=self.min_peers,
            aggregate_from=self.aggregate_from,
            inner_steps=self.inner_steps,
            round_timeout_s=self.round_timeout_s,
            heartbeat_interval_s=self.heartbeat_s,
            heartbeat_ttl_s=5 * self.heartbeat_s,
            num_shards=max(16, self.peers),
            seed=self.seed,
            mode=self.mode,
            outer=dataclasses.replace(default_outer(self.mode), overlap=self.overlap),
            # Seeded pseudo-gradients lower no loss: newcomers serve probation only when peers train.
            admission=AdmissionConfig(probation_rounds=AdmissionConfig().probation_rounds if self.model else 0),
        )


@dataclass
class SimResult:
    config: SimConfig
    rounds_closed: int
    close_s: list[float]  # per round: last applied by an honest node − first submission
    first_applied_s: list[float]  # per round: first honest node holding θ(r+1) − last accepted submission
    all_applied_s: list[float]  # per round every honest node up holds θ(r+1) by the end: the last to − last accepted submission
    eval_loss: float | None  # of the most advanced honest state at the end (runs with real training)
    violations: list[Violation]
    trace: list[str]
    virtual_s: float
    bytes_in: dict[str, int]
    bytes_out: dict[str, int]
    # Honest peers up at the end, and how many of them hold θ(rounds): fewer when the run ended at
    # its horizon first (the latencies above cover only the nodes that applied each round).
    honest_up: int = 0
    honest_done: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class Simulation:
    """The swarm of one SimConfig, built on a VirtualLoop."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.loop = VirtualLoop()
        self.rng = random.Random(cfg.seed)
        self.net = SimNetwork(self.loop, Profile.load(cfg.profile), self.rng)
        self.net.cpu_s = cfg.cpu_s
        self.net.payload_bytes, self.net.state_bytes = cfg.payload_bytes, cfg.state_bytes
        self.run = cfg.run_config()
        self.ledger = Ledger()
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.disturbed_until = 0.0  # when the last fault heals (liveness is judged after it)
        self.background: set[asyncio.Future[None]] = set()  # heals and restarts under way
        state = initial_state(self.run)
        self.corpus = load_corpus(data_config(self.run)) if cfg.model else None
        asyncio.set_event_loop(self.loop)
        self.coordinator = SimCoordinator(self.net, self.run, state, ledger=self.ledger, apply_s=cfg.coordinator_apply_s)
        self.run.coordinator = self.coordinator.peer_id
        if self.corpus is not None:  # real training: the coordinator scores contributions, as in production
            self.coordinator.agreement.validator.probe = self.coordinator.mode.make_probe(self.corpus)
        self.coordinator.agreement.validator.secret = f"sim-{cfg.seed}".encode()  # the probe's batches replay too
        self.peers = [
            SimPeer(
                self.net, self.run, state, name=f"peer{i}", index=i + 1, ledger=self.ledger, step_s=self.rng.uniform(*cfg.step_s)
            )
            for i in range(cfg.peers)
        ]
        for j, attack in enumerate(cfg.attackers):
            i = cfg.peers + j
            name = attack if cfg.attackers.count(attack) == 1 else f"{attack}{j}"
            step_s = self.rng.uniform(*cfg.step_s)
            self.peers.append(
                ATTACKS[attack](self.net, self.run, state, name=name, index=i + 1, ledger=self.ledger, step_s=step_s)
            )
        if self.corpus is not None:  # real training: each peer a Replica on its own data shard
            cpu = torch.device("cpu")
            for shard, peer in enumerate(self.peers):
                peer.worker = Replica(self.run, shard=shard, device=cpu, corpus=self.corpus)
        span = cfg.rounds * (cfg.inner_steps * cfg.step_s[1] + cfg.round_timeout_s)
        drawn = draw_faults(self.rng, cfg.faults, [p.name for p in self.peers], span_s=span, round_timeout_s=cfg.round_timeout_s)
        self.schedule = sorted(cfg.schedule + drawn, key=lambda f: f.at)

    @property
    def actors(self) -> list[Actor]:
        return [self.coordinator, *self.peers]

    def by_name(self, name: str) -> Actor:
        return next(a for a in self.actors if a.name == name)

    def log(self, text: str) -> None:
        self.trace.append(f"{self.loop.time():9.2f}  {text}")

    async def main(self) -> None:
        cfg = self.cfg
        horizon = cfg.horizon_s or cfg.rounds * (self.run.leader_timeout_s + 2 * cfg.round_timeout_s) + 300
        # Every node goes on until the run ends (a node that stopped early would look stale, or
        # would leave, to the others): the run ends once every honest peer still up holds θ(rounds).
        self.coordinator.task = asyncio.ensure_future(self.coordinator.main(FOREVER))
        for p in self.peers:
            p.task = asyncio.ensure_future(p.main(FOREVER))
        faults = asyncio.ensure_future(self._faults())
        watched = 0
        while self.loop.time() < horizon:
            await asyncio.sleep(0.5)
            if len(self.ledger.applied) != watched:
                for done in self.ledger.applied[watched:]:
                    self.log(
                        f"{done.node} applied round {done.round} led by {done.leader[-6:]} ({len(done.entries)} payloads) -> {done.result[:8]}"
                    )
                watched = len(self.ledger.applied)
                self.violations = check(
                    self.ledger, self.net, self.run, disturbed_until=self.disturbed_until, nodes=len(self.actors)
                )
                if self.violations:
                    break
            for a in self.actors:
                if a.task is not None and a.task.done() and not a.task.cancelled() and a.task.exception() is not None:
                    raise RuntimeError(f"{a.name} crashed") from a.task.exception()
            up = [p for p in self.peers if p.honest and p.peer_id not in self.net.down]
            if all(p.agreement.state.round >= cfg.rounds for p in up):
                break
        faults.cancel()
        pending = [faults, *self.background, *(t for a in self.actors for t in a.background)]
        pending += [a.task for a in self.actors if a.task is not None]
        for task in pending:
            task.cancel()
        for a in self.actors:
            await a.node.stop(announce_leave=False)
        await asyncio.gather(*pending, return_exceptions=True)

    async def _faults(self) -> None:
        for fault in self.schedule:
            await asyncio.sleep(max(0.0, fault.at - self.loop.time()))
            self.log(f"fault: {fault}")
            await fault.apply(self)

    def eval_loss(self) -> float | None:
        """The eval loss of the most advanced honest state (the coordinator's unless it went away; real
        training only)."""
        if self.corpus is None:
            return None
        evaluator = Replica(self.run, shard=0, device=torch.device("cpu"), corpus=self.corpus)
        honest = [a for a in self.actors if a.honest]
        latest = max(honest, key=lambda a: (a.agreement.state.round, a is self.coordinator))
        return evaluator.evaluate(latest.agreement.state)

    def result(self) -> SimResult:
        closes, settles, applies = [], [], []
        by_round: dict[int, list[float]] = {}
        listed: dict[int, tuple[str, ...]] = {}
        for a in self.ledger.applied:
            by_round.setdefault(a.round, []).append(a.at)
            listed.setdefault(a.round, a.entries)
        up = [p for p in self.peers if p.honest and p.peer_id not in self.net.down]
        for r, times in sorted(by_round.items()):
            if r in self.ledger.first_submission:
                closes.append(max(times) - self.ledger.first_submission[r])
            sent = [self.ledger.submitted[(r, p)] for p in listed[r] if (r, p) in self.ledger.submitted]
            if sent:  # from the round's last accepted submission: what the network and the protocol add
                settles.append(min(times) - max(sent))
                if all(p.agreement.state.round > r for p in up):  # else "all applied" would be the last that did
                    applies.append(max(times) - max(sent))
        links = self.net.links
        return SimResult(
            self.cfg,
            rounds_closed=len(by_round),
            close_s=closes,
            first_applied_s=settles,
            all_applied_s=applies,
            eval_loss=self.eval_loss(),
            violations=self.violations,
            trace=self.trace[-40:],
            virtual_s=self.loop.time(),
            bytes_in={a.name: links[a.peer_id].received for a in self.actors},
            bytes_out={a.name: links[a.peer_id].sent for a in self.actors},
            honest_up=len(up),
            honest_done=sum(a.agreement.state.round >= self.cfg.rounds for a in up),
        )


def simulate(cfg: SimConfig) -> SimResult:
    sim = Simulation(cfg)
    try:
        with fewer_collections():
            sim.loop.run_until_complete(sim.main())
    finally:
        sim.loop.close()
        asyncio.set_event_loop(None)
    return sim.result()


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Python's cyclic garbage collector, tuned for a run of millions of short-lived objects beside
    a large swarm that lives as long as the run: what exists when the run starts (nodes, keys,
    models) is frozen out of the collections, and the youngest generation is collected every
    50,000 allocations instead of 700. A full collection walks every live object, and the default
    thresholds ran thousands of them a round: 16 s of a 54 s round at 512 peers, and the share grows
    with the swarm (5 s with these settings). Restored afterwards."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
