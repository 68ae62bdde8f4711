"""Payload and state bytes over libp2p streams between two real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Coroutine
from typing import Any

import msgpack
import pytest

from swarm.net.dht import DHTOptions, SwarmDHT
from swarm.net.transfer import PROTOCOL, BlobCache, Traffic, TransferError, TransferServer, fetch, transfer_deadline_s
from swarm.node import RECORD_TYPES


def test_fetch_found_missing_oversized_and_unreachable(tmp_path):
    local = ("/ip4/127.0.0.1/tcp/0",)
    server_node = SwarmDHT.start(str(tmp_path / "s.key"), DHTOptions(host_maddrs=local), RECORD_TYPES)
    client_node = SwarmDHT.start(
        str(tmp_path / "c.key"), DHTOptions(initial_peers=tuple(server_node.visible_maddrs()), host_maddrs=local), RECORD_TYPES
    )
    blob = os.urandom(3_000_000)  # above hivemind's 2 MiB unary limit: must stream
    cache = BlobCache()
    cache.put("d1", blob)

    async def serve(request: dict) -> bytes | None:
        return cache.get(request["digest"])

    async def go():
        server_traffic, client_traffic = Traffic(), Traffic()
        server = TransferServer(await server_node.dht.replicate_p2p(), server_traffic)
        server.register("payload", serve)
        await server.start()
        p2p = await client_node.dht.replicate_p2p()
        got = await fetch(
            p2p, server_node.peer_id, {"kind": "payload", "digest": "d1"}, max_bytes=10**7, timeout_s=30, traffic=client_traffic
        )
        assert got == blob and client_traffic.received == len(blob) and server_traffic.sent == len(blob)
        assert await fetch(p2p, server_node.peer_id, {"kind": "payload", "digest": "nope"}, max_bytes=10**7, timeout_s=30) is None
        assert await fetch(p2p, server_node.peer_id, {"kind": "unknown"}, max_bytes=10**7, timeout_s=30) is None
        with pytest.raises(TransferError, match="limit"):
            await fetch(p2p, server_node.peer_id, {"kind": "payload", "digest": "d1"}, max_bytes=1000, timeout_s=30)
        with pytest.raises(TransferError):
            await fetch(p2p, client_node.peer_id[:-4] + "AAAA", {"kind": "payload"}, max_bytes=10, timeout_s=3)

    try:
        asyncio.run(go())
    finally:
        client_node.shutdown()
        server_node.shutdown()


def test_blob_cache_evicts_oldest():
    cache = BlobCache(max_bytes=2)
    for name in "abc":
        cache.put(name, name.encode())
    assert "a" not in cache and cache.get("c") == b"c" and cache.nbytes == 2


def test_a_body_has_a_deadline_that_grows_with_its_size_and_a_stall_limit(tmp_path):
    """A body slower than the fixed allowance but faster than the rate floor arrives; a donor that
    stops sending, or trickles below the floor, is cut off well before the body is in."""
    local = ("/ip4/127.0.0.1/tcp/0",)
    server_node = SwarmDHT.start(str(tmp_path / "s.key"), DHTOptions(host_maddrs=local), RECORD_TYPES)
    client_node = SwarmDHT.start(
        str(tmp_path / "c.key"), DHTOptions(initial_peers=tuple(server_node.visible_maddrs()), host_maddrs=local), RECORD_TYPES
    )
    blob = os.urandom(200_000)

    async def trickle(info, reader, writer):
        """Answers any request with `blob`, 10,000 bytes at a time, pausing as the request says."""
        try:
            request = msgpack.unpackb(await reader.readexactly(struct.unpack("!I", await reader.readexactly(4))[0]))
            writer.write(struct.pack("!BQ", 0, len(blob)))
            for offset in range(0, len(blob), 10_000):
                if offset >= request["stop_at"]:
                    await asyncio.sleep(60)
                writer.write(blob[offset : offset + 10_000])
                await writer.drain()
                await asyncio.sleep(request["pause"])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def go():
        server_p2p = await server_node.dht.replicate_p2p()
        await server_p2p.add_binary_stream_handler(PROTOCOL, trickle)
        p2p = await client_node.dht.replicate_p2p()
        peer = server_node.peer_id

        def get(
            pause: float, stop_at: int = 10**9, *, min_rate: float = 20_000, stall_s: float = 1.0
        ) -> Coroutine[Any, Any, bytes | None]:
            request = {"kind": "payload", "pause": pause, "stop_at": stop_at}
            return fetch(p2p, peer, request, max_bytes=10**6, timeout_s=0.5, min_rate=min_rate, stall_s=stall_s)

        # ~2 s at ~100 kB/s: four times the fixed allowance, within its size's deadline (0.5 + 10 s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await get(0.1) == blob
        assert loop.time() - started > 1.5
        # silent after 50 kB: cut off after the stall limit, not the whole deadline
        started = loop.time()
        with pytest.raises(TransferError, match="stalled at 50000 of 200000"):
            await get(0.0, stop_at=50_000, stall_s=1.0)
        assert loop.time() - started < 5
        # a byte every so often, never stalling, below the floor: cut off at 0.5 + 200,000 / 100,000 s
        started = loop.time()
        with pytest.raises(TransferError, match="slower than"):
            await get(0.6, min_rate=100_000)
        assert loop.time() - started < 4
        assert transfer_deadline_s(0.5, 200_000, min_rate=100_000) == 2.5

    try:
        asyncio.run(go())
    finally:
        client_node.shutdown()
        server_node.shutdown()
