"""The stage link: activation messages between the stages of a pipeline group, over libp2p streams.

Each message is one stream on ``/swarm/stage/1``: the sender writes a u32 length and the message
(wire.py), the receiver answers one status byte (0 taken, 1 refused). Received messages wait in a
bounded mailbox keyed by their id until the stage's schedule asks for them, each ask with a
deadline, so a dead neighbour costs one deadline and never a hang. Only the current neighbours may
send, the previous stage forward messages and the next stage backward ones; anything else, or a
frame that does not parse, is refused and logged. The worker thread calls ``send`` and ``receive``;
the streams live on the node's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from swarm.log import get_logger
from swarm.modes.pipeline.wire import MAX_MESSAGE_BYTES, ActivationError, Message, MessageId, parse

logger = get_logger(__name__)

PROTOCOL = "/swarm/stage/1"
TAKEN, REFUSED = 0, 1
MAX_PENDING = 256  # messages held for the schedule; beyond that the oldest are dropped
REFUSED_RETRY_S = 0.5
_LEN = struct.Struct("!I")


class LinkError(RuntimeError):
    """A message that could not be delivered or did not arrive in time: the group's round is lost."""


STOP_POLL_S = 0.25  # how often a wait for a neighbour's message looks at its stop event


@dataclass
class LinkTraffic:
    """Activation bytes moved to and from each neighbour since the link started."""

    sent: dict[str, int]
    received: dict[str, int]


class StageLink:
    def __init__(self, p2p: P2P, loop: asyncio.AbstractEventLoop) -> None:
        self.p2p, self.loop = p2p, loop
        self.prev: str | None = None  # may send us forward messages
        self.next: str | None = None  # may send us backward messages
        self.traffic = LinkTraffic(defaultdict(int), defaultdict(int))
        self._mail: dict[MessageId, Message] = {}
        self._cond = threading.Condition()
        self._min_round = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._handle)

    def set_neighbours(self, prev: str | None, next_: str | None) -> None:
        with self._cond:
            self.prev, self.next = prev, next_

    def begin_round(self, round_no: int) -> None:
        """Forget messages of earlier rounds (a broken round's leftovers)."""
        with self._cond:
            self._min_round = round_no
            for key in [k for k in self._mail if k.round < round_no]:
                del self._mail[key]

    # ----- receiving (event loop, then worker thread) ------------------------------------------

    async def _handle(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = info.peer_id.to_base58()
        try:
            (length,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), timeout=30))
            if length > MAX_MESSAGE_BYTES:
                raise ActivationError(f"message of {length} bytes exceeds {MAX_MESSAGE_BYTES}")
            data = await asyncio.wait_for(reader.readexactly(length), timeout=120)
            status = TAKEN if self._accept(sender, data) else REFUSED
            writer.write(bytes([status]))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except ActivationError as e:
            logger.warning("stage link: refused a message from %s: %s", sender[-8:], e)
        finally:
            writer.close()

    def _accept(self, sender: str, data: bytes) -> bool:
        msg = parse(data)
        with self._cond:
            allowed = self.prev if msg.id.direction == "fwd" else self.next
            if sender != allowed:
                logger.warning("stage link: %s from %s, who is not our neighbour that way", msg.id.direction, sender[-8:])
                return False
            self.traffic.received[sender] += len(data)
            if msg.id.round < self._min_round:
                return True  # late for a round we gave up on: taken and dropped
            self._mail[msg.id] = msg
            while len(self._mail) > MAX_PENDING:
                del self._mail[min(self._mail, key=lambda k: (k.round, k.step, k.micro))]
            self._cond.notify_all()
        return True

    def receive(
        self,
        msg_id: MessageId,
        timeout_s: float,
        stop: threading.Event | None = None,
        sends: Sequence[concurrent.futures.Future[None]] = (),
    ) -> Message:
        """The message with this id, waiting at most ``timeout_s``; LinkError when it does not come,
        as soon as `stop` is set, or as soon as one of our `sends` failed (no answer can come to a
        message that never arrived); both looked at every STOP_POLL_S."""
        deadline = time.monotonic() + timeout_s
        polled = stop is not None or bool(sends)
        with self._cond:
            while msg_id not in self._mail:
                if stop is not None and stop.is_set():
                    raise LinkError(f"stopped waiting for {msg_id.direction} of round {msg_id.round} step {msg_id.step}")
                for future in sends:
                    if future.done() and future.exception() is not None:
                        raise LinkError(f"waiting for {msg_id.direction} of round {msg_id.round}: {future.exception()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    who = self.prev if msg_id.direction == "fwd" else self.next
                    raise LinkError(
                        f"no {msg_id.direction} of round {msg_id.round} step {msg_id.step} micro-batch {msg_id.micro} "
                        f"from {(who or '?')[-8:]} within {timeout_s:.0f}s"
                    )
                self._cond.wait(min(left, STOP_POLL_S) if polled else left)
            return self._mail.pop(msg_id)

    # ----- sending (worker thread -> event loop) ------------------------------------------------

    def send(self, peer: str, data: bytes, timeout_s: float) -> concurrent.futures.Future[None]:
        """Start sending; the future fails with LinkError if the neighbour refuses or is unreachable."""
        return asyncio.run_coroutine_threadsafe(self._send(peer, data, timeout_s), self.loop)

    async def _send(self, peer: str, data: bytes, timeout_s: float) -> None:
        async def go() -> int:
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL)
            try:
                writer.write(_LEN.pack(len(data)) + data)
                await writer.drain()
                return (await reader.readexactly(1))[0]
            finally:
                writer.close()

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = await asyncio.wait_for(go(), timeout=max(0.1, deadline - time.monotonic()))
                why = "refused our message"
            except Exception as e:
                status, why = REFUSED, f"unreachable: {type(e).__name__}: {e}"
            if status == TAKEN:
                break
            # Refused or unreachable: a neighbour that has just joined or taken up its new role may not
            # listen for us yet; try again until the deadline.
            if time.monotonic() + REFUSED_RETRY_S > deadline:
                raise LinkError(f"stage peer {peer[-8:]} {why}")
            await asyncio.sleep(REFUSED_RETRY_S)
        self.traffic.sent[peer] += len(data)
