"""The status page's view of a run, read from the DHT only.

Every second the collector reads the heartbeats, event logs, manifests and submissions that peers
signed into the DHT (validated by SwarmDHT.get_all), so the page is right about peers the
coordinator never talked to and keeps working while the coordinator is down. Manifests are read
incrementally as rounds advance; on start it reads back up to `backfill_rounds` closed rounds.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from hivemind.utils import get_dht_time

from models import count_parameters, get_preset
from swarm import __version__
from swarm.log import get_logger
from swarm.modes import mode_for
from swarm.net.dht import Signed
from swarm.net.records import EventLog, Heartbeat, Manifest, Roster, Submission, manifest_key, run_key, submit_key
from swarm.round.evidence import proof_ok
from swarm.round.leadership import canonical_manifest
from swarm.run import RunConfig
from swarm.status.book import (
    BookConfig,
    EventMerger,
    PeerBook,
    PeerCounts,
    RoundHistory,
    clean_number,
    round_row,
    short_id,
)

logger = get_logger(__name__)
T = TypeVar("T")
API_VERSION = 1
GIVE_UP_AFTER_MISSES = 3  # a closed round whose manifest stays unreadable (expired) is skipped
LOOKAHEAD_ROUNDS = 2  # also look for manifests this far past the round most live peers are at


@dataclass
class CollectorConfig:
    """How often and how far back the status page reads the DHT."""

    poll_interval_s: float = 1.0
    backfill_rounds: int = 200  # closed rounds read back when the page starts
    max_parallel_gets: int = 16  # DHT reads in flight while backfilling
    departed_after_s: float = 60.0  # see BookConfig
    max_rounds: int = 300

    def __post_init__(self) -> None:
        if not self.poll_interval_s > 0:
            raise ValueError("poll_interval_s must be positive")
        if self.backfill_rounds < 0 or self.max_parallel_gets < 1 or self.max_rounds < 1:
            raise ValueError("backfill_rounds must be >= 0, max_parallel_gets and max_rounds >= 1")


class RecordReader(Protocol):
    """The part of SwarmDHT the collector reads through."""

    async def get_all(self, key: str, cls: type[T]) -> list[Signed[T]]: ...


class StatusSource(Protocol):
    """What the collector needs of a node (a SwarmNode, or a fake one in tests)."""

    @property
    def ready(self) -> bool: ...
    @property
    def run(self) -> RunConfig: ...
    @property
    def dht(self) -> RecordReader: ...
    @property
    def peer_id(self) -> str: ...
    async def heartbeats(self) -> list[Signed[Heartbeat]]: ...


class StatusCollector:
    """Polls the DHT through `node` (whose run description must be known) and keeps a snapshot."""

    def __init__(self, node: StatusSource, cfg: CollectorConfig | None = None):
        if not node.ready:
            raise ValueError("the node must be started and know its run before collecting status")
        self.node = node
        self.run = node.run
        self.cfg = cfg or CollectorConfig()
        book_cfg = BookConfig(
            heartbeat_ttl_s=self.run.heartbeat_ttl_s,
            departed_after_s=max(self.cfg.departed_after_s, self.run.heartbeat_ttl_s),
            max_rounds=self.cfg.max_rounds,
        )
        self.parameters = count_parameters(get_preset(self.run.preset, **self.run.model_overrides))
        self.tokens_per_step = self.run.batch_size * self.run.seq_len  # a payload's: × the round's H
        self.mode = mode_for(self.run)  # its per-round figures go into each round's row
        self.book = PeerBook(book_cfg)
        self.history = RoundHistory(book_cfg.max_rounds)
        self.events = EventMerger(book_cfg.max_events)
        self.counts = PeerCounts(book_cfg.max_samples, book_cfg.sample_every_s)
        self.polls = 0
        self.last_poll_at: float | None = None
        self.ready = asyncio.Event()  # set after the first complete poll
        self.on_poll: list[Callable[[], None]] = []  # called after every complete poll (the server's live push)
        self._next_round: int | None = None
        self._misses: dict[int, int] = {}
        self.roster: Roster | None = None
        model = get_preset(self.run.preset, **self.run.model_overrides)
        self.n_layers, self.n_experts = model.n_layers, model.n_experts

    async def run_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad poll must not take the page down
                logger.exception("status poll failed")
            await asyncio.sleep(max(0.0, self.cfg.poll_interval_s - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        beats, logs, rosters = await asyncio.gather(
            self.node.heartbeats(),
            self.node.dht.get_all(run_key(self.run.run_id, "events"), EventLog),
            self.node.dht.get_all(run_key(self.run.run_id, "roster"), Roster),
        )
        signed = [r.record for r in rosters if r.signer == self.run.coordinator]  # anyone else's is ignored
        if signed:
            self.roster = max(signed, key=lambda r: r.updated_at)
        now = get_dht_time()
        for change in self.book.update([b.record for b in beats], now):
            self.events.add("", [change], now)
        for log in logs:
            if log.record.peer_id == log.signer:
                self.events.add(log.signer, log.record.events, now)
        hint = self.book.round_hint()
        if hint is not None:
            await self._read_rounds(hint, now)
        counts = self.book.counts()
        self.counts.record(now, counts["live"], counts["stale"])
        self.polls += 1
        self.last_poll_at = now
        self.ready.set()
        for listener in self.on_poll:
            listener()

    async def _read_rounds(self, hint: int, now: float) -> None:
        """Read the manifests of rounds not yet recorded, from the oldest missing one to a little past `hint`.

        The manifests are the truth about which rounds closed; heartbeats only say where to look, and
        the reads per poll are bounded, so a peer claiming round 10**9 costs nothing.
        """
        if self._next_round is None:
            self._next_round = max(0, hint - self.cfg.backfill_rounds)
        last = min(hint + LOOKAHEAD_ROUNDS, self._next_round + self.cfg.backfill_rounds + LOOKAHEAD_ROUNDS)
        wanted = [r for r in range(self._next_round, last + 1) if r not in self.history]
        gate = asyncio.Semaphore(self.cfg.max_parallel_gets)
        found = await asyncio.gather(*(self._bounded(gate, self._read_round(r)) for r in wanted))
        for r, item in zip(wanted, found):
            if item is None:
                self._misses[r] = self._misses.get(r, 0) + int(r < hint)  # rounds in progress are no miss
                continue
            manifest, subs = item
            extra = self.mode.round_metrics([(e.peer_id, e.inline) for e in manifest.entries])
            row = round_row(
                manifest,
                subs,
                parameters=self.parameters,
                tokens_per_payload=self.tokens_per_step * self.run.inner_steps_at(r),
                extra=extra,
            )
            self.history.add(row)
            self.events.add_rejections(manifest, now)
        while self._next_round <= last:
            r = self._next_round
            if r not in self.history and self._misses.get(r, 0) < GIVE_UP_AFTER_MISSES:
                break
            self._misses.pop(r, None)
            self._next_round += 1

    @staticmethod
    async def _bounded(gate: asyncio.Semaphore, aw: Awaitable[T]) -> T:
        async with gate:
            return await aw

    async def _read_round(self, round_no: int) -> tuple[Manifest, dict[str, Submission]] | None:
        dht, run_id = self.node.dht, self.run.run_id
        found = [m for m in await dht.get_all(manifest_key(run_id, round_no), Manifest) if proof_ok(m.record, m.owner, m.signer)]
        manifest = canonical_manifest(found, round_no, self.run.coordinator)
        if manifest is None:
            return None
        subs = {
            s.signer: s.record
            for s in await dht.get_all(submit_key(run_id, round_no), Submission)
            if s.record.peer_id == s.signer and s.record.round == round_no
        }
        return manifest, subs

    # ----- what the API serves ---------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything the page shows, JSON-ready; ages are computed at call time."""
        now = get_dht_time()
        peers = self.book.to_json(now)
        names = {p["peer_id"]: p["name"] for p in peers}
        return {
            "api_version": API_VERSION,
            "generated_at": now,
            "summary": self.summary(now, peers),
            "peers": peers,
            "history": self.history_json(),
            "events": self.events.to_json(names),
            "roles": self.roles_json(names),
        }

    def roles_json(self, names: dict[str, str]) -> dict:
        """The coordinator's roster: each admitted peer's role and, for expert roles, the ownership
        map (expert index -> owners; an expert index is owned in every MoE layer)."""
        roles = self.roster.roles if self.roster is not None else []
        rows = []
        owners: dict[int, list[str]] = {e: [] for e in range(self.n_experts)}
        for role in roles:
            experts = sorted({e for _, e in role.experts})
            for e in experts:
                if e in owners:
                    owners[e].append(role.peer_id)
            rows.append(
                {
                    "peer_id": role.peer_id,
                    "name": names.get(role.peer_id, short_id(role.peer_id)),
                    "kind": role.kind,
                    "data_shard": role.data_shard,
                    "experts": experts,
                    "stage": role.stage,
                    "replica_group": role.replica_group,
                    "group_peers": list(role.group_peers),  # a pipeline group, in stage order
                    "layer_cuts": list(role.layer_cuts),
                }
            )
        has_experts = any(r["experts"] for r in rows)
        return {
            "peers": rows,
            "ownership": {"layers": self.n_layers, "experts": self.n_experts, "owners": owners} if has_experts else None,
        }

    def history_json(self) -> dict:
        return {"rounds": [row.to_json() for row in self.history.ordered()], "peers_over_time": list(self.counts.samples)}

    def summary(self, now: float, peers: list[dict] | None = None) -> dict:
        run, rows = self.run, self.history.ordered()
        peers = self.book.to_json(now) if peers is None else peers
        # The round in progress follows the last closed one (manifests, not heartbeat claims).
        current = rows[-1].round + 1 if rows else self.book.round_hint()
        coordinator = next((p for p in peers if p["peer_id"] == run.coordinator), None)
        counts = Counter(p["state"] for p in peers if not p["is_coordinator"])  # same `now` as the table
        payload = sum(r.payload_bytes for r in rows)
        dense = sum(r.dense_bytes for r in rows)
        return {
            "run_id": run.run_id,
            "mode": run.mode,
            "codec": run.outer.codec,
            "preset": run.preset,
            "parameters": self.parameters,
            "inner_steps": run.inner_steps,
            "round": current,
            "rounds_recorded": len(rows),
            "history_from_round": rows[0].round if rows else None,
            "total_tokens": sum(r.tokens for r in rows),
            "created_at": run.created_at or None,
            "elapsed_s": round(now - run.created_at, 1) if run.created_at else None,
            "eval_loss": self._eval_loss(coordinator),
            "train_loss": next((r.train_loss for r in reversed(rows) if r.train_loss is not None), None),
            "live_peers": counts["live"],
            "stale_peers": counts["stale"],
            "departed_peers": counts["departed"],
            "coordinator": {
                "peer_id": run.coordinator,
                "short_id": short_id(run.coordinator),
                "state": coordinator["state"] if coordinator else "unknown",
            },
            "payload_bytes_total": payload,
            "dense_bytes_total": dense,
            "compression": round(dense / payload, 1) if payload else None,
            "bytes_sent_total": sum(p["bytes_sent"] for p in peers),
            "heartbeat_ttl_s": run.heartbeat_ttl_s,
            "observer": {
                "peer_id": self.node.peer_id,
                "version": __version__,
                "polls": self.polls,
                "last_poll_at": self.last_poll_at,
            },
        }

    def _eval_loss(self, coordinator: dict | None) -> float | None:
        loss = self.history.latest_eval_loss()
        if loss is None and coordinator is not None:
            loss = coordinator["loss"]  # the coordinator reports its eval loss in its heartbeat
        return clean_number(loss)
