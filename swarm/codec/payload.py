"""The versioned payload: one peer's encoded pseudo-gradient for one round (docs/wire-format.md).

Layout: b"SWP" | version u8 | header length u32 LE | msgpack header | raw sections, tensor by
tensor in header order, each tensor's sections in codec order. Tensors are sorted by name so
equal content gives equal bytes (and digests). decode_payload turns any hostile input into a
PayloadError with a reason and never allocates more than the formula allows for the bytes
actually received.

Its content address (`payload_digest`) is the root of a two-level hash tree: sha256 over the
sha256 of prefix + header and the sha256 of each tensor's bytes, in header order. So a node that
needs some tensors only (a pipeline stage) fetches a *part*: the header, the hashes of the tensors
it leaves out and the bytes of those it wants, and checks them against the same digest
(`payload_part`, `decode_part`). Part layout: b"SWp" | version u8 | header length u32 LE |
tensors included u32 LE | header | their indices in header order (u32 LE each) | a 32-byte sha256
per tensor left out, in header order | the included tensors' bytes, in header order.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Collection, Mapping, Sequence

import msgpack
import torch

from swarm.codec import dense, sparseloco
from swarm.codec.base import MAX_ABS_VALUE, SPARSELOCO, EncodedTensor, ParamValue, PayloadError, numel_of
from swarm.codec.header import (
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    PART_MAGIC,
    PART_PREFIX,
    PREFIX,
    PayloadMeta,
    TensorEntry,
    codec_config,
    header_dict,
    parse_header,
    section_nbytes,
)
from swarm.codec.sparseloco import SparseLoCoConfig

DEFAULT_MAX_PAYLOAD_BYTES = 512 << 20
DEFAULT_MAX_NUMEL = 1 << 30  # decoded elements per payload: 4 GiB of fp32

__all__ = [
    "DEFAULT_MAX_NUMEL",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "PayloadMeta",
    "decode_part",
    "decode_payload",
    "decode_tensor",
    "encode_payload",
    "inline_digest",
    "matches_digest",
    "part_digest",
    "payload_digest",
    "payload_part",
    "payload_size",
    "tensor_hashes",
]


def _pack_header(meta: PayloadMeta, entries: list[TensorEntry]) -> bytes:
    return msgpack.packb(header_dict(meta, entries), use_bin_type=True)


def encode_payload(meta: PayloadMeta, tensors: Mapping[str, EncodedTensor]) -> bytes:
    """Serialise encoded tensors under `meta`; ValueError if a tensor does not match the meta."""
    config = codec_config(meta.codec, meta.params)
    entries: list[TensorEntry] = []
    body: list[bytes] = []
    for name in sorted(tensors):
        encoded = tensors[name]
        if (encoded.codec, dict(encoded.params)) != (meta.codec, dict(meta.params)):
            raise ValueError(
                f"tensor {name!r} was encoded as {encoded.codec} {dict(encoded.params)}, "
                f"meta says {meta.codec} {dict(meta.params)}"
            )
        lens = tuple(len(s) for s in encoded.sections)
        if list(lens) != section_nbytes(meta.codec, config, encoded.shape):
            raise ValueError(f"tensor {name!r} sections {lens} do not match the size formula")
        entries.append(TensorEntry(name, encoded.shape, lens))
        body.extend(encoded.sections)
    header = _pack_header(meta, entries)
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, *body])


def payload_size(meta_or_config: PayloadMeta | SparseLoCoConfig | str, shapes: Mapping[str, Sequence[int]]) -> int:
    """Bytes of a payload carrying `shapes`.

    With a PayloadMeta: the exact total (prefix + header + sections). With a SparseLoCoConfig
    or a dense codec kind: the section bytes only (the header depends on names and ids).
    """
    if isinstance(meta_or_config, PayloadMeta):
        meta, codec, params = meta_or_config, meta_or_config.codec, meta_or_config.params
    elif isinstance(meta_or_config, SparseLoCoConfig):
        meta, codec, params = None, SPARSELOCO, meta_or_config.wire_params()
    else:
        meta, codec, params = None, meta_or_config, {}
    config = codec_config(codec, params)
    entries = []
    for name in sorted(shapes):
        shape = tuple(int(d) for d in shapes[name])
        entries.append(TensorEntry(name, shape, tuple(section_nbytes(codec, config, shape))))
    body = sum(sum(e.lens) for e in entries)
    if meta is None:
        return body
    return PREFIX.size + len(_pack_header(meta, entries)) + body


def inline_digest(data: bytes) -> str:
    """Content address of an inline payload (bytes a mode carries in the submission record): sha256, hex."""
    return hashlib.sha256(data).hexdigest()


def _spans(
    data: bytes | bytearray | memoryview, max_bytes: int | None
) -> tuple[memoryview, int, list[TensorEntry], list[tuple[int, int]]]:
    """A whole payload's framing checked: (view, header length, entries, each tensor's byte span).
    `max_bytes` None: no size limit (hashing bytes already in memory; fetches and decoding bound them)."""
    view = _as_view(data)
    header_len = _read_prefix(view, view.nbytes if max_bytes is None else max_bytes)
    _, entries = parse_header(_unpack_header(view[PREFIX.size : PREFIX.size + header_len]))
    spans, offset = [], PREFIX.size + header_len
    for entry in entries:
        spans.append((offset, offset + sum(entry.lens)))
        offset += sum(entry.lens)
    if offset != view.nbytes:
        raise PayloadError(f"sections need {offset} bytes, the payload has {view.nbytes}")
    return view, header_len, entries, spans


def tensor_hashes(data: bytes | bytearray | memoryview, max_bytes: int | None = None) -> tuple[bytes, list[bytes]]:
    """The leaves of a payload's hash tree: sha256 of prefix + header, and of each tensor's bytes."""
    view, header_len, _, spans = _spans(data, max_bytes)
    head = hashlib.sha256(view[: PREFIX.size + header_len]).digest()
    return head, [hashlib.sha256(view[a:b]).digest() for a, b in spans]


def _root(head: bytes, leaves: Sequence[bytes]) -> str:
    h = hashlib.sha256(head)
    for leaf in leaves:
        h.update(leaf)
    return h.hexdigest()


def payload_digest(data: bytes | bytearray | memoryview, max_bytes: int | None = None) -> str:
    """Content address of a payload: the root of its hash tree, hex (PayloadError if the bytes are
    not a well-framed payload)."""
    return _root(*tensor_hashes(data, max_bytes))


def payload_part(
    data: bytes | bytearray | memoryview, names: Collection[str], hashes: tuple[bytes, list[bytes]] | None = None
) -> bytes:
    """The part of a payload a fetcher of `names` needs (those of its tensors it carries, and the
    hashes of the rest); `hashes`: its `tensor_hashes`, if known."""
    view, header_len, entries, spans = _spans(data, None)
    _, leaves = hashes if hashes is not None else tensor_hashes(view)
    wanted = set(names)
    included = [i for i, e in enumerate(entries) if e.name in wanted]
    kept = set(included)
    return b"".join(
        [
            PART_PREFIX.pack(PART_MAGIC, FORMAT_VERSION, header_len, len(included)),
            view[PREFIX.size : PREFIX.size + header_len],
            b"".join(struct.pack("<I", i) for i in included),
            b"".join(leaf for i, leaf in enumerate(leaves) if i not in kept),
            *(view[spans[i][0] : spans[i][1]] for i in included),
        ]
    )


def _parse_part(
    data: bytes | bytearray | memoryview, max_bytes: int | None
) -> tuple[PayloadMeta, list[TensorEntry], dict[int, memoryview], str]:
    """A part's framing checked: (meta, every entry, the included tensors' bytes by index, the root
    it hashes to)."""
    view = _as_view(data)
    if max_bytes is not None and view.nbytes > max_bytes:
        raise PayloadError(f"part of {view.nbytes} bytes exceeds the limit of {max_bytes}")
    if view.nbytes < PART_PREFIX.size:
        raise PayloadError("truncated part prefix")
    magic, version, header_len, count = PART_PREFIX.unpack_from(view)
    if magic != PART_MAGIC or version != FORMAT_VERSION:
        raise PayloadError(f"not a part of a version {FORMAT_VERSION} payload ({bytes(magic)!r}, version {version})")
    if header_len > MAX_HEADER_BYTES or PART_PREFIX.size + header_len > view.nbytes:
        raise PayloadError("part header truncated or too long")
    header = view[PART_PREFIX.size : PART_PREFIX.size + header_len]
    meta, entries = parse_header(_unpack_header(header))
    offset = PART_PREFIX.size + header_len
    if count > len(entries) or offset + 4 * count + 32 * (len(entries) - count) > view.nbytes:
        raise PayloadError("part truncated in its index or hashes")
    included = list(struct.unpack_from(f"<{count}I", view, offset))
    offset += 4 * count
    if any(b <= a for a, b in itertools.pairwise(included)) or (included and included[-1] >= len(entries)):
        raise PayloadError("part indices are not ascending tensor indices")
    kept = set(included)
    leaves: list[bytes] = []
    bodies: dict[int, memoryview] = {}
    body_at, given = offset + 32 * (len(entries) - count), 0
    for i, entry in enumerate(entries):
        if i in kept:
            size = sum(entry.lens)
            if body_at + size > view.nbytes:
                raise PayloadError(f"part truncated in tensor {entry.name!r}")
            bodies[i] = view[body_at : body_at + size]
            leaves.append(hashlib.sha256(bodies[i]).digest())
            body_at += size
        else:
            leaves.append(bytes(view[offset + 32 * given : offset + 32 * (given + 1)]))
            given += 1
    if body_at != view.nbytes:
        raise PayloadError(f"{view.nbytes - body_at} bytes of trailing garbage in a part")
    head = hashlib.sha256(PREFIX.pack(MAGIC, FORMAT_VERSION, header_len) + bytes(header)).digest()
    return meta, entries, bodies, _root(head, leaves)


def part_digest(data: bytes | bytearray | memoryview, max_bytes: int | None = None) -> str:
    """The digest of the payload a part was cut from (PayloadError if it is not a well-framed part)."""
    return _parse_part(data, max_bytes)[3]


def matches_digest(data: bytes | bytearray | memoryview, digest: str, names: Collection[str] | None = None) -> bool:
    """Whether bytes a holder sent are what was asked of the payload `digest` names. Whole
    (`names` None): a payload whose hash tree has that root, or other bytes whose sha256 it is (a
    sender's malformed payload: what it announced, to be refused as malformed when decoded), never
    a part. With `names`: the whole payload, or a part of it carrying exactly those of its tensors
    (a holder leaving some out would make the fetcher's mean wrong)."""
    try:
        view = _as_view(data)
        if bytes(view[:3]) != PART_MAGIC:
            return payload_digest(view) == digest
        if names is None:
            return False
        _, entries, bodies, root = _parse_part(view, None)
        asked = set(names)
        return root == digest and set(bodies) == {i for i, e in enumerate(entries) if e.name in asked}
    except PayloadError:
        return names is None and inline_digest(bytes(data)) == digest


def decode_part(
    data: bytes | bytearray | memoryview,
    digest: str,
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_numel: int = DEFAULT_MAX_NUMEL,
    max_abs: float = MAX_ABS_VALUE,
    expected_codec: tuple[str, Mapping[str, ParamValue]] | None = None,
) -> tuple[PayloadMeta, dict[str, torch.Tensor]]:
    """Check a part against the payload's digest and decode the tensors it carries (PayloadError
    on anything else: a part that does not hash to `digest` is not that payload's)."""
    meta, entries, bodies, root = _parse_part(data, max_bytes)
    if root != digest:
        raise PayloadError("part does not hash to the payload's digest")
    meta, config = _check_meta(meta, entries, expected, max_numel, expected_codec)
    return meta, {entries[i].name: _decode_entry(entries[i], body, meta, config, max_abs) for i, body in bodies.items()}


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    try:
        return memoryview(data).cast("B")
    except TypeError:
        raise PayloadError("payload buffer is not contiguous bytes") from None


def _check_meta(
    meta: PayloadMeta,
    entries: list[TensorEntry],
    expected: Mapping[str, Sequence[int]] | None,
    max_numel: int,
    expected_codec: tuple[str, Mapping[str, ParamValue]] | None,
) -> tuple[PayloadMeta, SparseLoCoConfig | None]:
    if expected_codec is not None:
        want_codec, want_params = expected_codec[0], dict(expected_codec[1])
        if (meta.codec, dict(meta.params)) != (want_codec, want_params):
            raise PayloadError(f"codec {meta.codec} {dict(meta.params)} is not the run's {want_codec} {want_params}")
    config = codec_config(meta.codec, meta.params)  # valid: parse_header checked it
    _check_entries(entries, meta, config, expected, max_numel)
    return meta, config


def _decode_entry(
    entry: TensorEntry, body: memoryview, meta: PayloadMeta, config: SparseLoCoConfig | None, max_abs: float
) -> torch.Tensor:
    sections, offset = [], 0
    for length in entry.lens:
        sections.append(body[offset : offset + length])
        offset += length
    if config is not None:
        return sparseloco.decode_sparse(entry.shape, tuple(sections), config, max_abs)
    return dense.decode_dense(entry.shape, tuple(sections), meta.codec, max_abs)


def decode_tensor(encoded: EncodedTensor, max_abs: float = MAX_ABS_VALUE) -> torch.Tensor:
    """Dense fp32 tensor from one EncodedTensor of any codec (no payload framing)."""
    if encoded.codec == SPARSELOCO:
        return sparseloco.decode_encoded(encoded, max_abs)
    return dense.decode_encoded(encoded, max_abs)


def _read_prefix(view: memoryview, max_bytes: int) -> int:
    """Check size, magic and version; return the header length."""
    if view.nbytes > max_bytes:
        raise PayloadError(f"payload of {view.nbytes} bytes exceeds the limit of {max_bytes}")
    if view.nbytes < PREFIX.size:
        raise PayloadError(f"truncated: {view.nbytes} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, version, header_len = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unknown format version {version} (this peer reads {FORMAT_VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise PayloadError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if PREFIX.size + header_len > view.nbytes:
        raise PayloadError("truncated inside the header")
    return header_len


def _unpack_header(raw: memoryview) -> object:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise PayloadError(f"header is not valid msgpack: {type(exc).__name__}") from None


def _check_entries(
    entries: list[TensorEntry],
    meta: PayloadMeta,
    config: SparseLoCoConfig | None,
    expected: Mapping[str, Sequence[int]] | None,
    max_numel: int,
) -> None:
    """Names and shapes against `expected`, the element budget, and the size formula."""
    total_numel = 0
    for entry in entries:
        if expected is not None:
            if entry.name not in expected:
                raise PayloadError(f"unexpected tensor {entry.name!r}")
            want = tuple(expected[entry.name])
            if want != entry.shape:
                raise PayloadError(f"tensor {entry.name!r} has shape {entry.shape}, expected {want}")
        total_numel += numel_of(entry.shape)
        if total_numel > max_numel:
            raise PayloadError(f"payload decodes to more than {max_numel} elements")
        formula = section_nbytes(meta.codec, config, entry.shape)
        if list(entry.lens) != formula:
            raise PayloadError(f"tensor {entry.name!r} section lengths {list(entry.lens)} != formula {formula}")


def decode_payload(
    data: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_numel: int = DEFAULT_MAX_NUMEL,
    max_abs: float = MAX_ABS_VALUE,
    expected_codec: tuple[str, Mapping[str, ParamValue]] | None = None,
) -> tuple[PayloadMeta, dict[str, torch.Tensor]]:
    """Parse and fully validate a payload; returns its meta and DENSE fp32 Delta_hat per name.

    `expected` maps the names a payload may carry to their shapes (a payload may carry a
    subset); `expected_codec` pins (codec, params) to the run's. Raises PayloadError only.
    """
    view = _as_view(data)
    header_len = _read_prefix(view, max_bytes)
    meta, entries = parse_header(_unpack_header(view[PREFIX.size : PREFIX.size + header_len]))
    meta, config = _check_meta(meta, entries, expected, max_numel, expected_codec)
    offset = PREFIX.size + header_len
    end = offset + sum(sum(e.lens) for e in entries)
    if end > view.nbytes:
        raise PayloadError(f"truncated: sections need {end} bytes, got {view.nbytes}")
    if end < view.nbytes:
        raise PayloadError(f"{view.nbytes - end} bytes of trailing garbage")
    tensors = {}
    for entry in entries:
        size = sum(entry.lens)
        tensors[entry.name] = _decode_entry(entry, view[offset : offset + size], meta, config, max_abs)
        offset += size
    return meta, tensors
