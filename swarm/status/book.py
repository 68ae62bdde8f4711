"""What the status page remembers between DHT polls: peers seen, rounds closed, events, peer counts.

Pure bookkeeping over records that the DHT layer has already validated (no I/O here), so the rules
(when a peer is stale or departed, how event logs merge, what a round cost) are testable without a
swarm. Everything a peer wrote is untrusted text: it is cut to a bounded length here and escaped by
the page, never interpreted.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

from swarm.net.records import Event, Heartbeat, Manifest, Submission

PeerState = Literal["live", "stale", "departed"]
MAX_NAME_CHARS = 100
MAX_TEXT_CHARS = 300


def clean_text(value: object, limit: int = MAX_NAME_CHARS) -> str:
    """A peer-provided string, bounded; escaping is the page's job (it only uses textContent)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean_number(value: float | int | None) -> float | int | None:
    """JSON has no NaN or infinity: a non-finite number a peer reported becomes null."""
    if value is None or isinstance(value, bool):
        return None
    return value if math.isfinite(value) else None


def short_id(peer_id: str) -> str:
    return peer_id[-8:]


@dataclass
class BookConfig:
    """Retention and liveness rules of the status page."""

    heartbeat_ttl_s: float  # the run's: a peer silent this long is stale
    departed_after_s: float = 60.0  # a silent peer shows as stale this long, then as departed
    max_peers: int = 500  # departed peers beyond this are forgotten, oldest first
    max_rounds: int = 300  # rounds kept in the history (the page plots these)
    max_events: int = 500
    max_samples: int = 1000  # points of the peers-over-time plot
    sample_every_s: float = 10.0  # a peer-count sample at least this often (and on every change)

    def __post_init__(self) -> None:
        if not self.heartbeat_ttl_s > 0:
            raise ValueError("heartbeat_ttl_s must be positive")
        if self.departed_after_s < self.heartbeat_ttl_s:
            raise ValueError("departed_after_s must be at least heartbeat_ttl_s")
        for name in ("max_peers", "max_rounds", "max_events", "max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.sample_every_s > 0:
            raise ValueError("sample_every_s must be positive")


@dataclass
class PeerEntry:
    beat: Heartbeat
    first_seen: float
    state: PeerState = "live"


class PeerBook:
    """The latest heartbeat of every peer ever seen, with its live/stale/departed state."""

    def __init__(self, cfg: BookConfig):
        self.cfg = cfg
        self.peers: dict[str, PeerEntry] = {}

    def state_of(self, beat: Heartbeat, now: float) -> PeerState:
        age = now - beat.time
        if beat.phase == "leaving" or age > self.cfg.departed_after_s:
            return "departed"
        return "stale" if age > self.cfg.heartbeat_ttl_s else "live"

    def update(self, beats: list[Heartbeat], now: float) -> list[Event]:
        """Take in the heartbeats read from the DHT; returns events for state changes we observed."""
        for beat in beats:
            if not math.isfinite(beat.time):
                continue
            # A clock ahead of ours (or a liar) must not keep a peer 'live' after it went silent.
            beat = replace(beat, time=min(beat.time, now))
            entry = self.peers.get(beat.peer_id)
            if entry is None:
                self.peers[beat.peer_id] = PeerEntry(beat, first_seen=now, state=self.state_of(beat, now))
            elif beat.time > entry.beat.time:
                entry.beat = beat
        changes = []
        for entry in self.peers.values():
            new = self.state_of(entry.beat, now)
            if new != entry.state:
                changes.append(self._change_event(entry, new, now))
                entry.state = new
        self._forget_oldest()
        return [e for e in changes if e is not None]

    def _change_event(self, entry: PeerEntry, new: PeerState, now: float) -> Event | None:
        beat, age = entry.beat, now - entry.beat.time
        who = f"{clean_text(beat.name, 40)} ({short_id(beat.peer_id)})"
        if new == "stale":
            return Event(now, "stale", f"{who}: no heartbeat for {age:.0f}s")
        if new == "departed" and beat.phase != "leaving":  # a leaving peer logs its own goodbye
            return Event(now, "departed", f"{who}: silent for {age:.0f}s, presumed gone")
        if new == "live" and entry.state == "stale":
            return Event(now, "back", f"{who}: heartbeats resumed")
        return None

    def _forget_oldest(self) -> None:
        excess = len(self.peers) - self.cfg.max_peers
        if excess > 0:
            departed = sorted((e.beat.time, pid) for pid, e in self.peers.items() if e.state == "departed")
            for _, pid in departed[:excess]:
                del self.peers[pid]

    def name_of(self, peer_id: str) -> str:
        entry = self.peers.get(peer_id)
        return clean_text(entry.beat.name) if entry else ""

    def round_hint(self) -> int | None:
        """The round live peers are at, robust to a liar: the lower median of their claims."""
        rounds = [e.beat.round for e in self.peers.values() if e.state == "live" and e.beat.round >= 0]
        return statistics.median_low(rounds) if rounds else None

    def counts(self) -> dict[str, int]:
        counts = {"live": 0, "stale": 0, "departed": 0}
        for entry in self.peers.values():
            if not entry.beat.is_coordinator:
                counts[entry.state] += 1
        return counts

    def to_json(self, now: float) -> list[dict]:
        order = {"live": 0, "stale": 1, "departed": 2}
        entries = sorted(self.peers.values(), key=lambda e: (order[e.state], not e.beat.is_coordinator, e.beat.peer_id))
        return [peer_json(e, self.state_of(e.beat, now), now) for e in entries]


def peer_json(entry: PeerEntry, state: PeerState, now: float) -> dict:
    b = entry.beat
    return {
        "peer_id": b.peer_id,
        "short_id": short_id(b.peer_id),
        "name": clean_text(b.name),
        "role": clean_text(b.role),
        "device": clean_text(b.device, 40),
        "version": clean_text(b.version, 40),
        "phase": b.phase,
        "state": state,
        "is_coordinator": b.is_coordinator,
        "round": b.round,
        "steps": b.steps,
        "tokens_per_s": clean_number(b.tokens_per_s),
        "loss": clean_number(b.loss),
        "bytes_sent": b.bytes_sent,
        "bytes_received": b.bytes_received,
        "heartbeat_age_s": round(max(0.0, now - b.time), 2),
        "last_heartbeat": b.time,
        "first_seen": entry.first_seen,
        "addrs": [clean_text(a, 200) for a in b.addrs[:4]],  # where `join-swarm`/`swarm-status` can reach it
        "reachable": b.reachable,  # False: behind NAT, dials out and is reached over its own connections or relays
        "links": {short_id(p): clean_number(v) for p, v in sorted(b.links.items())[:8]},  # activation bytes/s per neighbour
        "ram_bytes": b.ram_bytes,  # what its role costs it: resident memory, accelerator memory, bytes a round
        "device_bytes": b.device_bytes,
        "round_bytes_in": b.round_bytes_in,
        "round_bytes_out": b.round_bytes_out,
    }


@dataclass
class RoundRow:
    """One closed round as the page plots it."""

    round: int
    closed_at: float
    leader: str
    payloads: int
    rejected: int
    payload_bytes: int
    dense_bytes: int  # what dense fp32 DiLoCo would have moved: 4 bytes x parameters x payloads
    eval_loss: float | None
    train_loss: float | None  # mean over the accepted submissions that reported one
    tokens: int
    tokens_estimated: bool  # submissions had expired: tokens = payloads x H x batch x seq_len
    extra: dict[str, float | int] = field(default_factory=dict)  # the mode's own per-round figures (SPSA: scalars)

    def to_json(self) -> dict:
        row = dict(self.__dict__)
        for name in ("closed_at", "eval_loss", "train_loss"):
            row[name] = clean_number(row[name])
        row["leader_short"] = short_id(self.leader)
        return row


def round_row(
    manifest: Manifest,
    subs: dict[str, Submission],
    *,
    parameters: int,
    tokens_per_payload: int,
    extra: dict[str, float | int] | None = None,
) -> RoundRow:
    accepted = [subs.get(e.peer_id) for e in manifest.entries]
    known = [s for s in accepted if s is not None]
    losses = [s.loss for s in known if s.loss is not None and math.isfinite(s.loss)]
    estimated = len(known) < len(accepted)
    tokens = sum(s.tokens for s in known) + (len(accepted) - len(known)) * tokens_per_payload
    return RoundRow(
        round=manifest.round,
        closed_at=manifest.closed_at,
        leader=manifest.leader,
        payloads=len(manifest.entries),
        rejected=len(manifest.rejected),
        payload_bytes=sum(e.size for e in manifest.entries),
        dense_bytes=4 * parameters * len(manifest.entries),
        eval_loss=manifest.eval_loss,
        train_loss=sum(losses) / len(losses) if losses else None,
        tokens=tokens,
        tokens_estimated=estimated,
        extra=extra or {},
    )


class RoundHistory:
    """The most recent closed rounds, by round number."""

    def __init__(self, max_rounds: int):
        self.max_rounds = max_rounds
        self.rows: dict[int, RoundRow] = {}

    def __contains__(self, round_no: int) -> bool:
        return round_no in self.rows

    def add(self, row: RoundRow) -> None:
        self.rows[row.round] = row
        while len(self.rows) > self.max_rounds:
            del self.rows[min(self.rows)]

    def ordered(self) -> list[RoundRow]:
        return [self.rows[r] for r in sorted(self.rows)]

    def latest_eval_loss(self) -> float | None:
        for row in reversed(self.ordered()):
            if row.eval_loss is not None and math.isfinite(row.eval_loss):
                return row.eval_loss
        return None


@dataclass(frozen=True)
class LoggedEvent:
    time: float
    kind: str
    peer_id: str  # who reported it ("" for the status page's own observations)
    text: str


class EventMerger:
    """All peers' event logs plus manifest rejections, de-duplicated, newest first, bounded."""

    def __init__(self, max_events: int):
        self.max_events = max_events
        self.seen: dict[tuple, LoggedEvent] = {}

    def add(self, peer_id: str, events: list[Event], now: float) -> None:
        for e in events:
            # A peer's clock (or a liar) must not pin its events above everyone else's.
            t = min(e.time, now) if math.isfinite(e.time) else now
            event = LoggedEvent(t, clean_text(e.kind, 24), peer_id, clean_text(e.text, MAX_TEXT_CHARS))
            # A leader logs each rejection and also lists it in the manifest: keep one of the two.
            key = ("reject", event.text[:160]) if event.kind == "reject" else (peer_id, e.time, event.kind, event.text)
            self.seen.setdefault(key, event)
        if len(self.seen) > self.max_events:
            newest = sorted(self.seen.items(), key=lambda kv: kv[1].time, reverse=True)[: self.max_events]
            self.seen = dict(newest)

    def add_rejections(self, manifest: Manifest, now: float) -> None:
        # Worded and cut (node.log_event keeps 300 characters) exactly as the leader logs it.
        events = [
            Event(
                manifest.closed_at,
                "reject",
                f"round {manifest.round}: payload from {short_id(r.peer_id)} rejected: {r.reason}"[:300],
            )
            for r in manifest.rejected
        ]
        self.add(manifest.leader, events, now)

    def to_json(self, names: dict[str, str]) -> list[dict]:
        ordered = sorted(self.seen.values(), key=lambda e: e.time, reverse=True)
        return [
            {
                "time": e.time,
                "kind": e.kind,
                "peer_id": e.peer_id,
                "short_id": short_id(e.peer_id),
                "name": names.get(e.peer_id, ""),
                "text": e.text,
            }
            for e in ordered
        ]


@dataclass
class PeerCounts:
    """Peers over time: a sample whenever the counts change, and at least every sample_every_s."""

    max_samples: int
    sample_every_s: float
    samples: deque = field(default_factory=deque)

    def record(self, now: float, live: int, stale: int) -> None:
        last = self.samples[-1] if self.samples else None
        if last is None or (last["live"], last["stale"]) != (live, stale) or now - last["time"] >= self.sample_every_s:
            self.samples.append({"time": now, "live": live, "stale": stale})
            while len(self.samples) > self.max_samples:
                self.samples.popleft()
