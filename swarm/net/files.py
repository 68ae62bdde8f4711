"""Content-addressed files over the swarm: any node serves the files it has, by sha256.

A file is named by the sha256 of its bytes (hex) and its size, which is how the run description
names corpus shards and the tokenizer. Use:

    files = node.files   # SwarmNode makes one: FileService(dht=..., server=..., run_id=..., spawn=...)
    digest = await files.serve(path)       # hash a local file, serve it, advertise it in the DHT
    await files.fetch(digest, dest, size)  # download, verify, move to dest, then serve it too

Holders advertise themselves under run_key(run, 'files/<sha256>') with a signed `FileHolder`
record. A fetch asks for pieces of at most PIECE_BYTES ({"kind": "file", "sha256", "offset",
"length"} over /swarm/transfer/1, PIECES_IN_FLIGHT at a time) and writes them in order to
`<dest>.<pid>.part` while hashing, so memory stays bounded by a few pieces whatever the file size.
Every holder may be hostile: one that does not have the file, answers a wrong length, fails or is
slower than `piece_timeout_s` on a piece is dropped and the next holder continues from the same
offset (a stream that broke off mid-piece gets its holder one more turn, after the others: links
reset streams of honest peers too); if the finished file does not hash to the name, every holder
that contributed to it is dropped and the download starts again from the remaining ones.
Only a file whose sha256 matches is ever moved to `dest`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from swarm.log import get_logger
from swarm.net.records import FileHolder, run_key
from swarm.net.transfer import StreamBroken, TransferError
from swarm.net.transfer import fetch as fetch_bytes

if TYPE_CHECKING:
    from swarm.net.dht import SwarmDHT
    from swarm.net.transfer import TransferServer

logger = get_logger(__name__)

PIECE_BYTES = 1 << 20  # one request's body; the most a fetch or a served read holds in memory
ADVERTISE_TTL_S = 3600.0
READVERTISE_S = 1200.0
MAX_SERVING_READS = 4  # concurrent disk reads for other peers
PIECES_IN_FLIGHT = 4  # requests a fetch keeps open: hides the round trip on long links
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int], None]  # called with the bytes of the current attempt written so far
_Piece = tuple[bytes | None, str | None, bool]  # (bytes, what went wrong, whether the stream broke off)


class FileFetchError(RuntimeError):
    """No holder delivered the file with the right hash; the message says what each one did."""


def files_key(run_id: str, sha256: str) -> str:
    return run_key(run_id, f"files/{sha256}")


def check_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r:.80}")
    return sha256


def file_sha256(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """sha256 hex of a file, read in pieces (blocking: call it from a thread)."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while piece := f.read(PIECE_BYTES):
            digest.update(piece)
            done += len(piece)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


@dataclass
class _Served:
    path: Path
    size: int
    mtime_ns: int


