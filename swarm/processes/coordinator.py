"""The coordinator: bootstrap DHT peer, publisher of the run, assigner of roles, first-ranked leader.

It does not train. It tracks the global state (so it can lead rounds, report eval loss and donate
state to joiners) and keeps its identity and run description on disk, so a restarted coordinator
has the same peer id, republishes the same run and catches up like any joiner. The swarm does not
need it to make progress: peers lead rounds themselves while it is away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarm.data.fetch import RunData, ShardFetcher
from swarm.data.tokenizer import TOKENIZER_FILE, obtain_run_tokenizer
from swarm.log import get_logger
from swarm.modes import mode_for
from swarm.modes.replica import Replica, initial_state
from swarm.modes.spsa.log import inline_entries
from swarm.net.dht import DHTOptions
from swarm.net.records import RUNS_KEY, Manifest
from swarm.net.schema import from_plain, to_plain
from swarm.processes.agreed import AgreedNode
from swarm.processes.roles import RoleKeeper
from swarm.processes.statesync import catch_up, reload_state, serve_state
from swarm.round.agreement import RoundAgreement
from swarm.round.payloads import PayloadStore
from swarm.run import RunConfig
from swarm.state import GlobalState, load_state
from swarm.train.sinks import MetricSinks, SinkConfig

logger = get_logger(__name__)
# The run description is static, so it lives long: joiners and status pages must find it for days
# while the coordinator is down (a signed record's expiry cannot be extended by anyone else).
RUN_TTL_S = 7 * 24 * 3600.0
RUN_REFRESH_S = 600.0
SAVED_STATE_PATIENCE_S = 10.0  # how long a coordinator with a saved state looks for a newer one in the swarm


@dataclass
class CoordinatorConfig:
    state_dir: str  # identity.key and run.json live here; reuse it to restart the same run
    dht: DHTOptions
    evaluate: bool = True  # eval loss of the global weights each round (shown on the status page)
    max_rounds: int | None = None
    status_host: str = "127.0.0.1"
    status_port: int | None = None  # None: no status page
    save_every_rounds: int = 10  # write the agreed state to <state_dir>/state this often (and on exit)
    init_from: str | None = None  # θ(0) from this checkpoint (solo or saved swarm state) instead of the seed
    sinks: SinkConfig = field(default_factory=SinkConfig)  # TensorBoard / W&B copies of rounds.jsonl

    def __post_init__(self) -> None:
        if not self.state_dir:
            raise ValueError("state_dir is required")
        if self.save_every_rounds < 0:
            raise ValueError("save_every_rounds must be >= 0 (0: only on exit)")


class Coordinator(AgreedNode):
    def __init__(self, cfg: CoordinatorConfig, run: RunConfig):
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(identity_path=str(Path(cfg.state_dir) / "identity.key"), dht_options=cfg.dht, name="coordinator")
        self.cfg = cfg
        self.status.is_coordinator = True
        self.status.role = "coordinator"
        self.run = self._load_or_save_run(run)
        self.mode = mode_for(self.run)
        self.status_url = ""
        self.sinks = MetricSinks()  # opened once the run is known

    def _load_or_save_run(self, run: RunConfig) -> RunConfig:
        path = Path(self.cfg.state_dir) / "run.json"
        self.resumed = path.exists()
        if self.resumed:
            saved = from_plain(RunConfig, json.loads(path.read_text()))
            logger.info("resuming run %s from %s", saved.run_id, path)
            return saved
        run.created_at = time.time()
        return run

    def join_command(self) -> str:
        addrs = self.dht.visible_maddrs()
        return f"join-swarm {addrs[0]}" if addrs else "join-swarm <address>"

    async def main(self, on_ready: Callable[[Coordinator], None] | None = None) -> None:
        await self.start_network()
        if self.cfg.init_from:  # before publishing: the run names the checkpoint's hash
            self._initial = await asyncio.to_thread(initial_state, self.run, self.cfg.init_from)
            if self.run.init_hash and self.run.init_hash != self._initial.hash:
                raise ValueError(f"{self.cfg.init_from} is not the checkpoint this run started from")
            self.run.init_hash = self._initial.hash
            logger.info("θ(0) from %s (%s)", self.cfg.init_from, self._initial.hash[:10])
        self.run.coordinator = self.peer_id
        kept = Path(self.cfg.state_dir) / TOKENIZER_FILE  # swarm-coordinator --tokenizer put it there
        await obtain_run_tokenizer(self.run, self.files, local=kept if kept.is_file() else None)  # checked, served
        fetcher = ShardFetcher(self.files, coordinator=self.peer_id)
        self.data = RunData(self.run, fetcher)
        corpus = await self.data.stamp()  # the run description names the corpus it trains on
        (Path(self.cfg.state_dir) / "run.json").write_text(json.dumps(to_plain(self.run), indent=1))
        await self.dht.put(RUNS_KEY, self.run, RUN_TTL_S)
        self.start_heartbeats()
        await self._start_status_page()
        if on_ready is not None:
            on_ready(self)
        self.spawn(self._republish_loop())
        self.spawn(self._role_loop())
        self.spawn(fetcher.serve_available(self.run.corpus))
        # θ(0) once: its shapes type-check payloads now, and it is the state of a brand-new run.
        if not self.cfg.init_from:
            self._initial = await asyncio.to_thread(initial_state, self.run)
        shapes = {n: tuple(t.shape) for n, t in self._initial.params.items()}
        self.store = PayloadStore(self.run, shapes, self.traffic, fetch=self.fetch_blob)
        self.server.register("payload", self.store.serve)
        self.status.phase = "joining"
        state = await self._obtain_state()
        self.hold(RoundAgreement(self, self.store, state, self.mode))
        serve_state(self.server, self.agreement)  # at once: joiners look for a donor now
        corpus = corpus or await self.data.corpus(0)
        # Scores contributions when we lead (swarm/round/usefulness.py); built before the first round.
        self.agreement.validator.probe = await asyncio.to_thread(self.mode.make_probe, corpus)
        await self.agreement.adopt_ledger()  # standing earned before we restarted
        self.evaluator = None
        if self.cfg.evaluate:  # on data shard 0's held-out tail
            self.evaluator = await asyncio.to_thread(Replica, self.run, shard=0, device=torch.device("cpu"), corpus=corpus)
        self.log_event("start", f"coordinator of run {self.run.run_id} at round {state.round}")
        self.sinks = await asyncio.to_thread(
            MetricSinks.open, self.cfg.sinks, name="coordinator", group=self.run.run_id, config=to_plain(self.run)
        )
        await self._round_loop()

    async def _start_status_page(self) -> None:
        if self.cfg.status_port is None:
            return
        try:
            from swarm.status import StatusService
        except ImportError:
            logger.warning("status page not available in this build")
            return
        self.status_service = StatusService(self, host=self.cfg.status_host, port=self.cfg.status_port)
        await self.status_service.start()
        self.status_url = self.status_service.url

    @property
    def saved_state_dir(self) -> Path:
        return Path(self.cfg.state_dir) / "state"

    async def _obtain_state(self) -> GlobalState:
        """A restarted coordinator catches up like a joiner; if nobody holds a state as new as the one
        it saved, it resumes from its saved state (a run stopped entirely). A new run starts from θ(0)."""
        saved = await asyncio.to_thread(load_state, self.saved_state_dir, run_id=self.run.run_id)
        if saved is None:
            state = await catch_up(self, patience_s=float("inf") if self.resumed else 3.0)
            return state if state is not None else self._initial
        state = await catch_up(self, patience_s=SAVED_STATE_PATIENCE_S)
        if state is not None and state.round >= saved.round:
            return state
        self.log_event("resume", f"resuming from the saved state of round {saved.round} ({saved.hash[:10]})")
        return saved

    async def stop(self, *, announce_leave: bool = True) -> None:
        await self.save_agreed(self.saved_state_dir)
        await asyncio.to_thread(self.sinks.close)
        await super().stop(announce_leave=announce_leave)

    async def _republish_loop(self) -> None:
        while True:
            await asyncio.sleep(RUN_REFRESH_S)
            await self.dht.put(RUNS_KEY, self.run, RUN_TTL_S)

    async def _role_loop(self) -> None:
        keeper = RoleKeeper(self, self.mode)
        while True:
            await keeper.update()
            await asyncio.sleep(1.0)

    async def _round_loop(self) -> None:
        rounds = 0
        self._eval_task: asyncio.Task[None] | None = None
        while self.cfg.max_rounds is None or rounds < self.cfg.max_rounds:
            state = self.agreement.state
            r = state.round
            self.status.round, self.status.param_hash, self.status.phase = r, state.hash, "coordinating"
            await self._start_eval(state)
            await self.publish_heartbeat()
            manifest, applied = await self.agreement.settle_round(r, lambda: reload_state(self))
            if applied is None or manifest is None:
                continue
            rounds += 1
            self._record(manifest, applied)
            every = self.cfg.save_every_rounds
            if every and self.agreement.state.round % every == 0:
                await self.agreement.save(self.saved_state_dir)
            logger.info(
                "round %d closed by %s | %d payloads applied, %d rejected | eval loss %s | state %s",
                r,
                "us" if manifest.leader == self.peer_id else manifest.leader[-8:],
                applied,
                len(manifest.rejected),
                f"{self.status.loss:.4f}" if self.status.loss is not None else "-",
                self.agreement.state.hash[:10],
            )
        if self._eval_task is not None:
            await self._eval_task
        if self.evaluator is not None:  # the weights the last round produced
            final = self.agreement.state
            loss = await asyncio.to_thread(self.evaluator.evaluate, final)
            self._write_row({"round": final.round, "eval_loss": loss, "hash": final.hash, "final": True})
            logger.info("final eval loss after round %d: %.4f", final.round - 1, loss)

    async def _start_eval(self, state: GlobalState) -> None:
        """Eval loss of θ(r) in the background, on a copy taken under the state lock: evaluating
        never delays closing a round. One at a time: while the last one runs, a round goes
        unevaluated, and the loss reported with a round (`status.loss`) is the latest one measured."""
        if self.evaluator is None or (self._eval_task is not None and not self._eval_task.done()):
            return
        evaluator = self.evaluator
        async with self.agreement.lock:
            snapshot = await asyncio.to_thread(state.copy)

        async def evaluate() -> None:
            self.status.loss = await asyncio.to_thread(evaluator.evaluate, snapshot)

        self._eval_task = asyncio.create_task(evaluate())

    def _record(self, manifest: Manifest, applied: int) -> None:
        """One row per round in <state_dir>/rounds.jsonl (benchmarks and the status page read it)."""
        self._write_row(
            {
                "round": manifest.round,
                "eval_loss": manifest.eval_loss if manifest.leader == self.peer_id else self.status.loss,
                "applied": applied,
                "rejected": len(manifest.rejected),
                "payload_bytes": sum(e.size for e in manifest.entries),
                "aggregate": manifest.aggregate,  # the digest nodes applied instead of the payloads ("": none)
                "coverage": self.agreement.coverage,
                "apply_s": self.agreement.apply_s,
                "validate_s": self.agreement.validate_s if manifest.leader == self.peer_id else 0.0,
                "validate_cpu_s": self.agreement.validate_cpu_s if manifest.leader == self.peer_id else 0.0,
                **self.mode.round_metrics([(e.peer_id, e.inline) for e in manifest.entries]),
                **({"inline": inline_entries(manifest.entries)} if self.mode.inline_payload else {}),
                "leader": manifest.leader,
                "closed_at": manifest.closed_at,
                "bytes_sent": self.traffic.sent,  # cumulative: the leader's fetches and what it served
                "bytes_received": self.traffic.received,
                "base_hash": manifest.base_hash,
                "hash": self.agreement.state.hash,
                "time": time.time(),
            }
        )

    def _write_row(self, row: dict) -> None:
        with (Path(self.cfg.state_dir) / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.sinks.log(row)
