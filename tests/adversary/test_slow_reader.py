"""A reader that asks a donor for state and then reads slowly (or not at all).

Before: the donor's limit on state readers covered only building an answer; the body was streamed
after it, so any number of slow streams could be open at once, each keeping a round's whole state
snapshot alive (one buffer, of which the answer was a view) until the rate floor cut it off: hours
for a large state. Now a kind registered with `streams` holds each answer's turn until its last
byte, one turn at a time per asking peer, and answers 'not found' once too many wait; a state answer
keeps only the tensors it sends (tests/test_state.py checks the pinning)."""

from __future__ import annotations

import asyncio
import os
import struct

import msgpack
from hivemind.p2p import PeerID

from swarm.net import transfer
from swarm.net.dht import DHTOptions, SwarmDHT
from swarm.net.transfer import PROTOCOL, Traffic, TransferServer, fetch
from swarm.node import RECORD_TYPES


def test_a_slow_reader_holds_one_turn_and_the_queue_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "MAX_WAITING", 1)
    local = ("/ip4/127.0.0.1/tcp/0",)
    donor = SwarmDHT.start(str(tmp_path / "d.key"), DHTOptions(host_maddrs=local), RECORD_TYPES)
    joined = DHTOptions(initial_peers=tuple(donor.visible_maddrs()), host_maddrs=local)
    slow = SwarmDHT.start(str(tmp_path / "s.key"), joined, RECORD_TYPES)
    honest = SwarmDHT.start(str(tmp_path / "h.key"), joined, RECORD_TYPES)
    state = os.urandom(4_000_000)  # far more than the stream's buffers hold: the donor must wait for the reader
    answered: list[str] = []

    async def provide(request: dict) -> list[memoryview]:
        answered.append(request["who"])
        return [memoryview(state)]

    async def go() -> None:
        server = TransferServer(await donor.dht.replicate_p2p(), Traffic())
        server.register("state", provide, streams=1)
        await server.start()
        slow_p2p, honest_p2p = await slow.dht.replicate_p2p(), await honest.dht.replicate_p2p()

        # The slow reader asks, reads the answer's first 64 KiB, and stops reading.
        _, reader, writer = await slow_p2p.call_binary_stream_handler(PeerID.from_base58(donor.peer_id), PROTOCOL)
        header = msgpack.packb({"kind": "state", "who": "slow"}, use_bin_type=True)
        writer.write(struct.pack("!I", len(header)) + header)
        await writer.drain()
        status, length = struct.unpack("!BQ", await reader.readexactly(9))
        assert (status, length) == (0, len(state))
        got = await reader.readexactly(65536)

        def ask(who: str) -> asyncio.Task:
            request = {"kind": "state", "who": who}
            return asyncio.create_task(fetch(honest_p2p, donor.peer_id, request, max_bytes=10**7, timeout_s=60))

        waiting = ask("honest")
        await asyncio.sleep(1.0)
        assert answered == ["slow"] and not waiting.done()  # the turn is the slow reader's until its last byte
        assert await asyncio.wait_for(ask("third"), timeout=30) is None  # the queue is full: 'not found' at once
        got += await reader.readexactly(length - len(got))  # the slow reader finishes: the next turn starts
        writer.close()
        assert got == state
        assert await asyncio.wait_for(waiting, timeout=60) == state
        assert answered == ["slow", "honest"]

    try:
        asyncio.run(go())
    finally:
        for node in (honest, slow, donor):
            node.shutdown()
