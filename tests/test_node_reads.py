"""What a node reads from the DHT, and how often: a large swarm's heartbeats and record decoding."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgpack
import pytest

from swarm.net.dht import DHTOptions, Signed
from swarm.net.records import Heartbeat, Manifest, ManifestEntry
from swarm.net.schema import SchemaError, decode_record, encode_record, to_plain
from swarm.node import HEARTBEAT_READS_PER_S, HEARTBEATS_CACHED_FROM, SwarmNode, rss_bytes


def beat(pid: str) -> Heartbeat:
    return Heartbeat(pid, pid, "replica", "cpu", "training", 3, 0.0, None, 0, 0, "h", "0", 0.0)


def test_a_large_swarms_heartbeats_are_reread_at_most_a_thousand_a_second():
    node = SwarmNode(identity_path="", dht_options=DHTOptions(), name="n")
    node.run = SimpleNamespace(run_id="r")  # type: ignore[assignment]
    shown: list[Signed[Heartbeat]] = []
    reads: list[float] = []

    async def get_all(key: str, cls: type) -> list[Signed[Heartbeat]]:
        reads.append(asyncio.get_running_loop().time())
        return list(shown)

    node._dht = SimpleNamespace(get_all=get_all)  # type: ignore[assignment]

    async def twice(peers: int, apart_s: float) -> int:
        shown[:] = [Signed(f"p{i}", beat(f"p{i}"), 0.0) for i in range(peers)]
        reads.clear()
        node._heartbeats = (0.0, [])
        first = await node.heartbeats()
        first.clear()  # a caller's list is its own
        await asyncio.sleep(apart_s)
        assert len(await node.heartbeats()) == peers
        return len(reads)

    assert asyncio.run(twice(10, 0.0)) == 2  # a small swarm reads every time
    assert asyncio.run(twice(HEARTBEATS_CACHED_FROM, 0.0)) == 2
    many = 2 * HEARTBEATS_CACHED_FROM
    assert asyncio.run(twice(many, 0.0)) == 1  # a large one reuses what it read ...
    assert asyncio.run(twice(many, many / HEARTBEAT_READS_PER_S + 0.05)) == 2  # ... for R / 1,000 s
    # A forged heartbeat (its signer is not the peer it names) is dropped before it is kept.
    shown[:] = [Signed("p0", beat("p0"), 0.0), Signed("x", beat("p1"), 0.0)]
    node._heartbeats = (0.0, [])
    assert [b.signer for b in asyncio.run(node.heartbeats())] == ["p0"]


def test_resident_memory_is_read_and_kept_for_a_moment():
    assert rss_bytes() > 0 and rss_bytes() == rss_bytes()


def test_a_bad_record_names_the_field_and_index_it_is_off_at():
    entry = ManifestEntry("a" * 8, "d" * 64, 10, scales={"w": 0.5})
    good = Manifest(3, "l", "h", [entry], [], 0.0)
    assert decode_record(Manifest, encode_record(good)) == good

    def bad(change: dict) -> str:
        body = to_plain(good)
        body["entries"][0].update(change)
        with pytest.raises(SchemaError) as e:
            decode_record(Manifest, msgpack.packb({"v": 1, "body": body}, use_bin_type=True))
        return str(e.value)

    assert bad({"size": "10"}) == "Manifest.entries[0].size: expected an integer, got str"
    assert bad({"scales": {"w": "x"}}) == "Manifest.entries[0].scales['w']: expected a number, got str"
    assert bad({"scales": {b"w": 0.5}}) == "Manifest.entries[0].scales.key: expected str, got bytes"
    assert bad({"extra": 1}) == "Manifest.entries[0]: unknown keys ['extra']"
