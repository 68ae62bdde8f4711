"""Content-addressed files between real nodes on 127.0.0.1: honest, corrupting, slow and lying holders."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from swarm.net.dht import DHTOptions
from swarm.net.files import PIECE_BYTES, FileFetchError, FileHolder, FileService, file_sha256, files_key
from swarm.node import SwarmNode
from swarm.run import RunConfig

LOCAL = ("/ip4/127.0.0.1/tcp/0",)


def _node(tmp_path: Path, name: str, initial: tuple[str, ...] = ()) -> SwarmNode:
    node = SwarmNode(
        identity_path=str(tmp_path / f"{name}.key"), dht_options=DHTOptions(initial_peers=initial, host_maddrs=LOCAL), name=name
    )
    node.start_dht()
    node.run = RunConfig(run_id="files-test")
    return node


class Hostile:
    """A holder that advertises a file and then misbehaves on every piece in the chosen way."""

    def __init__(self, node: SwarmNode, data: bytes):
        self.node, self.data, self.how, self.calls = node, data, "corrupt", 0
        node.server.register("file", self.provide)

    async def provide(self, request: dict) -> bytes | None:
        self.calls += 1
        piece = self.data[request["offset"] : request["offset"] + request["length"]]
        if self.how == "corrupt":
            return bytes([piece[0] ^ 1]) + piece[1:]
        if self.how == "short":
            return piece[:-1]
        if self.how == "breaks" or (self.how == "breaks once" and self.calls == 1):
            raise ConnectionResetError("stream reset")  # the server closes the stream without an answer
        if self.how == "slow":
            await asyncio.sleep(5)
            return piece
        if self.how == "breaks once":
            return piece
        return None  # "absent": advertised but not held

    async def advertise(self, sha256: str, size: int) -> None:
        holder = FileHolder(peer_id=self.node.peer_id, sha256=sha256, size=size, time=time.time() + 100)
        assert await self.node.dht.put(files_key(self.node.run.run_id, sha256), holder, 600)


def test_fetch_verifies_and_survives_hostile_holders(tmp_path):
    data = os.urandom(2 * PIECE_BYTES + 12345)  # three pieces, the last one short
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "shard.bin"
    src.write_bytes(data)
    honest = _node(tmp_path, "honest")
    nodes = [honest]
    try:
        bad = _node(tmp_path, "bad", tuple(honest.dht.visible_maddrs()))
        nodes.append(bad)
        client = _node(tmp_path, "client", tuple(honest.dht.visible_maddrs()))
        nodes.append(client)

        async def go() -> None:
            for node in nodes:
                await node.start_network()
            holder, fetcher = (
                honest.files,
                FileService(
                    dht=client.dht,
                    server=client.server,
                    run_id=lambda: client.run.run_id,
                    spawn=client.spawn,
                    piece_timeout_s=1.5,
                    holder_wait_s=2,
                ),
            )
            hostile = Hostile(bad, data)
            assert await holder.serve(src) == digest

            # Found through the DHT alone; verified; the fetcher serves it from then on.
            got = await fetcher.fetch(digest, tmp_path / "c" / "one", len(data))
            assert got.read_bytes() == data and fetcher.serves(digest)
            assert client.traffic.received >= len(data) and not (tmp_path / "c" / "one.part").exists()
            # Already there: no download.
            before = client.traffic.received
            await fetcher.fetch(digest, tmp_path / "c" / "one", len(data))
            assert client.traffic.received == before

            # A corrupting holder tried first: its file fails the hash, it is dropped, the honest one delivers.
            await hostile.advertise(digest, len(data))
            got = await fetcher.fetch(digest, tmp_path / "c" / "two", len(data), holders=[bad.peer_id])
            assert got.read_bytes() == data and hostile.calls == 3
            # A holder slower than the piece timeout is dropped; the next continues from the same offset.
            hostile.how, hostile.calls = "slow", 0
            start = time.monotonic()
            got = await fetcher.fetch(digest, tmp_path / "c" / "three", len(data), holders=[bad.peer_id])
            assert got.read_bytes() == data and 1 <= hostile.calls <= 3 and time.monotonic() - start < 15

            # Content only the hostile node claims: every way of failing ends in a clear error, no file.
            other = os.urandom(1000)
            other_digest = hashlib.sha256(other).hexdigest()
            hostile.data = other
            await hostile.advertise(other_digest, len(other))
            # A stream that breaks off once: the same holder gets one more turn and delivers.
            hostile.how, hostile.calls = "breaks once", 0
            got = await fetcher.fetch(other_digest, tmp_path / "c" / "again", len(other))
            assert got.read_bytes() == other and hostile.calls == 2
            checks = [("corrupt", "hashed to"), ("short", "999 bytes"), ("absent", "does not have it"), ("breaks", "broke off")]
            for how, words in checks:
                hostile.how = how
                with pytest.raises(FileFetchError, match=words):
                    await fetcher.fetch(other_digest, tmp_path / "c" / how, len(other))
                assert not (tmp_path / "c" / how).exists() and not (tmp_path / "c" / f"{how}.part").exists()
            with pytest.raises(FileFetchError, match="nobody advertised"):
                await fetcher.fetch("ab" * 32, tmp_path / "c" / "nothing", 10)
            for node in nodes:
                await node.stop(announce_leave=False)

        asyncio.run(go())
    finally:
        for node in nodes:
            if node._dht is not None and node._dht.dht.is_alive():
                node._dht.shutdown()


def test_serving_refuses_bad_requests_and_changed_files(tmp_path):
    registered: dict = {}
    service = FileService(
        dht=SimpleNamespace(peer_id="p"),  # type: ignore[arg-type]
        server=SimpleNamespace(register=lambda kind, fn: registered.__setitem__(kind, fn)),  # type: ignore[arg-type]
        run_id=lambda: "r",
        spawn=lambda coro: coro.close(),  # no re-advertising loop in this test
    )
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    digest = file_sha256(path)

    async def advertise(sha256: str) -> None:
        pass

    service._advertise = advertise  # type: ignore[method-assign]

    async def go() -> None:
        assert await service.serve(path) == digest
        provide = registered["file"]
        assert await provide({"kind": "file", "sha256": digest, "offset": 90, "length": 10}) == b"x" * 10
        for bad in [
            {"sha256": digest, "offset": 95, "length": 10},  # past the end
            {"sha256": digest, "offset": -1, "length": 10},
            {"sha256": digest, "offset": 0, "length": 0},
            {"sha256": digest, "offset": 0, "length": PIECE_BYTES + 1},
            {"sha256": digest, "offset": "0", "length": 10},
            {"sha256": "00" * 32, "offset": 0, "length": 10},  # not served
            {"sha256": [digest], "offset": 0, "length": 10},
            {},
        ]:
            assert await provide({"kind": "file", **bad}) is None, bad
        time.sleep(0.01)
        path.write_bytes(b"y" * 100)  # same size, new mtime: no longer the content it was served as
        assert await provide({"kind": "file", "sha256": digest, "offset": 0, "length": 10}) is None
        assert not service.serves(digest)

    asyncio.run(go())


def test_holder_record_and_digest_checks():
    with pytest.raises(ValueError):
        FileHolder(peer_id="p", sha256="AB" * 32, size=1, time=0.0)  # upper case is not the canonical name
    with pytest.raises(ValueError):
        FileHolder(peer_id="p", sha256="ab" * 32, size=-1, time=0.0)
