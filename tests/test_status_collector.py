"""StatusCollector over a fake DHT: backfill, incremental reads, expired rounds, liars, signatures."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import pytest
from hivemind.utils import get_dht_time

from swarm.net.dht import Signed
from swarm.net.records import (
    Event,
    EventLog,
    Heartbeat,
    Manifest,
    ManifestEntry,
    Submission,
    manifest_key,
    run_key,
    submit_key,
)
from swarm.run import RunConfig
from swarm.status import collector as collector_module
from swarm.status.collector import CollectorConfig, StatusCollector

T = TypeVar("T")

RUN = RunConfig(
    run_id="run-t",
    preset="nano",
    inner_steps=5,
    batch_size=4,
    seq_len=64,
    heartbeat_interval_s=1.0,
    heartbeat_ttl_s=4.0,
    coordinator="COORD",
)


class FakeDHT:
    def __init__(self) -> None:
        self.records: dict[str, list[Signed]] = {}
        self.gets = 0

    def put(self, key: str, signer: str, record: object, *, owner: str | None = None) -> None:
        """Store as `signer`; `owner` stands for the key in the subkey (the signer's own by default)."""
        marker = (owner or signer).encode()
        self.records.setdefault(key, []).append(Signed(signer, record, get_dht_time() + 60, marker))

    async def get_all(self, key: str, cls: type[T]) -> list[Signed[T]]:
        self.gets += 1
        return [s for s in self.records.get(key, []) if isinstance(s.record, cls)]


@pytest.fixture(autouse=True)
def fake_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake peers have names, not keys: a manifest's signature 'verifies' when the subkey's key is
    its signer's and the signer is its leader (real signatures: tests/test_round_evidence.py)."""

    def proof_ok(manifest: Manifest, owner: bytes, signer: str) -> bool:
        return owner == signer.encode() and manifest.leader == signer

    monkeypatch.setattr(collector_module, "proof_ok", proof_ok)


class FakeNode:
    ready = True

    def __init__(self) -> None:
        self.run, self.dht, self.peer_id = RUN, FakeDHT(), "OBSERVER"

    async def heartbeats(self) -> list[Signed[Heartbeat]]:
        return await self.dht.get_all(run_key(RUN.run_id, "heartbeat"), Heartbeat)


def beat(peer: str, rnd: int) -> Heartbeat:
    return Heartbeat(
        peer_id=peer,
        name=peer.lower(),
        role="replica",
        device="cpu",
        phase="training",
        round=rnd,
        tokens_per_s=1.0,
        loss=2.0,
        bytes_sent=0,
        bytes_received=0,
        param_hash="h",
        version="0.1.0",
        time=get_dht_time(),
        is_coordinator=peer == "COORD",
    )


def close_round(dht: FakeDHT, rnd: int, peers: tuple[str, ...] = ("A", "B")) -> None:
    entries = [ManifestEntry(p, f"d{p}{rnd}", 1000) for p in sorted(peers)]
    dht.put(manifest_key(RUN.run_id, rnd), "COORD", Manifest(rnd, "COORD", "h", entries, [], get_dht_time(), 3.0))
    for p in peers:
        dht.put(submit_key(RUN.run_id, rnd), p, Submission(p, rnd, f"d{p}{rnd}", 1000, "h", tokens=1280, loss=2.5))


def swarm_at(rnd: int, *, closed: range | None = None) -> FakeNode:
    node = FakeNode()
    for peer in ("COORD", "A", "B"):
        node.dht.put(run_key(RUN.run_id, "heartbeat"), peer, beat(peer, rnd))
    for r in closed if closed is not None else range(rnd):
        close_round(node.dht, r)
    return node


def poll(collector: StatusCollector, times: int = 1) -> None:
    async def go():
        for _ in range(times):
            await collector.poll_once()

    asyncio.run(go())


def test_backfill_then_summary_round_follows_the_last_manifest():
    node = swarm_at(12)
    collector = StatusCollector(node, CollectorConfig(backfill_rounds=5))
    poll(collector)
    snap = collector.snapshot()
    assert [r["round"] for r in snap["history"]["rounds"]] == list(range(7, 12))
    assert snap["summary"]["round"] == 12 and snap["summary"]["live_peers"] == 2
    assert snap["summary"]["total_tokens"] == 5 * 2 * 1280 and snap["summary"]["history_from_round"] == 7
    close_round(node.dht, 12)
    poll(collector)
    assert collector.snapshot()["summary"]["round"] == 13  # read the new manifest before heartbeats moved


def test_a_peer_claiming_a_huge_round_costs_bounded_reads_and_changes_nothing():
    node = swarm_at(6)
    node.dht.put(run_key(RUN.run_id, "heartbeat"), "LIAR", beat("LIAR", 10**9))
    collector = StatusCollector(node, CollectorConfig(backfill_rounds=200))
    poll(collector, times=3)
    assert node.dht.gets < 3 * 20
    assert [r["round"] for r in collector.snapshot()["history"]["rounds"]] == list(range(6))
    assert collector.snapshot()["summary"]["round"] == 6


def test_an_expired_round_is_skipped_after_a_few_polls():
    node = swarm_at(6, closed=range(0, 6))
    node.dht.records.pop(manifest_key(RUN.run_id, 2))
    collector = StatusCollector(node)
    poll(collector, times=4)
    assert [r["round"] for r in collector.snapshot()["history"]["rounds"]] == [0, 1, 3, 4, 5]
    assert collector._next_round == 6  # not stuck on round 2


def test_records_signed_by_someone_else_are_ignored():
    node = swarm_at(1)
    node.dht.put(run_key(RUN.run_id, "events"), "A", EventLog("A", [Event(get_dht_time(), "join", "a joined")]))
    node.dht.put(run_key(RUN.run_id, "events"), "MALLORY", EventLog("B", [Event(get_dht_time(), "leave", "forged")]))
    forged = Manifest(1, "COORD", "h", [], [], get_dht_time())  # names the coordinator, signed by another
    node.dht.put(manifest_key(RUN.run_id, 1), "MALLORY", forged)
    collector = StatusCollector(node)
    poll(collector)
    texts = [e["text"] for e in collector.snapshot()["events"]]
    assert texts == ["a joined"]
    assert [r["round"] for r in collector.snapshot()["history"]["rounds"]] == [0]


def test_a_manifest_whose_signature_does_not_verify_is_not_shown():
    node = swarm_at(1)
    unsigned = Manifest(1, "COORD", "h", [], [], get_dht_time())
    node.dht.put(manifest_key(RUN.run_id, 1), "COORD", unsigned, owner="SOMEONE-ELSES-KEY")
    collector = StatusCollector(node)
    poll(collector)
    assert [r["round"] for r in collector.snapshot()["history"]["rounds"]] == [0]
