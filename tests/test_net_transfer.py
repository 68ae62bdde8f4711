"""Payload and state bytes over libp2p streams between two real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os

import pytest

from swarm.net.dht import DHTOptions, SwarmDHT
from swarm.net.transfer import BlobCache, Traffic, TransferError, TransferServer, fetch
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