class FileService:
    """Serves local files by sha256 to other nodes and fetches files by sha256 from them."""

    def __init__(
        self,
        *,
        dht: SwarmDHT,
        server: TransferServer,
        run_id: Callable[[], str],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        piece_timeout_s: float = 30.0,
        holder_wait_s: float = 30.0,
    ):
        """dht: the started DHT (holder records, this node's peer id); server: the started transfer
        server (serves pieces, carries fetches, counts traffic); run_id: the id of the run whose files these
        are (asked when needed: a joiner learns its run after its network is up);
        spawn: starts a background task that lives as long as the node.
        piece_timeout_s: a holder slower than this on one piece is dropped for the next one.
        holder_wait_s: how long a fetch waits for a first holder to appear in the DHT.
        """
        self.dht = dht
        self.server = server
        self.run_id = run_id
        self.spawn = spawn
        self.piece_timeout_s = piece_timeout_s
        self.holder_wait_s = holder_wait_s
        self._served: dict[str, _Served] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reads = asyncio.Semaphore(MAX_SERVING_READS)
        self._started = False
        server.register("file", self._provide)

    async def start(self) -> None:
        """Keep this node's holder records alive while it runs (serve() calls it; calling it again is harmless)."""
        if not self._started:
            self._started = True
            self.spawn(self._readvertise_loop())

    def serves(self, sha256: str) -> bool:
        return sha256 in self._served

    # ----- serving -------------------------------------------------------------------------------

    async def serve(self, path: str | os.PathLike[str], *, sha256: str | None = None) -> str:
        """Serve a local file and advertise it; returns its sha256 (hashed here unless given)."""
        path = Path(path)
        stat = await asyncio.to_thread(os.stat, path)
        digest = check_sha256(sha256) if sha256 is not None else await asyncio.to_thread(file_sha256, path)
        self._served[digest] = _Served(path, stat.st_size, stat.st_mtime_ns)
        await self.start()
        await self._advertise(digest)
        return digest

    async def _advertise(self, sha256: str) -> None:
        entry = self._served[sha256]
        record = FileHolder(peer_id=self.dht.peer_id, sha256=sha256, size=entry.size, time=time.time())
        if not await self.dht.put(files_key(self.run_id(), sha256), record, ADVERTISE_TTL_S):
            logger.warning("could not advertise file %s in the DHT", sha256[:12])

    async def _readvertise_loop(self) -> None:
        while True:
            await asyncio.sleep(READVERTISE_S)
            for sha256 in list(self._served):
                await self._advertise(sha256)

    async def _provide(self, request: dict) -> bytes | None:
        sha256, offset, length = request.get("sha256"), request.get("offset"), request.get("length")
        if not (isinstance(sha256, str) and isinstance(offset, int) and isinstance(length, int)):
            return None
        entry = self._served.get(sha256)
        if entry is None or not (0 < length <= PIECE_BYTES and 0 <= offset and offset + length <= entry.size):
            return None
        async with self._reads:
            return await asyncio.to_thread(self._read, sha256, entry, offset, length)

    def _read(self, sha256: str, entry: _Served, offset: int, length: int) -> bytes | None:
        try:
            stat = os.stat(entry.path)
            if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns):
                logger.warning("%s changed on disk: no longer serving it as %s", entry.path, sha256[:12])
                self._served.pop(sha256, None)
                return None
            with open(entry.path, "rb") as f:
                f.seek(offset)
                return f.read(length)
        except OSError as e:
            logger.warning("cannot serve %s: %s", entry.path, e)
            return None

    # ----- fetching ------------------------------------------------------------------------------

    async def holders(self, sha256: str, size: int) -> list[str]:
        """Peers that advertise the file (signed by themselves, with the expected size), newest first."""
        items = await self.dht.get_all(files_key(self.run_id(), sha256), FileHolder)
        good = [i.record for i in items if i.signer == i.record.peer_id and i.record.sha256 == sha256 and i.record.size == size]
        return [h.peer_id for h in sorted(good, key=lambda h: -h.time) if h.peer_id != self.dht.peer_id]

    async def fetch(
        self,
        sha256: str,
        dest: str | os.PathLike[str],
        size: int,
        *,
        holders: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> Path:
        """Download the file named sha256 (of `size` bytes) to dest, verified, and serve it from then on.

        `holders` are tried first (e.g. the coordinator), then those advertised in the DHT. A dest
        that already holds the right bytes is kept without a download. Raises FileFetchError when
        no holder delivers the right bytes.
        """
        check_sha256(sha256)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        dest = Path(dest)
        async with self._locks.setdefault(sha256, asyncio.Lock()):
            if await asyncio.to_thread(_holds, dest, sha256, size):
                await self.serve(dest, sha256=sha256)
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                await self._download(sha256, dest, size, list(holders), progress)
            finally:
                _part(dest).unlink(missing_ok=True)
            await self.serve(dest, sha256=sha256)
            return dest

    async def _download(self, sha256: str, dest: Path, size: int, given: list[str], progress: Progress | None) -> None:
        dropped: set[str] = set()
        broke: set[str] = set()  # holders whose stream already broke off once in this download
        failures: list[str] = []
        deadline = time.monotonic() + self.holder_wait_s
        while True:
            found = await self.holders(sha256, size)
            candidates = [p for p in dict.fromkeys(given + found) if p not in dropped and p != self.dht.peer_id]
            if not candidates:
                if failures or time.monotonic() > deadline:
                    what = "; ".join(failures) or f"nobody advertised it within {self.holder_wait_s:.0f}s"
                    raise FileFetchError(f"could not fetch file {sha256[:12]} ({size} bytes): {what}")
                await asyncio.sleep(0.5)
                continue
            contributors, digest = await self._attempt(sha256, dest, size, candidates, dropped, broke, failures, progress)
            if digest == sha256:
                await asyncio.to_thread(os.replace, _part(dest), dest)
                return
            if digest is not None:
                names = ", ".join(p[-8:] for p in contributors)
                failures.append(f"bytes from {names} hashed to {digest[:12]}, expected {sha256[:12]}")
                logger.warning("file %s: %s; dropping them", sha256[:12], failures[-1])
                dropped |= contributors

    async def _attempt(
        self,
        sha256: str,
        dest: Path,
        size: int,
        candidates: list[str],
        dropped: set[str],
        broke: set[str],
        failures: list[str],
        progress: Progress | None,
    ) -> tuple[set[str], str | None]:
        """One pass over the file from offset 0, up to PIECES_IN_FLIGHT requests at a time to the
        current holder, written in order; returns who contributed and the bytes' sha256 (None if
        every candidate failed before the end)."""
        digest = hashlib.sha256()
        contributors: set[str] = set()
        queue = list(candidates)
        offsets = list(range(0, size, PIECE_BYTES))
        pending: dict[int, asyncio.Task[_Piece]] = {}
        requested = written = 0  # pieces asked for, pieces written (both in file order)
        try:
            with open(_part(dest), "wb") as out:
                while written < len(offsets):
                    if not queue:
                        return contributors, None
                    peer = queue[0]
                    while requested < len(offsets) and len(pending) < PIECES_IN_FLIGHT:
                        pending[requested] = asyncio.create_task(self._piece(peer, sha256, offsets[requested], size))
                        requested += 1
                    piece, problem, broken = await pending.pop(written)
                    if problem is not None or piece is None:
                        queue.pop(0)
                        if broken and peer not in broke:
                            broke.add(peer)
                            queue.append(peer)
                            how = "gets one more turn"
                        else:
                            failures.append(f"{peer[-8:]}: {problem}")
                            dropped.add(peer)
                            how = "dropped"
                        logger.info(
                            "file %s: holder %s %s at offset %d: %s", sha256[:12], peer[-8:], how, offsets[written], problem
                        )
                        await _cancel(pending)  # the next holder asks again from this piece on
                        requested = written
                        continue
                    await asyncio.to_thread(_write, out, digest, piece)
                    contributors.add(peer)
                    written += 1
                    if progress is not None:
                        progress(offsets[written - 1] + len(piece))
        finally:
            await _cancel(pending)
        return contributors, digest.hexdigest()

    async def _piece(self, peer: str, sha256: str, offset: int, size: int) -> _Piece:
        """One piece from one holder: (bytes, None, False) or (None, what went wrong, whether the
        stream broke off)."""
        length = min(PIECE_BYTES, size - offset)
        request = {"kind": "file", "sha256": sha256, "offset": offset, "length": length}
        try:
            piece = await fetch_bytes(
                self.server.p2p, peer, request, max_bytes=length, timeout_s=self.piece_timeout_s, traffic=self.server.traffic
            )
        except TransferError as e:
            return None, str(e), isinstance(e, StreamBroken)
        if piece is None:
            return None, "does not have it", False
        if len(piece) != length:
            return None, f"sent {len(piece)} bytes for a {length}-byte piece", False
        return piece, None, False


async def _cancel(pending: dict[int, asyncio.Task[_Piece]]) -> None:
    for task in pending.values():
        task.cancel()
    await asyncio.gather(*pending.values(), return_exceptions=True)
    pending.clear()


def _part(dest: Path) -> Path:
    """The download in progress: per process, so peers sharing a cache folder never mix their bytes."""
    return dest.with_name(f"{dest.name}.{os.getpid()}.part")


def _write(out: BinaryIO, digest: Any, piece: bytes) -> None:
    out.write(piece)
    digest.update(piece)


def _holds(path: Path, sha256: str, size: int) -> bool:
    """Whether path already holds exactly these bytes."""
    try:
        return path.is_file() and path.stat().st_size == size and file_sha256(path) == sha256
    except OSError:
        return False
