"""A stage's wait for a neighbour's message: it ends with the message, at its timeout, or as soon as
the round is given up (the peer's role changed: its group re-formed around a dead stage)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
import torch

from swarm.modes.pipeline.link import TAKEN, LinkError, StageLink
from swarm.modes.pipeline.wire import MessageId, encode


def link_between(prev: str, next_: str) -> StageLink:
    link = StageLink(p2p=None, loop=None)  # type: ignore[arg-type]  # receiving needs neither
    link.set_neighbours(prev, next_)
    return link


def test_a_wait_ends_as_soon_as_the_round_is_given_up():
    link, stop = link_between("prev", "next"), threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(LinkError, match="stopped"):
        link.receive(MessageId(4, 0, 0, "fwd"), timeout_s=60.0, stop=stop)
    assert time.monotonic() - started < 5.0  # not the 60 s timeout


def test_a_message_that_arrives_is_received_and_a_missing_one_times_out():
    link, stop = link_between("prev", "next"), threading.Event()
    msg_id = MessageId(4, 0, 0, "fwd")
    threading.Timer(0.2, lambda: link._accept("prev", encode(msg_id, torch.ones(1, 2, 3), "fp32", None))).start()
    assert link.receive(msg_id, timeout_s=30.0, stop=stop).id == msg_id
    with pytest.raises(LinkError, match="within 0s"):
        link.receive(MessageId(4, 0, 1, "fwd"), timeout_s=0.3, stop=stop)


def test_a_wait_for_an_answer_ends_when_the_message_it_answers_was_not_delivered():
    link = link_between("prev", "next")
    failed: concurrent.futures.Future[None] = concurrent.futures.Future()
    threading.Timer(0.3, lambda: failed.set_exception(LinkError("stage peer next unreachable"))).start()
    started = time.monotonic()
    with pytest.raises(LinkError, match="unreachable"):
        link.receive(MessageId(4, 0, 0, "bwd"), timeout_s=60.0, sends=[failed])
    assert time.monotonic() - started < 5.0


class JoiningNeighbour:
    """A p2p host whose neighbour is not listening for the first `unreachable` calls (it has just
    joined), then takes the message."""

    def __init__(self, unreachable: int) -> None:
        self.unreachable, self.calls, self.got = unreachable, 0, b""

    async def call_binary_stream_handler(self, peer: object, protocol: str) -> tuple:
        self.calls += 1
        if self.calls <= self.unreachable:
            raise ConnectionError("protocol not supported")
        reader = asyncio.StreamReader()
        reader.feed_data(bytes([TAKEN]))
        sink = self

        class Writer:
            def write(self, data: bytes) -> None:
                sink.got += data

            async def drain(self) -> None:
                pass

            def close(self) -> None:
                pass

        return None, reader, Writer()


def test_a_send_to_a_neighbour_that_is_not_listening_yet_is_tried_again_until_its_deadline():
    peer = "QmS254z1pJfRXUV3nHyu9MpwDKhUwbhd9wg6n7TEn94Dkc"
    joining = JoiningNeighbour(unreachable=2)
    link = StageLink(p2p=joining, loop=None)  # type: ignore[arg-type]
    asyncio.run(link._send(peer, b"activations", timeout_s=30.0))
    assert joining.calls == 3 and joining.got.endswith(b"activations") and link.traffic.sent[peer] == len(b"activations")
    gone = StageLink(p2p=JoiningNeighbour(unreachable=10**6), loop=None)  # type: ignore[arg-type]
    with pytest.raises(LinkError, match="unreachable"):
        asyncio.run(gone._send(peer, b"activations", timeout_s=1.0))
