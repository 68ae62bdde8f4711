"""Moving bytes between peers over libp2p streams: payloads by digest, state by round.

Each request is one stream: the caller writes a length-prefixed msgpack header, the server answers
with a status byte and a length-prefixed body streamed in 64 KiB pieces. Nothing here interprets
the body; payload.py and state.py validate what arrives. DHT values never carry these bytes.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack

from swarm.log import get_logger

if TYPE_CHECKING:  # hivemind is imported where bytes move, not where this module's caches are used:
    # a payload store decodes and serves without it (the GPU check runs where hivemind is not installed)
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

logger = get_logger(__name__)

PROTOCOL = "/swarm/transfer/1"
MAX_HEADER_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024
HEADER_TIMEOUT_S = 30.0  # a request's header, once the stream is open
HANDLER_TIMEOUT_S = 600.0  # a provider's answer (a state request may wait for a free reader)
# A body's deadline grows with its size: the caller's fixed allowance (dialling, the request, the
# first byte) plus the body at MIN_RATE. Honest links are slower than any fixed deadline assumes
# (a 43 MB state over 2 Mbit/s takes three minutes; a sender's uplink is shared by everyone fetching
# from it), while a donor trickling bytes to hold a fetcher is cut off at MIN_RATE, or after STALL_S
# with no byte at all. 32 KiB/s is 256 kbit/s: a 10 Mbit/s uplink shared by 40 fetchers.
MIN_RATE = 32 * 1024  # bytes per second, on average over the body
STALL_S = 30.0  # seconds without a byte of the body
OK, NOT_FOUND, ERROR = 0, 1, 2
_LEN = struct.Struct("!I")
_BODY = struct.Struct("!BQ")

# An answer: bytes, or pieces sent one after the other without copying (views into what the
# provider keeps: a stream then holds only the pieces it sends, not what they were cut from).
Body = bytes | memoryview | Sequence[bytes | memoryview]
Provider = Callable[[dict], Awaitable[Body | None]]
MAX_WAITING = 64  # requests of a limited kind waiting for a turn; beyond it they are answered 'not found'


class TransferError(RuntimeError):
    """A fetch that failed: peer unreachable, timed out, refused, or answered too much."""


class StreamBroken(TransferError):
    """The stream ended or was reset mid-answer: on a real link this happens to honest peers too."""


def transfer_deadline_s(timeout_s: float, nbytes: int, *, min_rate: float = MIN_RATE) -> float:
    """How long a fetch of `nbytes` may take in all: `timeout_s` plus the body at `min_rate`."""
    return timeout_s + nbytes / min_rate


@dataclass
class Traffic:
    """Bytes this process moved over transfer streams (payloads and state)."""

    sent: int = 0
    received: int = 0


class BlobCache:
    """Content-addressed bytes kept for other peers to fetch, oldest evicted first, bounded in bytes."""

    def __init__(self, max_bytes: int = 256 << 20):
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.max_bytes = max_bytes
        self.nbytes = 0

    def put(self, digest: str, data: bytes) -> None:
        if digest in self._items:
            self.nbytes -= len(self._items[digest])
        self._items[digest] = data
        self._items.move_to_end(digest)
        self.nbytes += len(data)
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= len(old)

    def get(self, digest: str) -> bytes | None:
        return self._items.get(digest)

    def __contains__(self, digest: str) -> bool:
        return digest in self._items


class TransferServer:
    """Answers fetches for named kinds of content ('payload', 'state', ...) from provider callbacks."""

    def __init__(self, p2p: P2P, traffic: Traffic):
        self.p2p = p2p
        self.traffic = traffic
        self._providers: dict[str, Provider] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = {}
        self._peer_turns: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    def register(self, kind: str, provider: Provider, *, streams: int = 0) -> None:
        """Answer requests of `kind` with `provider`. `streams` > 0: at most that many answers of
        this kind in progress at once, each holding its turn from the provider's call to the body's
        last byte (a reader slower than MIN_RATE is cut off), one at a time per asking peer, and at
        most MAX_WAITING waiting for a turn. A slow reader then holds a turn, not a donor's memory:
        what the bodies in flight pin is bounded by `streams` (state answers are views into
        snapshots that later rounds replace)."""
        self._providers[kind] = provider
        if streams > 0:
            self._slots[kind] = asyncio.Semaphore(streams)
            self._waiting[kind] = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._handle)

    async def _handle(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer(str(info.peer_id), reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except Exception as e:
            logger.warning("transfer request from %s failed: %s", str(info.peer_id)[-8:], e)
        finally:
            writer.close()

    async def _answer(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await asyncio.wait_for(_read_header(reader), timeout=HEADER_TIMEOUT_S)
        kind = request.get("kind") if isinstance(request, dict) else None
        if not isinstance(request, dict) or not isinstance(kind, str) or kind not in self._providers:
            await self._send(writer, None)
            return
        slots = self._slots.get(kind)
        if slots is None:
            await self._send(writer, await asyncio.wait_for(self._providers[kind](request), timeout=HANDLER_TIMEOUT_S))
            return
        if self._waiting[kind] >= MAX_WAITING:
            await self._send(writer, None)
            return
        self._waiting[kind] += 1
        waiting = True
        lock, users = self._peer_turns.setdefault((kind, peer), (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock, slots:
                self._waiting[kind] -= 1
                waiting = False
                await self._send(writer, await asyncio.wait_for(self._providers[kind](request), timeout=HANDLER_TIMEOUT_S))
        finally:
            if waiting:
                self._waiting[kind] -= 1
            users[0] -= 1
            if not users[0]:
                del self._peer_turns[(kind, peer)]

    async def _send(self, writer: asyncio.StreamWriter, body: Body | None) -> None:
        """The answer; a reader slower than MIN_RATE is cut off (it must not pin a body for long)."""
        pieces = [] if body is None else [body] if isinstance(body, (bytes, memoryview)) else body
        views = [memoryview(p).cast("B") for p in pieces]
        size = sum(len(v) for v in views)
        deadline = transfer_deadline_s(HEADER_TIMEOUT_S, size)
        await asyncio.wait_for(_write_body(writer, OK if body is not None else NOT_FOUND, views, size), timeout=deadline)
        self.traffic.sent += size


async def fetch(
    p2p: P2P,
    peer_id: str,
    request: dict,
    *,
    max_bytes: int,
    timeout_s: float,
    traffic: Traffic | None = None,
    min_rate: float = MIN_RATE,
    stall_s: float = STALL_S,
) -> bytes | None:
    """Ask one peer for content; None if it does not have it, TransferError if the fetch failed.

    `timeout_s` bounds everything up to the answer's header; the body's first n bytes are then due
    by `transfer_deadline_s(timeout_s, n)` from the start, with at most `stall_s` between bytes.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def answer() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, int]:
        from hivemind.p2p import PeerID

        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), PROTOCOL)
        try:
            header = msgpack.packb(request, use_bin_type=True)
            writer.write(_LEN.pack(len(header)) + header)
            await writer.drain()
            status, length = _BODY.unpack(await reader.readexactly(_BODY.size))
        except BaseException:
            writer.close()
            raise
        return reader, writer, status, length

    async def body(reader: asyncio.StreamReader, length: int) -> bytes:
        # The rate floor holds as bytes arrive: the body's first n bytes are due by
        # start + timeout_s + n / min_rate, so a donor trickling a byte now and then is cut off as
        # soon as it falls behind, not at the end of the whole body's deadline.
        pieces, got = [], 0
        while got < length:
            size = min(length - got, CHUNK_BYTES)
            due = start + transfer_deadline_s(timeout_s, got + size, min_rate=min_rate)
            wait = min(stall_s, due - loop.time())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                piece = await asyncio.wait_for(reader.read(size), timeout=wait)
            except asyncio.TimeoutError:
                if loop.time() < due:
                    raise TransferError(f"stalled at {got} of {length} bytes") from None
                elapsed = loop.time() - start
                raise TransferError(f"{got} of {length} bytes in {elapsed:.0f}s: slower than {min_rate:.0f} B/s") from None
            if not piece:
                raise asyncio.IncompleteReadError(b"", length - got)
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)

    try:
        reader, writer, status, length = await asyncio.wait_for(answer(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise TransferError(f"fetch from {peer_id[-8:]} timed out after {timeout_s:.0f}s") from None
    except Exception as e:
        raise _failed(peer_id, e) from None
    try:
        if status != OK:
            return None
        if length > max_bytes:
            raise TransferError(f"peer offered {length} bytes, limit is {max_bytes}")
        data = await body(reader, length)
        if traffic is not None:
            traffic.received += len(data)
        return data
    except Exception as e:
        raise _failed(peer_id, e) from None
    finally:
        writer.close()


def _failed(peer_id: str, e: Exception) -> TransferError:
    """What a failed fetch raises: StreamBroken when the stream ended (it happens to honest peers)."""
    if isinstance(e, (asyncio.IncompleteReadError, ConnectionError)):
        return StreamBroken(f"fetch from {peer_id[-8:]} broke off: {type(e).__name__}: {e}")
    if isinstance(e, TransferError):
        return TransferError(f"fetch from {peer_id[-8:]}: {e}")
    return TransferError(f"fetch from {peer_id[-8:]} failed: {type(e).__name__}: {e}")


async def _read_header(reader: asyncio.StreamReader) -> object:
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"request header of {length} bytes is too large")
    return msgpack.unpackb(await reader.readexactly(length), raw=False)


async def _write_body(writer: asyncio.StreamWriter, status: int, views: list[memoryview], size: int) -> None:
    writer.write(_BODY.pack(status, size))
    for view in views:
        for offset in range(0, len(view), CHUNK_BYTES):
            writer.write(view[offset : offset + CHUNK_BYTES])
            await writer.drain()
    await writer.drain()
