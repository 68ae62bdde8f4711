"""What every swarm process runs: a DHT node, the transfer server, heartbeats and an event log.

The coordinator, each volunteer peer and a standalone status server all build on SwarmNode. Its
loops run on the asyncio event loop; anything heavy (training, decoding) runs elsewhere, so
heartbeats and transfers are served on time while a peer computes.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import get_dht_time

from swarm import __version__
from swarm.log import get_logger
from swarm.net import reachability
from swarm.net.dht import DHTOptions, Signed, SwarmDHT
from swarm.net.files import FileService
from swarm.net.records import RECORD_TYPES as NET_RECORDS
from swarm.net.records import RUNS_KEY, Event, EventLog, Heartbeat, Phase, Roster, run_key
from swarm.net.transfer import Traffic, TransferServer, fetch
from swarm.net.validator import RecordTypes
from swarm.run import RunConfig

logger = get_logger(__name__)
# What a swarm node stores and accepts in the DHT: the net layer's records and the run description.
RECORD_TYPES = RecordTypes(NET_RECORDS, runs_type=RunConfig)
MAX_EVENTS = 50
MEMBERS_REFRESH_S = 2.0
HEARTBEATS_CACHED_FROM = 250  # peers in view beyond which a node re-reads the heartbeats less often
HEARTBEAT_READS_PER_S = 1000.0  # heartbeats a node re-reads a second, at most, beyond that
MAX_DIRECT_PEERS = 16  # behind NAT: reachable members we keep a connection open to


@dataclass
class NodeStatus:
    """The mutable fields a node reports in its heartbeat."""

    name: str
    role: str = "none"
    device: str = "cpu"
    phase: Phase = "joining"
    round: int = -1
    tokens_per_s: float = 0.0
    loss: float | None = None
    param_hash: str = ""
    steps: int = 0
    is_coordinator: bool = False
    links: dict[str, float] = field(default_factory=dict)  # peer id -> activation bytes/s (pipeline stages)
    device_bytes: int = 0  # accelerator memory at its peak in the last round
    round_bytes_in: int = 0  # transfer bytes of the last round
    round_bytes_out: int = 0
    partial: bool = False  # holds part of the agreed state only


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read), read at most
    every RSS_FRESH_S (a process of the simulator holds 1,000 nodes, each heartbeat asking)."""
    at, value = _rss
    if time.monotonic() - at < RSS_FRESH_S:
        return value
    try:
        with open("/proc/self/statm") as f:
            value = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        value = 0
    _rss[:] = [time.monotonic(), value]
    return value


