"""The simulated network: links drawn from a profile, blob transfers that take time, a DHT whose
records arrive late and expire, message loss and partitions.

Links. Each node gets an uplink, a downlink (bit/s) and a one-way latency drawn from its profile.
A transfer of n bytes from a to b starts once a's uplink and b's downlink are free (each a FIFO),
latency after it was asked for, and takes 8n / min(up_a, down_b). The sender's uplink is held for
all of it: a sender serving many fetchers serves them one after the other. The receiver's downlink
is held for its share, 8n / down_b, so slow senders reach a fast downlink side by side, each
starting that share after the one before, up to the downlink's rate, as TCP runs them. (Until
issue 20's last stop the downlink was held for the whole transfer too, so 1,000 senders on 10-100
Mbit/s uplinks reached a coordinator's 500 Mbit/s downlink one at a time; with equal rates both
ways, as on the testbed profiles, nothing changes.) Each link's total time and bytes are right,
not how one flow's rate varies. Many flows into one downlink lose goodput: a profile's `fan_in` c makes a
transfer booked behind j others into the same downlink, not yet done, take 1 + c·j times as long
(measured on the testbed: k TCP senders of 210 KB each into one 2 Mbit/s receiver finish 1.16,
1.25, 1.46 and 1.51 × the ideal k·n/rate for k = 2, 4, 7, 8, while k receivers from one sender
finish within 1.07 × of it: c = 0.13; at 20 Mbit/s, 1.15 × at k = 8: c = 0.02; docs/performance.md).

Records. A `put` is visible to everyone after a delay (the writer's latency plus a draw of the
profile's `dht_delay_s`), to every node that is not partitioned from the writer, until it expires.
Each writer holds one slot per key (as the DHT's owner subkeys do); a newer write replaces the older
one once it is visible (until then readers see the older one).
A lost message (probability `loss`) is a put that reaches nobody or a fetch that fails.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from swarm.codec import matches_digest
from swarm.sim.clock import VirtualLoop

if TYPE_CHECKING:
    from swarm.net.records import Manifest
    from swarm.round.payloads import PayloadStore
    from swarm.state import GlobalState

PROFILES_DIR = Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class Profile:
    """Where links' figures are drawn from: each a [low, high] range, drawn log-uniformly."""

    name: str
    uplink_mbps: tuple[float, float]
    downlink_mbps: tuple[float, float]
    rtt_ms: tuple[float, float]
    dht_delay_s: tuple[float, float] = (0.05, 0.5)  # extra time before a record is visible to readers
    loss: float = 0.0  # probability that one message (a put, one fetch attempt) is lost
    # Many senders into one shaped downlink lose goodput (drops at the shaper, retransmissions): a
    # transfer booked behind j others not yet done takes 1 + fan_in·j times as long (0: ideal).
    fan_in: float = 0.0

    def __post_init__(self) -> None:
        for field_name in ("uplink_mbps", "downlink_mbps", "rtt_ms", "dht_delay_s"):
            low, high = getattr(self, field_name)
            if not 0 < low <= high:
                raise ValueError(f"profile {self.name!r}: {field_name} must be 0 < low <= high, got {low}, {high}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"profile {self.name!r}: loss must be in [0, 1), got {self.loss}")
        if not 0 <= self.fan_in <= 1:
            raise ValueError(f"profile {self.name!r}: fan_in must be in [0, 1], got {self.fan_in}")

    @classmethod
    def load(cls, name_or_path: str) -> Profile:
        """A shipped profile by name (`lan`, `datacenter`, `volunteers`) or a JSON file of one."""
        path = Path(name_or_path)
        if not path.suffix:
            path = PROFILES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
            raise ValueError(f"no network profile {name_or_path!r} (shipped: {shipped}; or a path to a .json file)")
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a profile is a JSON object")
        known = {"name", "uplink_mbps", "downlink_mbps", "rtt_ms", "dht_delay_s", "loss", "fan_in"}
        if unknown := set(raw) - known:
            raise ValueError(f"{path}: unknown profile field(s) {', '.join(sorted(unknown))}")
        ranges = {k: tuple(float(x) for x in v) for k, v in raw.items() if k not in ("name", "loss", "fan_in")}
        scalars = {"loss": float(raw.get("loss", 0.0)), "fan_in": float(raw.get("fan_in", 0.0))}
        return cls(name=str(raw.get("name", path.stem)), **scalars, **ranges)  # type: ignore[arg-type]

    def draw_link(self, rng: random.Random) -> Link:
        def draw(low: float, high: float) -> float:
            return math.exp(rng.uniform(math.log(low), math.log(high)))

        return Link(
            up_bps=draw(*self.uplink_mbps) * 1e6,
            down_bps=draw(*self.downlink_mbps) * 1e6,
            latency_s=draw(*self.rtt_ms) / 2000.0,
        )


@dataclass
class Link:
    """One node's access link."""

    up_bps: float
    down_bps: float
    latency_s: float  # one way
    up_free_at: float = 0.0
    down_free_at: float = 0.0
    sent: int = 0
    received: int = 0
    inbound: list[float] = field(default_factory=list)  # when the transfers booked into the downlink end (a heap)


@dataclass
class _Stored:
    record: object
    visible_at: float
    expires_at: float


def _per_round(key: str) -> bool:
    return "/round/" in key


@dataclass
class SimNetwork:
    """Links, records and partitions of one simulated swarm, on one virtual loop."""

    loop: VirtualLoop
    profile: Profile
    rng: random.Random
    links: dict[str, Link] = field(default_factory=dict)
    records: dict[str, dict[str, list[_Stored]]] = field(default_factory=dict)  # key -> writer -> versions, oldest first
    groups: dict[str, int] = field(default_factory=dict)  # partition group of each node (0: everyone together)
    down: set[str] = field(default_factory=set)  # crashed nodes: they neither serve nor answer
    markers: dict[str, bytes] = field(default_factory=dict)  # peer id -> its owner marker (public key)
    stores: dict[str, PayloadStore] = field(default_factory=dict)  # peer id -> the payloads it serves
    states: dict[str, Callable[[], GlobalState]] = field(default_factory=dict)  # peer id -> its state now (donors)
    sized: dict[str, int] = field(default_factory=dict)  # digest -> declared size (`sized` payloads)
    _shares: dict[tuple[int, tuple[str, ...]], float] = field(default_factory=dict, repr=False)
    hanging: set[str] = field(default_factory=set)  # nodes that accept fetches and never answer them
    cpu_s: tuple[float, float] = (0.0, 0.0)  # per payload: a leader's checks, a node's apply (SimConfig.cpu_s)
    _decoded: dict[tuple[object, ...], dict[str, torch.Tensor]] = field(default_factory=dict)
    _matched: dict[tuple[bytes, str, tuple[str, ...] | None], bool] = field(default_factory=dict)
    signed_views: dict[tuple[str, str], tuple[dict[str, object], list]] = field(default_factory=dict)  # SimRecords.get_all's
    _means: dict[tuple[int, tuple[bytes, ...]], tuple[Manifest, dict[str, torch.Tensor], dict[str, int]]] = field(
        default_factory=dict
    )
    _views: dict[str, tuple[float, dict[str, object]]] = field(default_factory=dict)  # key -> (valid until, writer -> record)
    payload_bytes: int = 0  # declared size of every payload (`sized` runs; 0: the real bytes)
    state_bytes: int = 0  # declared size of a state download (0: the real state's fp32 bytes)

    def add_node(self, peer_id: str, link: Link | None = None) -> Link:
        self.links[peer_id] = link or self.profile.draw_link(self.rng)
        return self.links[peer_id]

    def now(self) -> float:
        return self.loop.time()

    def reachable(self, a: str, b: str) -> bool:
        return b not in self.down and a not in self.down and self.groups.get(a, 0) == self.groups.get(b, 0)

    def lost(self) -> bool:
        return self.profile.loss > 0 and self.rng.random() < self.profile.loss

    # ----- records -----------------------------------------------------------------------------

    def put(self, writer: str, key: str, record: object, ttl_s: float) -> bool:
        if writer in self.down or self.lost():
            return False
        now = self.now()
        delay = self.links[writer].latency_s + self.rng.uniform(*self.profile.dht_delay_s)
        versions = self.records.setdefault(key, {}).setdefault(writer, [])
        versions.append(_Stored(record, now + delay, now + ttl_s))  # the old one stays visible until this one is
        self._views.pop(key, None)
        return True

    def get(self, reader: str, key: str) -> dict[str, object]:
        """writer -> record of what `reader` can see under `key` now."""
        latest = self.latest(key)
        if not self.groups:
            return dict(latest)
        group = self.groups.get(reader, 0)
        return {w: r for w, r in latest.items() if w == reader or self.groups.get(w, 0) == group}

    def latest(self, key: str) -> dict[str, object]:
        """writer -> latest visible record under `key` now, for every reader while the network is
        whole (no partition): the same object until a record under `key` changes (do not modify)."""
        now = self.now()
        view = self._views.get(key)
        if view is None or now >= view[0]:
            view = self._views[key] = self._view(key, now)
        return view[1]

    def _view(self, key: str, now: float) -> tuple[float, dict[str, object]]:
        """Every writer's latest visible record under `key`, and until when that stays so (the next
        version to become visible or expire): reads in between, the most of them, reuse it."""
        slots = self.records.get(key, {})
        latest: dict[str, object] = {}
        changes = math.inf
        for writer, versions in list(slots.items()):
            visible = [v for v in versions if v.visible_at <= now]
            if visible:  # a newer version replaces the older ones once readers can see it
                del versions[: versions.index(visible[-1])]
            versions[:] = [v for v in versions if v.expires_at > now]  # expired: gone for everyone (memory stays bounded)
            if not versions:
                del slots[writer]
                continue
            if visible and visible[-1].expires_at > now:
                latest[writer] = visible[-1].record
            for v in versions:
                changes = min(changes, v.expires_at, v.visible_at if v.visible_at > now else math.inf)
        return changes, latest

    def record_count(self, *, per_round: bool = False) -> int:
        """Versions of records held now: of one round's records (submissions, manifests), or of
        everything else."""
        return sum(len(v) for key, slots in self.records.items() if _per_round(key) == per_round for v in slots.values())

    def round_keys(self) -> int:
        """Keys of per-round records held now (kept for a while after their round, for replays)."""
        return sum(1 for key in self.records if _per_round(key))

    # ----- the simulator's own shortcuts --------------------------------------------------------------

    def decode(
        self, decode: Callable[..., dict[str, torch.Tensor]], data: bytes, *, sender: str, round_no: int
    ) -> dict[str, torch.Tensor]:
        """A store's `decode`, done once per payload for the whole swarm: every node decodes the same
        bytes to the same tensors (nobody modifies them), so the simulator keeps the first result. This
        saves the simulator's time, not the swarm's; a failure is not kept (it raises again)."""
        return self._once(
            (hashlib.sha256(data).digest(), sender, round_no), lambda: decode(data, sender=sender, round_no=round_no)
        )

    def decode_aggregate(
        self, decode: Callable[..., dict[str, torch.Tensor]], data: bytes, digest: str, *, leader: str, round_no: int
    ) -> dict[str, torch.Tensor]:
        """A store's `decode_aggregate`, once per aggregate (or part) for the whole swarm, as `decode`."""
        key = (hashlib.sha256(data).digest(), digest, leader, round_no)
        return self._once(key, lambda: decode(data, digest, leader=leader, round_no=round_no))

    def _once(self, key: tuple[object, ...], decode: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """What `decode` gives for these bytes, kept for the swarm (the last 4,096 results at most)."""
        if key not in self._decoded:
            if len(self._decoded) > 4096:
                self._decoded.clear()
            self._decoded[key] = decode()
        return self._decoded[key]

    def matches(self, data: bytes | bytearray | memoryview, digest: str, names: Collection[str] | None = None) -> bool:
        """`matches_digest`, answered once per (bytes, digest, names) for the whole swarm: every node
        that fetches a payload checks the same bytes against the same digest (R nodes parsing R
        payloads' headers a round is the simulator's cost, not the protocol's). The key is the bytes'
        own sha256, so bytes that differ (a hostile holder's) are checked on their own."""
        key = (hashlib.sha256(data).digest(), digest, tuple(sorted(names)) if names is not None else None)
        known = self._matched.get(key)
        if known is None:
            if len(self._matched) > 65536:
                self._matched.clear()
            known = self._matched[key] = matches_digest(data, digest, names)
        return known

    def mean_of(
        self,
        mean_of: Callable[[Manifest, list[bytes]], tuple[dict[str, torch.Tensor], dict[str, int]]],
        manifest: Manifest,
        blobs: list[bytes],
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """`RoundAgreement._mean_of`, done once per manifest and base state for the whole swarm (every
        node that applies it sums the same bytes in the same order to the same mean, so R nodes
        summing R payloads each, O(R²) a round, is the simulator's cost, not the protocol's). Each
        caller gets its own copy; a refusal is not kept (it raises again)."""
        key = (id(manifest), tuple(hashlib.sha256(b).digest() for b in blobs))  # readers share one decoded record
        cached = self._means.get(key)
        if cached is None or cached[0] is not manifest:
            if len(self._means) > 64:
                self._means.clear()
            cached = self._means[key] = (manifest, *mean_of(manifest, blobs))  # holds it: the id stays its
        _, mean, coverage = cached
        return {n: t.clone() for n, t in mean.items()}, dict(coverage)

    # ----- transfers ---------------------------------------------------------------------------

    def share(self, names: Collection[str], shapes: dict[str, tuple[int, ...]]) -> float:
        """The named tensors' share of a model's parameters: the part of a `sized` blob a fetch of
        those tensors moves (a part's own hashes and header, a few hundred bytes, left out)."""
        key = (id(shapes), tuple(sorted(names)))
        if (known := self._shares.get(key)) is None:
            numel = {n: math.prod(s) for n, s in shapes.items()}
            known = self._shares[key] = sum(numel.get(n, 0) for n in names) / max(1, sum(numel.values()))
        return known

    def transfer_time(self, src: str, dst: str, nbytes: int, *, within_s: float = math.inf) -> float | None:
        """Book a transfer of nbytes from src to dst; returns when it completes (virtual time), or None
        without booking anything if it would not complete within `within_s` (the fetcher gives up)."""
        a, b = self.links[src], self.links[dst]
        now = self.now()
        asked = now + a.latency_s + b.latency_s  # the request is there, the data starts
        while b.inbound and b.inbound[0] <= now:
            heapq.heappop(b.inbound)
        waiting = len(b.inbound)  # flows into b's downlink at once, in reality
        slowed = 1 + self.profile.fan_in * waiting
        start = max(asked, a.up_free_at, b.down_free_at)
        done = start + 8 * nbytes / min(a.up_bps, b.down_bps) * slowed
        if done - now > within_s:
            return None
        a.up_free_at = done  # the sender's uplink carries this flow alone
        b.down_free_at = start + 8 * nbytes / b.down_bps * slowed  # the receiver's downlink: its share of the flow
        heapq.heappush(b.inbound, done)
        a.sent += nbytes
        b.received += nbytes
        return done
