"""A round's payloads: encoding ours, serving them, fetching and validating everyone else's.

Payloads are content-addressed by sha256: a submission in the DHT names the digest, and any peer
holding the bytes (the sender, the round leader, anyone who fetched them) can serve them.
Decoding validates everything (codec/payload.py); a bad payload raises PayloadError.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from swarm.codec import (
    PayloadError,
    PayloadMeta,
    SparseLoCoCompressor,
    SparseLoCoConfig,
    decode_part,
    decode_payload,
    encode_dense,
    encode_payload,
    matches_digest,
    payload_digest,
    payload_part,
    tensor_hashes,
)
from swarm.codec.header import PART_MAGIC
from swarm.log import get_logger
from swarm.net.transfer import BlobCache, Traffic, TransferError
from swarm.run import RunConfig

if TYPE_CHECKING:
    from swarm.round.world import Fetch

logger = get_logger(__name__)


def codec_config(run: RunConfig) -> SparseLoCoConfig:
    o = run.outer
    return SparseLoCoConfig(
        chunk_rows=o.chunk_size, chunk_cols=o.chunk_size, topk_per_chunk=o.topk_per_chunk, error_decay=o.error_decay
    )


AGGREGATE_DENSITY = 4  # an aggregate keeps this many times one payload's top-k per chunk (docs/performance.md)
AGGREGATE_PARTS = 8  # an aggregate relays in this many parts of whole tensors, each down its own tree


def aggregate_config(run: RunConfig, density: int = AGGREGATE_DENSITY) -> SparseLoCoConfig:
    """The codec settings of a round's aggregate: the run's, at `density` times the top-k."""
    c = codec_config(run)
    return dataclasses.replace(c, topk_per_chunk=min(density * c.topk_per_chunk, c.chunk_rows * c.chunk_cols))


def dense_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """Size of the tensors as dense fp32."""
    return 4 * sum(int(torch.Size(s).numel()) for s in shapes.values())


def max_payload_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """No honest payload is larger than the dense fp32 tensors plus headroom for the header."""
    return dense_bytes(shapes) + (1 << 20)


@dataclass
class Encoded:
    data: bytes
    digest: str


class PayloadEncoder:
    """Turns a pseudo-gradient into payload bytes; owns the error-feedback buffers (SparseLoCo)."""

    def __init__(self, run: RunConfig, sender: str):
        self.run = run
        self.sender = sender
        self.compressor = SparseLoCoCompressor(codec_config(run)) if run.outer.codec == "sparseloco" else None
        self._saved_errors: dict[str, torch.Tensor] | None = None

    def encode(self, delta: dict[str, torch.Tensor], round_no: int) -> Encoded:
        if self.compressor is not None:
            meta = PayloadMeta.for_sparseloco(self.compressor.config, run_id=self.run.run_id, round=round_no, sender=self.sender)
            # Keep e_{t-1} so the round can be undone if our payload misses the manifest; buffers of
            # tensors we no longer send (an expert handed to another peer) are dropped.
            errors = {n: t for n, t in self.compressor.state_dict().items() if n in delta}
            self.compressor.load_state_dict(errors)
            self._saved_errors = {n: t.clone() for n, t in errors.items()}
            tensors = {n: self.compressor.compress(n, d) for n, d in delta.items()}
            self._pending_delta = delta
        else:
            meta = PayloadMeta.for_dense(self.run.outer.codec, run_id=self.run.run_id, round=round_no, sender=self.sender)
            tensors = {n: encode_dense(d, self.run.outer.codec) for n, d in delta.items()}
        data = encode_payload(meta, tensors)
        return Encoded(data, payload_digest(data))

    def returned(self, sent: dict[str, torch.Tensor], applied: dict[str, torch.Tensor]) -> None:
        """Our payload was in a round whose aggregate (`applied`) dropped some of its coordinates:
        what we sent there goes back into our error buffer and waits, as unsent work does (each
        sender knows what it sent and which coordinates the aggregate kept)."""
        if self.compressor is None:
            return
        errors = self.compressor.state_dict()
        for name, own in sent.items():
            kept = applied.get(name)
            dropped = own if kept is None else own * (kept == 0)
            errors[name] = errors[name] + dropped if name in errors else dropped
        self.compressor.load_state_dict(errors)

    def excluded(self) -> None:
        """Our payload was not applied: nothing was transmitted, so e ← β·e_old + Δ (all of a)."""
        if self.compressor is None or self._saved_errors is None:
            return
        beta = self.run.outer.error_decay
        restored = {}
        for name, delta in self._pending_delta.items():
            old = self._saved_errors.get(name)
            restored[name] = delta.clone() if old is None else old.mul(beta).add_(delta)
        self.compressor.load_state_dict(restored)
        self._saved_errors = None


FETCH_TIMEOUT_S = 60.0  # the most one holder is given to answer a payload request
RELAY_WAIT_S = 30.0  # the most a holder waits for a blob on its way to it before answering a request for it
REVEAL_S = 2.0  # a sender serves its payload this long after announcing it (leaders poll every 0.25 s)


class Unavailable(TransferError):
    """No holder asked gave the bytes. `not_here`: the holders that answered they do not have them,
    each with how long its answer took (a holder with a copy on its way holds the request until it
    arrives, RELAY_WAIT_S at most: a "no" that took that long comes from a member relaying it)."""

    def __init__(self, message: str, not_here: dict[str, float]):
        super().__init__(message)
        self.not_here = not_here

    def relaying(self, holder: str) -> bool:
        return self.not_here.get(holder, 0.0) >= RELAY_WAIT_S / 2


class PayloadStore:
    """Holds payload bytes for serving and fetches missing ones from whoever has them."""

    def __init__(self, run: RunConfig, shapes: dict[str, tuple[int, ...]], traffic: Traffic, *, fetch: Fetch | None = None):
        """`fetch` gets one blob from one peer (the node's transfer, or the simulator's); without
        it the store only decodes and serves."""
        self.run = run
        self.fetch = fetch
        self.matches = matches_digest  # checks fetched bytes against their digest (the simulator shares its answers)
        self.shapes = shapes
        self.traffic = traffic
        self.blobs = BlobCache(max_bytes=max(256 << 20, 8 * dense_bytes(shapes)))
        self._fetching: dict[str, asyncio.Future[None]] = {}  # blobs being fetched: a request for one waits
        self._reveal_at: dict[str, float] = {}  # our own payloads' digests: when they may be served
        self._hashes: dict[str, tuple[bytes, list[bytes]]] = {}  # digest -> its hash tree's leaves (serving parts)
        self.max_bytes = max_payload_bytes(shapes)
        codec = run.outer.codec
        self.codec = (codec, codec_config(run).wire_params() if codec == "sparseloco" else {})

    def hold(self, digest: str, data: bytes, *, reveal_s: float = REVEAL_S) -> None:
        """Our own payload, about to be announced: served only `reveal_s` from now. Whoever copies
        it can announce the copy no sooner, by when the leader has seen ours: the copy is the
        later one (robust.py), and cannot make the two look simultaneous and both sit out."""
        now = asyncio.get_running_loop().time()
        self._reveal_at = {d: t for d, t in self._reveal_at.items() if t > now}
        self._reveal_at[digest] = now + reveal_s
        self.blobs.put(digest, data)

    async def serve(self, request: dict) -> bytes | None:
        """A payload by digest, or with "names" the part of it that carries those tensors (built
        from the whole payload, or a part held for exactly those names)."""
        digest, names = request.get("digest"), request.get("names")
        if not isinstance(digest, str):
            return None
        if names is not None and not (
            isinstance(names, list) and len(names) <= MAX_PART_NAMES and all(isinstance(n, str) for n in names)
        ):
            return None
        if (wait := self._reveal_at.get(digest, 0.0) - asyncio.get_running_loop().time()) > 0:
            await asyncio.sleep(wait)  # a slower answer, not a refusal: fetchers wait far longer than this
        key = digest if names is None else _part_key(digest, names)
        if (fetching := self._fetching.get(key)) is not None and not fetching.done() and key not in self.blobs:
            # On its way to us (an aggregate relayed down a tree of members): answer once it is here.
            await asyncio.wait([fetching], timeout=RELAY_WAIT_S)
        if names is None:
            return self.blobs.get(digest)
        if (part := self.blobs.get(_part_key(digest, names))) is not None:
            return part
        whole = self.blobs.get(digest)
        if whole is None:
            return None
        try:
            if digest not in self._hashes:
                self._hashes = dict(list(self._hashes.items())[-63:])  # the last rounds' payloads only
                self._hashes[digest] = await asyncio.to_thread(tensor_hashes, whole)
            return await asyncio.to_thread(payload_part, whole, names, self._hashes[digest])
        except PayloadError:  # a malformed payload we hold (to refuse it): no part of it
            return None

    async def get(
        self,
        digest: str,
        holders: list[str],
        names: list[str] | None = None,
        *,
        within_s: float = FETCH_TIMEOUT_S,
        again: bool = True,
    ) -> bytes:
        """The bytes with this digest, from our cache or the first holder that has them; with
        `names`, a part carrying those of its tensors (or the whole payload if we hold it):
        `decode` takes either. No holder is asked once `within_s` has passed, and none is given
        longer than what is left of it (a body's own allowance for its size aside: transfer.py).
        `again`: the first holder is asked a second time when all have failed (a caller that
        retries on its own terms passes False). A blob others fetch from us in turn is fetched
        inside `relaying`."""
        cached = self.blobs.get(digest)
        key = digest if names is None else _part_key(digest, names)
        if cached is None and names is not None:
            cached = self.blobs.get(key)
        if cached is not None:
            return cached
        if self.fetch is None:
            raise TransferError(f"payload {digest[:12]} is not here and this store fetches nothing")
        return await self._get(digest, holders, key, within_s, names, again)

    @contextlib.contextmanager
    def relaying(self, digest: str, parts: list[list[str]]) -> Iterator[None]:
        """While in it, a request for one of these parts of `digest` that reaches us before we hold
        it waits for it (RELAY_WAIT_S at most), between our own tries too: a member retrying its
        ancestors in a relay tree must not answer its own children "not here" meanwhile."""
        loop = asyncio.get_running_loop()
        mine = [k for k in (_part_key(digest, names) for names in parts) if k not in self._fetching]
        for key in mine:
            self._fetching[key] = loop.create_future()
        try:
            yield
        finally:
            for key in mine:
                if not (done := self._fetching.pop(key)).done():
                    done.set_result(None)

    async def _get(
        self, digest: str, holders: list[str], key: str, within_s: float, names: list[str] | None = None, again: bool = True
    ) -> bytes:
        assert self.fetch is not None
        request: dict[str, Any] = {"kind": "payload", "digest": digest}
        if names is not None:
            request["names"] = sorted(names)
        errors = []
        not_here: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within_s
        for holder in holders + holders[:1] * again:  # the first holder gets a second chance (transient stream errors)
            if (left := give_up - loop.time()) <= 0:
                errors.append(f"no time left to ask {holder[-8:]}")
                break
            asked = loop.time()
            try:
                data = await self.fetch(holder, request, self.max_bytes, min(FETCH_TIMEOUT_S, left))
            except TransferError as e:
                errors.append(str(e))
                continue
            if data is None:
                errors.append(f"{holder[-8:]} does not have it")
                not_here[holder] = max(not_here.get(holder, 0.0), loop.time() - asked)
            elif not self.matches(data, digest, names):
                errors.append(f"{holder[-8:]} sent bytes with another digest")
            else:
                self.blobs.put(key, data)
                if (waiting := self._fetching.get(key)) is not None and not waiting.done():
                    waiting.set_result(None)  # those who asked us for it meanwhile get it now
                return data
        raise Unavailable(f"payload {digest[:12]} unavailable: " + "; ".join(errors[-3:]), not_here)

    def encode_aggregate(self, mean: dict[str, torch.Tensor], *, leader: str, round_no: int) -> Encoded:
        """A round's aggregate as payload bytes, signed for by `leader` in its manifest: SparseLoCo's
        mean compressed again at AGGREGATE_DENSITY times the top-k (a fresh compressor: what it
        drops goes back to the senders, `PayloadEncoder.returned`), a dense codec's mean as it is."""
        run = self.run
        if run.outer.codec == "sparseloco":
            config = aggregate_config(run)
            fresh = SparseLoCoCompressor(config)
            meta = PayloadMeta.for_sparseloco(config, run_id=run.run_id, round=round_no, sender=leader)
            tensors = {n: fresh.compress(n, t) for n, t in sorted(mean.items())}
        else:
            meta = PayloadMeta.for_dense(run.outer.codec, run_id=run.run_id, round=round_no, sender=leader)
            tensors = {n: encode_dense(t, run.outer.codec) for n, t in sorted(mean.items())}
        data = encode_payload(meta, tensors)
        return Encoded(data, payload_digest(data))

    def decode_aggregate(self, data: bytes, digest: str, *, leader: str, round_no: int) -> dict[str, torch.Tensor]:
        """Validate and decode a round's aggregate, whole or a part of it checked against `digest`
        (its tensors only; CPU-bound: call from a worker thread)."""
        codec = self.run.outer.codec
        expected = (codec, aggregate_config(self.run).wire_params()) if codec == "sparseloco" else self.codec
        if bytes(data[:3]) != PART_MAGIC:
            meta, tensors = decode_payload(data, expected=self.shapes, max_bytes=self.max_bytes, expected_codec=expected)
        else:
            meta, tensors = decode_part(data, digest, expected=self.shapes, max_bytes=self.max_bytes, expected_codec=expected)
        return self._checked(meta, tensors, leader, round_no, part=True)

    def decode(self, data: bytes, *, sender: str, round_no: int) -> dict[str, torch.Tensor]:
        """Validate and decode one payload (CPU-bound: call from a worker thread).

        Any non-empty subset of the model's tensors is well-formed; whether it is the sender's to
        send is the round leader's check. Nothing decoded is cached, so applying a round holds one
        decoded payload at a time.
        """
        meta, tensors = decode_payload(data, expected=self.shapes, max_bytes=self.max_bytes, expected_codec=self.codec)
        return self._checked(meta, tensors, sender, round_no)

    def decode_any(self, data: bytes, digest: str, *, sender: str, round_no: int) -> dict[str, torch.Tensor]:
        """`decode`, for a whole payload or a part of the payload named by `digest` (its tensors only)."""
        if bytes(data[:3]) != PART_MAGIC:
            return self.decode(data, sender=sender, round_no=round_no)
        meta, tensors = decode_part(data, digest, expected=self.shapes, max_bytes=self.max_bytes, expected_codec=self.codec)
        return self._checked(meta, tensors, sender, round_no, part=True)

    def _checked(
        self, meta: PayloadMeta, tensors: dict[str, torch.Tensor], sender: str, round_no: int, *, part: bool = False
    ) -> dict[str, torch.Tensor]:
        if meta.run_id != self.run.run_id:
            raise PayloadError(f"payload is for run {meta.run_id!r}")
        if meta.round != round_no:
            raise PayloadError(f"payload is for round {meta.round}, expected {round_no}")
        if meta.sender != sender:
            raise PayloadError("payload sender field does not match the submitting peer")
        if meta.codec != self.run.outer.codec:
            raise PayloadError(f"payload codec {meta.codec!r} is not the run's {self.run.outer.codec!r}")
        if not tensors and not part:  # a part may carry none of a payload's tensors
            raise PayloadError("payload carries no tensor")
        return tensors


MAX_PART_NAMES = 1 << 16  # tensors a part request may name


def tensor_groups(shapes: dict[str, tuple[int, ...]], parts: int) -> list[list[str]]:
    """The model's tensors in name order, cut into at most `parts` runs of about equal size (whole
    tensors: a part of a payload carries whole tensors). A pure function of the shapes."""
    names = sorted(shapes)
    sizes = [int(torch.Size(shapes[n]).numel()) for n in names]
    groups: list[list[str]] = []
    current: list[str] = []
    total, filled = sum(sizes), 0
    for name, size in zip(names, sizes):
        current.append(name)
        filled += size
        if filled * parts >= total * (len(groups) + 1) and len(groups) < parts - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _part_key(digest: str, names: list[str]) -> str:
    """Where a part is cached: the payload's digest and the names it was cut for."""
    return f"{digest}/" + hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