RSS_FRESH_S = 0.5
_rss: list = [-RSS_FRESH_S, 0]  # when it was read (time.monotonic), and what it read


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SwarmNode:
    """A DHT identity with transfer serving, heartbeats and events; subclasses add behaviour."""

    def __init__(self, *, identity_path: str, dht_options: DHTOptions, name: str):
        self.dht_options = dht_options
        self.identity_path = identity_path
        self.status = NodeStatus(name=name)
        self.traffic = Traffic()
        self.events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._run: RunConfig | None = None
        self._dht: SwarmDHT | None = None
        self._server: TransferServer | None = None
        self._files: FileService | None = None
        self._members: set[str] | None = None
        self._members_at = 0.0
        self._heartbeats: tuple[float, list[Signed[Heartbeat]]] = (0.0, [])  # when read, and what
        self._tasks: list[asyncio.Task] = []
        self._events_dirty = asyncio.Event()

    # run, dht and server exist once the node has started (and, for run, joined); using one
    # earlier is a programming error, reported as such rather than as an AttributeError on None.
    @property
    def run(self) -> RunConfig:
        if self._run is None:
            raise RuntimeError("the node has no run description yet")
        return self._run

    @run.setter
    def run(self, run: RunConfig) -> None:
        self._run = run

    @property
    def dht(self) -> SwarmDHT:
        if self._dht is None:
            raise RuntimeError("the node's DHT is not started")
        return self._dht

    @property
    def server(self) -> TransferServer:
        if self._server is None:
            raise RuntimeError("the node's transfer server is not started")
        return self._server

    @property
    def files(self) -> FileService:
        """Serves and fetches files by sha256 (swarm/net/files.py)."""
        if self._files is None:
            raise RuntimeError("the node's file service is not started")
        return self._files

    @property
    def ready(self) -> bool:
        """Started and knows its run."""
        return self._run is not None and self._dht is not None

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id

    def start_dht(self) -> None:
        """Start the DHT process; from the main thread, before the event loop (see SwarmDHT.start)."""
        self._dht = SwarmDHT.start(self.identity_path, self.dht_options, RECORD_TYPES)

    async def start_network(self) -> None:
        if self._dht is None:  # not started beforehand: keep the loop free while p2pd starts
            self._dht = await asyncio.to_thread(SwarmDHT.start, self.identity_path, self.dht_options, RECORD_TYPES)
        p2p = await self.dht.dht.replicate_p2p()
        self._server = TransferServer(p2p, self.traffic)
        self._files = FileService(dht=self.dht, server=self._server, run_id=lambda: self.run.run_id, spawn=self.spawn)
        # ^ content-addressed files by sha256 (corpus shards, tokenizer)
        await self._server.start()
        await reachability.serve(p2p)  # answer joiners asking whether they can be dialled

    def wall_time(self) -> float:
        """The clock records are stamped with (the DHT's)."""
        return get_dht_time()

    async def fetch_blob(self, peer: str, request: dict, max_bytes: int, timeout_s: float) -> bytes | None:
        """One blob from one peer over /swarm/transfer/1 (None: it does not have it)."""
        return await fetch(self.server.p2p, peer, request, max_bytes=max_bytes, timeout_s=timeout_s, traffic=self.traffic)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    def start_heartbeats(self) -> None:
        self.spawn(self._heartbeat_loop())
        self.spawn(self._event_loop())
        if not self.dht.reachable:
            self.spawn(self._stay_connected_loop())

    async def publish_heartbeat(self) -> None:
        s = self.status
        beat = Heartbeat(
            peer_id=self.peer_id,
            name=s.name,
            role=s.role,
            device=s.device,
            phase=s.phase,
            round=s.round,
            tokens_per_s=float(s.tokens_per_s),
            loss=s.loss,
            bytes_sent=self.traffic.sent,
            bytes_received=self.traffic.received,
            param_hash=s.param_hash,
            version=__version__,
            time=self.wall_time(),
            is_coordinator=s.is_coordinator,
            steps=s.steps,
            addrs=self.dht.visible_maddrs()[:4],
            reachable=self.dht.reachable,
            links=dict(s.links),
            ram_bytes=rss_bytes(),
            device_bytes=s.device_bytes,
            round_bytes_in=s.round_bytes_in,
            round_bytes_out=s.round_bytes_out,
            partial=s.partial,
        )
        await self.dht.put(run_key(self.run.run_id, "heartbeat"), beat, self.run.heartbeat_ttl_s)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.publish_heartbeat()
            await asyncio.sleep(self.run.heartbeat_interval_s)

    async def _stay_connected_loop(self) -> None:
        """Behind NAT: hold a connection to every reachable member (the coordinator first), so that
        whoever leads a round can open a stream to us over it (swarm/net/reachability.py)."""
        while True:
            beats = [b for b in await self.member_peers() if b.reachable and b.addrs and b.peer_id != self.peer_id]
            beats.sort(key=lambda b: b.peer_id != self.run.coordinator)
            peers = {b.peer_id: b.addrs for b in beats[:MAX_DIRECT_PEERS]}
            connected = await reachability.keep_connected(self.server.p2p, peers)
            logger.debug("behind NAT: connected to %d of %d reachable members", connected, len(peers))
            await asyncio.sleep(max(2.0, self.run.heartbeat_interval_s))

    def log_event(self, kind: str, text: str) -> None:
        """Record an event for the status page (and the log)."""
        logger.info("[%s] %s", kind, text)
        self.events.append(Event(time=self.wall_time(), kind=kind, text=text[:300]))
        self._events_dirty.set()

    async def _event_loop(self) -> None:
        while True:
            await self._events_dirty.wait()
            self._events_dirty.clear()
            log = EventLog(peer_id=self.peer_id, events=list(self.events))
            await self.dht.put(run_key(self.run.run_id, "events"), log, ttl_s=3600)
            await asyncio.sleep(1.0)  # batch bursts of events into one store

    async def heartbeats(self) -> list[Signed[Heartbeat]]:
        """Every peer's latest heartbeat whose signer matches the peer id it claims. Beyond
        HEARTBEATS_CACHED_FROM peers, what a read found serves for len / HEARTBEAT_READS_PER_S
        seconds (at 1,000 peers, one: a leader that looks four times a second would otherwise read
        4,000 records a second; each heartbeat changes every few seconds anyway)."""
        now = asyncio.get_running_loop().time()
        at, found = self._heartbeats
        if len(found) <= HEARTBEATS_CACHED_FROM or now - at >= len(found) / HEARTBEAT_READS_PER_S:
            beats = await self.dht.get_all(run_key(self.run.run_id, "heartbeat"), Heartbeat)
            found = [b for b in beats if b.record.peer_id == b.signer]
            self._heartbeats = (now, found)
        return list(found)

    async def live_peers(self) -> list[Heartbeat]:
        """Heartbeats fresher than the run's TTL from peers that are not leaving."""
        now, ttl = self.wall_time(), self.run.heartbeat_ttl_s
        records = [b.record for b in await self.heartbeats()]
        return [r for r in records if now - r.time < ttl and r.phase != "leaving"]

    async def members(self) -> set[str]:
        """The coordinator and the peers it admitted (its signed roster); re-read every few seconds.

        Only members count in votes, in the set a round waits for, as leaders and as state donors.
        """
        now = asyncio.get_running_loop().time()
        if self._members is None or now - self._members_at > MEMBERS_REFRESH_S:
            item = await self.dht.get_from(run_key(self.run.run_id, "roster"), Roster, self.run.coordinator)
            admitted = {r.peer_id for r in item.record.roles} if item is not None else set()
            self._members, self._members_at = admitted | {self.run.coordinator}, now
        return self._members

    async def member_peers(self) -> list[Heartbeat]:
        """Live heartbeats of members only."""
        members = await self.members()
        return [b for b in await self.live_peers() if b.peer_id in members]

    async def stop(self, *, announce_leave: bool = True) -> None:
        if announce_leave and self._run is not None and self._dht is not None:
            self.status.phase = "leaving"
            self.log_event("leave", f"{self.status.name} is leaving")
            try:
                await asyncio.wait_for(self.publish_heartbeat(), timeout=5)
                log = EventLog(peer_id=self.peer_id, events=list(self.events))
                await asyncio.wait_for(self.dht.put(run_key(self.run.run_id, "events"), log, 3600), timeout=5)
            except (asyncio.TimeoutError, Exception) as e:
                logger.debug("could not announce leaving: %s", e)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._dht is not None:
            await asyncio.to_thread(self._dht.shutdown)


async def fetch_run_description(dht: SwarmDHT, coordinator: str, timeout_s: float) -> RunConfig:
    """Wait for the run description signed by the coordinator's peer id; others are rejected."""
    deadline = time.monotonic() + timeout_s
    while True:
        for item in await dht.get_all(RUNS_KEY, RunConfig):
            if item.signer != coordinator:
                logger.warning("ignoring a run description signed by %s, not the coordinator", item.signer[-8:])
            elif item.record.coordinator != coordinator:
                logger.warning("ignoring a run description whose coordinator field does not match its signer")
            else:
                return item.record
        if time.monotonic() > deadline:
            raise TimeoutError(f"no run description signed by coordinator {coordinator} after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)
