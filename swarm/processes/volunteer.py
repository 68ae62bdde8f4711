"""A volunteer peer: join a run, get a role, catch up on the state, then train round after round.

The event loop serves payloads, state and heartbeats; training and codec work run in a worker
thread. Ctrl+C sets `stopping`: the inner loop stops at the next step boundary, the peer announces
that it is leaving and shuts down; nobody waits for it, and no one's state is touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarm import __version__
from swarm.codec import PayloadError, inline_digest
from swarm.data.corpus import Corpus
from swarm.data.fetch import RunData, ShardFetcher, shard_file
from swarm.data.tokenizer import obtain_run_tokenizer
from swarm.log import get_logger
from swarm.modes import mode_for
from swarm.modes.base import Worker
from swarm.modes.replica import RoundWork, initial_state, measure_tokens_per_s, start_state
from swarm.net.dht import DHTOptions
from swarm.net.records import Capacity, Manifest, Role, Submission, role_key, run_key, submit_key
from swarm.net.schema import to_plain
from swarm.node import fetch_run_description, peak_rss_bytes, rss_bytes
from swarm.processes.admission import (
    AdmissionRefused,
    check_token,
    coordinator_refusal,
    invite_proof,
    refusal_before_joining,
    refusal_message,
)
from swarm.processes.agreed import AgreedNode
from swarm.processes.statesync import catch_up, reload_state, serve_state
from swarm.round.agreement import RoundAgreement
from swarm.round.overlap import next_base
from swarm.round.payloads import Encoded, PayloadEncoder, PayloadStore
from swarm.round.world import put_surely
from swarm.state import GlobalState
from swarm.train.sinks import MetricSinks, SinkConfig
from swarm.train.step import resolve_device

logger = get_logger(__name__)
CAPACITY_TTL_S = 3600.0  # renewed every third of it while the peer runs


@dataclass
class PeerConfig:
    """What a volunteer chooses; everything else comes from the run description."""

    coordinator: str  # coordinator peer id (from the join address)
    identity_path: str
    dht: DHTOptions
    name: str = "peer"
    device: str = "auto"
    out_dir: str | None = None  # per-round metrics JSONL goes here when set
    role_timeout_s: float = 15.0
    max_rounds: int | None = None  # stop after this many rounds (tests, benchmarks)
    threads: int | None = None  # torch intra-op threads
    save_dir: str | None = None  # keep a copy of the agreed state here (every save_every_rounds, and on exit)
    save_every_rounds: int = 10
    start_from: str | None = None  # a saved state or the run's initial checkpoint: replay from it instead of downloading
    memory_gb: float | None = None  # announced instead of the measured memory (join-swarm --memory-gb)
    tokenizer: str | None = None  # a local copy of the run's tokenizer.json (else fetched from the swarm)
    sinks: SinkConfig = field(default_factory=SinkConfig)  # TensorBoard / W&B copies of the per-round JSONL
    invite: str = ""  # an invite-only run's token (join-swarm --invite); never published, only a proof of it

    def __post_init__(self) -> None:
        if not self.coordinator:
            raise ValueError("a coordinator peer id is required")
        if self.role_timeout_s <= 0:
            raise ValueError("role_timeout_s must be positive")
        if self.invite:
            check_token(self.invite)


class Peer(AgreedNode):
    def __init__(self, cfg: PeerConfig):
        super().__init__(identity_path=cfg.identity_path, dht_options=cfg.dht, name=cfg.name)
        self.cfg = cfg
        self.stopping = threading.Event()
        self.device = resolve_device(cfg.device)
        self.status.device = str(self.device)
        self.rounds_done = 0
        self.sinks = MetricSinks()  # opened when rounds start (the run is known then)
        self._background: set[asyncio.Task[None]] = set()  # DHT writes not waited for (see _in_background)
        self._traffic_reported = (0, 0)  # transfer bytes (sent, received) at the last round's report
        self._state_held_at = 0.0

    async def main(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        await self.start_network()
        logger.info("peer %s listening on %s", self.peer_id, " ".join(self.dht.visible_maddrs()))
        self.run = await fetch_run_description(self.dht, self.cfg.coordinator, timeout_s=60)
        logger.info("joined run %s (%s, preset %s) as %s", self.run.run_id, self.run.mode, self.run.preset, self.peer_id)
        self.mode = mode_for(self.run)
        # The run's tokenizer before anything else: a peer with another one is refused right here.
        await obtain_run_tokenizer(self.run, self.files, local=self.cfg.tokenizer)
        self.start_heartbeats()
        self.role = await self._get_role()
        self.status.role = self.mode.describe_role(self.role)
        self.worker: Worker = await asyncio.to_thread(
            self.mode.make_worker, self.role, self.device, await self._corpus(self.role.data_shard)
        )
        await self.mode.attach_worker(self.worker, self)
        shapes = {n: tuple(p.shape) for n, p in sorted(self.worker.model.named_parameters())}
        self.store = PayloadStore(self.run, shapes, self.traffic, fetch=self.fetch_blob)
        self.encoder = PayloadEncoder(self.run, self.peer_id)
        self.server.register("payload", self.store.serve)
        state = await self._obtain_state()
        self._state_held_at = time.time()  # joining: the agreed state (or our part) is here
        self.status.partial = state.partial
        self.hold(RoundAgreement(self, self.store, state, self.mode))
        serve_state(self.server, self.agreement)
        await self.agreement.adopt_ledger()  # standing earned before we joined (or restarted)
        self.log_event("join", f"{self.status.name} joined at round {state.round} on {self.device}")
        await self._round_loop()

    # ----- joining ---------------------------------------------------------------------------

    async def _corpus(self, data_shard: int) -> Corpus:
        """What a role with this data shard reads: its corpus shard fetched and verified (then served
        to others), or the run's data source checked against the identity the coordinator signed."""
        fetcher = ShardFetcher(self.files, coordinator=self.run.coordinator)
        self.spawn(fetcher.serve_available(self.run.corpus))
        return await RunData(self.run, fetcher).corpus(data_shard)

    async def _keep_announcing(self, capacity: Capacity) -> None:
        """Renew the capacity announcement before it expires: the coordinator counts a peer as live
        only while it is announced (an announcement made once dropped a peer after an hour)."""
        while True:
            await asyncio.sleep(CAPACITY_TTL_S / 3)
            await self.dht.put(run_key(self.run.run_id, "peers"), capacity, ttl_s=CAPACITY_TTL_S)

    async def _get_role(self) -> Role:
        """Announce our capacity and wait for the role the coordinator signs. A peer the run's
        admission policy refuses raises AdmissionRefused, saying why, instead of waiting for ever."""
        admission = self.run.admission
        refusal = refusal_before_joining(admission, self.peer_id, invited=bool(self.cfg.invite))
        if refusal is not None:
            raise AdmissionRefused(refusal)
        if self.cfg.invite and admission.policy != "invite":
            logger.warning("this run does not admit by invite (its policy is %s): --invite is not used", admission.policy)
        capacity = Capacity(
            peer_id=self.peer_id,
            name=self.status.name,
            device=str(self.device),
            memory_gb=self.cfg.memory_gb if self.cfg.memory_gb is not None else _memory_gb(self.device),
            tokens_per_s=await asyncio.to_thread(measure_tokens_per_s, self.run, self.device),
            addrs=self.dht.visible_maddrs()[:4],
            version=__version__,
            invite=invite_proof(self.cfg.invite, self.run.run_id, self.peer_id) if admission.policy == "invite" else "",
        )
        announced_at = self.wall_time()  # an older refusal was of an earlier announcement
        await self.dht.put(run_key(self.run.run_id, "peers"), capacity, ttl_s=CAPACITY_TTL_S)
        self.spawn(self._keep_announcing(capacity))
        deadline = time.monotonic() + self.cfg.role_timeout_s
        while time.monotonic() < deadline:
            role = await self._signed_role()
            if role is not None:
                return role
            if admission.can_refuse and (reason := await coordinator_refusal(self, since=announced_at)) is not None:
                raise AdmissionRefused(refusal_message(admission, reason))
            await asyncio.sleep(0.5)
        if admission.can_refuse and self.run.coordinator in {b.peer_id for b in await self.live_peers()}:
            raise AdmissionRefused(refusal_message(admission, await coordinator_refusal(self, since=0.0)))
        # Without a coordinator the swarm still runs: take the default role with a shard from our id.
        shard = int(hashlib.sha256(self.peer_id.encode()).hexdigest(), 16) % self.run.num_shards
        role = self.mode.default_role(self.peer_id, shard)
        logger.warning(
            "no role from the coordinator after %.0fs; taking %s", self.cfg.role_timeout_s, self.mode.describe_role(role)
        )
        return role

    async def _signed_role(self) -> Role | None:
        """Our role as the coordinator last signed it, if there is one."""
        item = await self.dht.get_from(role_key(self.run.run_id, self.peer_id), Role, self.run.coordinator)
        return item.record if item is not None and item.record.peer_id == self.peer_id else None

    async def _refresh_role(self, role: Role | None) -> None:
        """Follow a role the coordinator changed (e.g. experts reassigned after an owner left)."""
        if role is None or role == self.role:
            return
        if role.data_shard != self.role.data_shard:
            # E.g. a default shard taken while the coordinator was slow: two peers on one shard would
            # send the same update from the same data, and the copy check would refuse both.
            moved = shard_file(self.run, role.data_shard) != shard_file(self.run, self.role.data_shard)
            corpus = await self._corpus(role.data_shard) if moved else None  # None: the same file
            await asyncio.to_thread(self.worker.read_shard, role.data_shard, corpus)
        await asyncio.to_thread(self.mode.update_worker, self.worker, role)
        await self._hold_part(role)
        self.log_event("role", f"{self.status.name}: {self.mode.describe_role(self.role)} -> {self.mode.describe_role(role)}")
        self.role = role
        self.status.role = self.mode.describe_role(role)

    async def _obtain_state(self) -> GlobalState:
        """The newest agreed state from the swarm; θ(0) only if nobody holds any state (and the run
        does not start from a checkpoint). With `start_from`, a state on disk instead: the round loop
        then applies the manifests since (a replay, cheap on the wire in modes with inline payloads)."""
        self.status.phase = "joining"
        held = self._held()
        if self.cfg.start_from:
            saved = await asyncio.to_thread(start_state, self.run, self.cfg.start_from)
            self.log_event("start", f"{self.status.name} starts from round {saved.round} ({saved.hash[:10]}) on disk")
            return saved if held is None else saved.part(held)
        state = await catch_up(self, patience_s=float("inf") if self.run.init_hash else 6.0, names=held)
        if state is None:
            logger.info("no peer holds any state: starting from the run's initial weights")
            state = await asyncio.to_thread(initial_state, self.run)
            state = state if held is None else state.part(held)
        return state

    def _held(self, role: Role | None = None) -> list[str] | None:
        """The part of the agreed state our role holds (None: all of it): swarm/modes/base.py."""
        return self.mode.held_names(role or self.role, list(self.store.shapes))

    def _reload(self) -> Awaitable[GlobalState]:
        return reload_state(self, names=self._held())

    async def _hold_part(self, role: Role) -> None:
        """Hold the part of the state a new role needs: cut from what we hold if it is inside it,
        else downloaded (the old part is freed with the old state)."""
        want, state = self._held(role), self.agreement.state
        have = set(state.params) if state.partial else None
        if (None if want is None else set(want)) == have:
            return
        if want is not None and (have is None or set(want) <= have) and self.agreement.known_hash():
            async with self.agreement.lock:
                self.agreement.state = await asyncio.to_thread(state.part, want)
        else:
            fresh = await reload_state(self, names=want)
            async with self.agreement.lock:
                self.agreement.state = fresh
        self.status.partial = self.agreement.state.partial
        held = "all of it" if want is None else f"{len(want)} tensors"
        self.log_event("part", f"{self.status.name} holds {held} of the state at round {self.agreement.state.round}")

    # ----- rounds ----------------------------------------------------------------------------

    async def _round_loop(self) -> None:
        """Train, submit, settle, round after round. With `outer.overlap` the manifest of round r is
        awaited only after round r+1's inner steps (swarm/round/overlap.py); otherwise right away."""
        # Inline modes (SPSA) replay each round's update from the agreed state: they keep in step.
        self._overlap = self.run.outer.overlap and not self.mode.inline_payload
        self._leftover: _InFlight | None = None
        self.sinks = await asyncio.to_thread(
            MetricSinks.open,
            self.cfg.sinks,
            name=f"peer-{self.peer_id[-8:]}",
            group=self.run.run_id,
            config={"peer_name": self.cfg.name, "device": str(self.device), **to_plain(self.run)},
        )
        metrics = _MetricsFile(self.cfg.out_dir, self.peer_id, self.sinks)
        self._landed_at = time.perf_counter()
        flight: _InFlight | None = None
        role_fetch: asyncio.Task[Role | None] | None = None  # our role, fetched while the last round trained
        try:
            while not self.stopping.is_set():
                if self.cfg.max_rounds is not None and self.rounds_done + (flight is not None) >= self.cfg.max_rounds:
                    if flight is None:
                        break
                    await self._land(flight, metrics)
                    flight = None
                    continue
                if flight is None:
                    state = self.agreement.state
                    self.status.round, self.status.param_hash = state.round, state.hash
                    if await self.agreement.closed(state.round):  # behind: apply it without training
                        await self._land(self._settle(state.round, None, None, None), metrics)
                        continue
                    base = state  # nothing settles meanwhile: train from the agreed state itself
                else:
                    assert flight.next_base is not None
                    base = flight.next_base
                r = base.round
                # Overlapped, the role was fetched while the last round trained; in step (pipeline
                # groups, which must follow a replacement at once) it is fetched right now.
                await self._refresh_role(await role_fetch if role_fetch is not None else await self._signed_role())
                if flight is None and base is not self.agreement.state:
                    continue  # our part of the state was cut or downloaded for a new role: start over from it
                steady = self._overlap and self.status.phase in ("training", "exchanging")
                self.status.phase = "training"
                if steady:
                    self._in_background(self.publish_heartbeat(), "heartbeat")
                else:  # a leader waits only for peers whose heartbeat says they train: say so before we do
                    await self.publish_heartbeat()
                links_before, started_at, trained_from = self._link_bytes(), time.perf_counter(), time.time()
                role_fetch = asyncio.create_task(self._signed_role()) if self._overlap else None  # cancelled on exit
                work = await self._train(base)
                self._note_link_rates(links_before, time.perf_counter() - started_at)
                if work is None and self.stopping.is_set():
                    break
                if work is None:  # nothing for our role this round (a spare, or a pipeline stage whose group broke)
                    await self._sit_out(r)
                    continue
                late: asyncio.Task[bool] | None = None
                if flight is not None:
                    landed = await self._land(flight, metrics)
                    flight = None
                    if not landed or self.agreement.state.round != r:
                        continue  # reloaded, or too late for round r: its work is dropped
                    late = asyncio.create_task(self.agreement.closed(r))  # checked while we encode
                submitted = await self._submit(r, work, late)
                if submitted is None:
                    continue  # round r closed while we trained: the work is dropped
                flight = submitted
                flight.trained_from = trained_from
                if flight.next_base is None:  # in step: this round settles before the next one trains
                    await self._land(flight, metrics)
                    flight = None
        finally:
            # Leaving with a round in flight: let it settle in the background (never cancel an apply
            # mid-way; a save on exit waits for the state lock, so it never sees half a round).
            self._leftover = flight
            if role_fetch is not None:
                role_fetch.cancel()
        self.status.phase = "leaving"

    async def _submit(self, r: int, work: RoundWork, late: asyncio.Task[bool] | None = None) -> _InFlight | None:
        """Encode and announce our payload of round r (on the agreed θ(r)) and start settling it.
        `late`: whether round r has closed meanwhile (then nothing is sent and None returned).
        Overlapped, only the encoding and the next round's start stand between two rounds' inner
        steps: the DHT records go out in the background (the settle task does not need them)."""
        state = self.agreement.state
        if work.inline is not None:  # a mode whose payload rides in the submission record
            encoded = Encoded(work.inline, inline_digest(work.inline))
        else:
            encoded = await asyncio.to_thread(self.encoder.encode, work.delta, r)
        if late is not None and await late:
            if work.inline is None:
                self.encoder.excluded()  # never sent: the whole Δ goes back into the error buffer
            return None
        self.store.hold(encoded.digest, encoded.data)
        sub = Submission(
            self.peer_id, r, encoded.digest, len(encoded.data), state.hash, work.tokens, work.loss, inline=work.inline or b""
        )
        self.status.phase, self.status.loss = "exchanging", work.loss
        self.status.tokens_per_s = work.tokens / max(work.compute_s, 1e-9)
        self.status.steps += self.run.inner_steps_at(r)
        announce = self._announce(r, sub)
        if self._overlap:
            self._in_background(announce, f"round {r} submission")
        else:
            await announce
        # The next round's start, taken before the settle task can touch the state.
        base = await asyncio.to_thread(self._next_base, state, encoded, r) if self._overlap else None
        return self._settle(r, work, encoded, base)

    async def _announce(self, r: int, sub: Submission) -> None:
        if not await put_surely(self.dht, submit_key(self.run.run_id, r), sub, ttl_s=self.run.round_timeout_s * 4 + 60):
            logger.warning("round %d: could not announce our payload (no DHT node stored it)", r)
        await self.publish_heartbeat()

    def _in_background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run a DHT write without waiting for it; a failure is logged (heartbeats repeat anyway)."""
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("%s: %s failed: %s", self.status.name, what, t.exception())

        task.add_done_callback(done)

    def _next_base(self, state: GlobalState, encoded: Encoded, r: int) -> GlobalState | None:
        """Where round r+1 starts: θ(r) advanced by our own payload as if it were the mean (overlap.py).
        None (this round in step) if our own payload does not decode: it cannot be the mean of anything."""
        try:
            tensors = self.store.decode(encoded.data, sender=self.peer_id, round_no=r)
        except PayloadError as e:
            logger.error("round %d: our own payload does not decode (%s); not overlapping this round", r, e)
            return None
        return next_base(state, tensors, self.mode)

    def _settle(self, r: int, work: RoundWork | None, encoded: Encoded | None, base: GlobalState | None) -> _InFlight:
        task = asyncio.create_task(self.agreement.settle_round(r, self._reload))
        return _InFlight(r, work, encoded, task, base, time.time() if encoded is not None else None)

    def _returned(self, encoded: Encoded, r: int, kept: dict[str, torch.Tensor]) -> None:
        """Round r applied an aggregate: what it dropped of our payload goes back to our error buffer."""
        try:
            sent = self.store.decode(encoded.data, sender=self.peer_id, round_no=r)
        except PayloadError:
            return  # our own payload does not decode (logged when it was encoded): nothing to return
        self.encoder.returned(sent, kept)

    async def _land(self, flight: _InFlight, metrics: _MetricsFile) -> bool:
        """Wait for the round's manifest to be applied and report it; False if we had to reload."""
        manifest, applied = await flight.settle
        if manifest is None:  # reloaded: the swarm settled the round without us (did our payload make it? unknown)
            return False
        included = any(e.peer_id == self.peer_id for e in manifest.entries)
        if flight.encoded is not None and not included:
            self.encoder.excluded()  # before the next round is encoded: e is restored to a
            self.log_event("excluded", f"round {flight.round}: our payload missed the manifest")
        elif flight.encoded is not None and (kept := self.agreement.applied_aggregate(flight.round)) is not None:
            await asyncio.to_thread(self._returned, flight.encoded, flight.round, kept)
        if applied is None:
            return False
        self.rounds_done += 1
        now = time.perf_counter()
        self._report(flight, applied, included, now - self._landed_at, metrics)
        self._landed_at = now
        if self.cfg.save_dir and self.agreement.state.round % max(1, self.cfg.save_every_rounds) == 0:
            await self.agreement.save(self.cfg.save_dir)
        return True

    def _link_bytes(self) -> dict[str, int]:
        """Bytes moved per neighbour by a worker that links to other peers (pipeline stages)."""
        return self.worker.link_bytes()

    def _note_link_rates(self, before: dict[str, int], elapsed_s: float) -> None:
        after = self._link_bytes()
        self.status.links = {p: (n - before.get(p, 0)) / max(elapsed_s, 1e-9) for p, n in after.items()}

    async def _train(self, base: GlobalState) -> RoundWork | None:
        """The worker's round from `base`, in a thread. A role whose round needs partners (a pipeline
        stage's group) is watched meanwhile (`_watch_round`), so that a round that cannot finish is
        given up at once instead of after the link's timeout."""
        partners = self.mode.round_partners(self.role)
        if not partners:
            return await asyncio.to_thread(self.worker.train_round, base, self.stopping)
        halt = threading.Event()
        watch = asyncio.create_task(self._watch_round(halt, base.round, set(partners)))
        try:
            return await asyncio.to_thread(self.worker.train_round, base, halt)
        finally:
            watch.cancel()

    async def _watch_round(self, halt: threading.Event, r: int, partners: set[str]) -> None:
        """Set `halt` when we leave, or round r cannot finish: the coordinator changed our role (our
        group re-formed around a dead stage), the round closed without us, a partner is gone (a dead
        stage's group waits for a newcomer), or a partner sits it out or is past it (a stage that
        joined as its group gave round r up went on to train it alone)."""
        every = max(1.0, self.run.heartbeat_interval_s)
        looked = time.monotonic()
        while not halt.is_set():
            if self.stopping.is_set():
                halt.set()
                return
            if time.monotonic() - looked >= every:
                looked = time.monotonic()
                why = await self._round_lost(r, partners)
                if why is not None:
                    logger.info("giving round %d up: %s", r, why)
                    halt.set()
                    return
            await asyncio.sleep(0.25)

    async def _round_lost(self, r: int, partners: set[str]) -> str | None:
        role = await self._signed_role()
        if role is not None and role != self.role:
            return f"our role changed to {self.mode.describe_role(role)}"
        beats = {b.peer_id: b for b in await self.member_peers() if b.peer_id in partners}
        if gone := sorted(partners - set(beats)):
            return f"{gone[0][-8:]} is gone (no heartbeat)"  # its group waits for a newcomer to take its place
        for beat in beats.values():
            if beat.round > r or (beat.round == r and beat.phase == "joining"):
                return f"{beat.peer_id[-8:]} sits it out"
        if await self.agreement.closed(r):
            return "it closed without us"
        return None

    async def _sit_out(self, r: int) -> None:
        """Follow round r without contributing: say so (a "joining" peer is not waited for), then
        apply the round's manifest like everyone else."""
        self.status.phase = "joining"
        await self.publish_heartbeat()
        _, applied = await self.agreement.settle_round(r, self._reload)
        if applied is not None:
            self.rounds_done += 1
        state = self.agreement.state
        self.status.round, self.status.param_hash = state.round, state.hash

    def _report(self, flight: _InFlight, applied: int, included: bool, round_s: float, metrics: _MetricsFile) -> None:
        r, work, encoded = flight.round, flight.work, flight.encoded
        state = self.agreement.state
        self.status.round, self.status.param_hash, self.status.phase = state.round, state.hash, "idle"
        dense_bytes = 4 * sum(math.prod(shape) for shape in self.store.shapes.values())
        row: dict[str, object] = {
            "round": r,
            "applied": applied,
            "included": included,
            "hash": state.hash,
            "loss": work.loss if work else None,
            "tokens": work.tokens if work else 0,
            "tokens_per_s": work.tokens / round_s if work else 0.0,
            "compute_s": work.compute_s if work else 0.0,
            "compute_cpu_s": work.compute_cpu_s if work else 0.0,
            "apply_s": self.agreement.apply_s,
            "apply_cpu_s": self.agreement.apply_cpu_s,
            "round_s": round_s,
            "submitted_at": flight.submitted_at,  # with the row's "time" (applied): round-close latency
            "trained_from": flight.trained_from,  # wall clock when this round's inner steps began
            "payload_bytes": len(encoded.data) if encoded else 0,
            "compression": dense_bytes / len(encoded.data) if encoded else None,
            "bytes_sent": self.traffic.sent,
            "bytes_received": self.traffic.received,
            "role": self.status.role,
            **self._memory_and_bytes(state),
            **self.worker.memory_bytes(),
        }
        metrics.write(row)
        logger.info(
            "round %d | loss %s | %.0f tok/s | sent %s recv %s | payload %s (%sx) | %d applied in %.2fs | %s",
            r,
            f"{work.loss:.4f}" if work else "-",
            row["tokens_per_s"],
            _human(self.traffic.sent),
            _human(self.traffic.received),
            _human(len(encoded.data) if encoded else 0),
            f"{dense_bytes / len(encoded.data):.0f}" if encoded else "-",
            applied,
            self.agreement.apply_s,
            state.hash[:10],
        )

    def _memory_and_bytes(self, state: GlobalState) -> dict[str, int | float]:
        """This round's transfer bytes and the memory held now (also put in the heartbeat, so the
        status page shows them beside the peer's role)."""
        last_sent, last_received = self._traffic_reported
        self._traffic_reported = (self.traffic.sent, self.traffic.received)
        s = self.status
        s.round_bytes_out, s.round_bytes_in = self.traffic.sent - last_sent, self.traffic.received - last_received
        if self.device.type == "cuda":
            s.device_bytes = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        held = sum(t.numel() * t.element_size() for part in (state.params, state.momentum) for t in part.values())
        return {
            "round_bytes_in": s.round_bytes_in,
            "round_bytes_out": s.round_bytes_out,
            "rss_bytes": rss_bytes(),
            "rss_peak_bytes": peak_rss_bytes(),
            "device_bytes": s.device_bytes,
            "state_bytes": held,  # the agreed state (or the part of it) this peer holds
            "state_held_at": self._state_held_at,  # wall time it first held the state, joining
        }

    async def stop(self, *, announce_leave: bool = True) -> None:
        if self.cfg.save_dir:
            await self.save_agreed(self.cfg.save_dir)
        await asyncio.to_thread(self.sinks.close)
        await super().stop(announce_leave=announce_leave)


@dataclass
class _InFlight:
    """A round we submitted to (or follow) whose manifest is being awaited and applied."""

    round: int
    work: RoundWork | None
    encoded: Encoded | None
    settle: asyncio.Task[tuple[Manifest | None, int | None]]
    next_base: GlobalState | None  # where the next round's inner steps start (overlap only)
    submitted_at: float | None = None  # wall clock when our submission went out
    trained_from: float | None = None  # wall clock when our inner steps of this round began


class _MetricsFile:
    def __init__(self, out_dir: str | None, peer_id: str, sinks: MetricSinks):
        self.path = Path(out_dir) / f"peer-{peer_id[-8:]}.jsonl" if out_dir else None
        self.sinks = sinks
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps({**row, "time": time.time()}) + "\n")
        self.sinks.log(row)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"
