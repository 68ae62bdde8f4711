"""The versioned payload: one peer's encoded pseudo-gradient for one round (docs/wire-format.md).

Layout: b"SWP" | version u8 | header length u32 LE | msgpack header | raw sections, tensor by
tensor in header order, each tensor's sections in codec order. Tensors are sorted by name so
equal content gives equal bytes (and digests). decode_payload turns any hostile input into a
PayloadError with a reason and never allocates more than the formula allows for the bytes
actually received.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import msgpack
import torch

from swarm.codec import dense, sparseloco
from swarm.codec.base import MAX_ABS_VALUE, SPARSELOCO, EncodedTensor, ParamValue, PayloadError, numel_of
from swarm.codec.header import (
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
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
    "decode_payload",
    "decode_tensor",
    "encode_payload",
    "payload_digest",
    "payload_size",
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


def payload_digest(data: bytes) -> str:
    """Content address of a payload: sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


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
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise PayloadError("payload buffer is not contiguous bytes") from None
    header_len = _read_prefix(view, max_bytes)
    meta, entries = parse_header(_unpack_header(view[PREFIX.size : PREFIX.size + header_len]))
    if expected_codec is not None:
        want_codec, want_params = expected_codec[0], dict(expected_codec[1])
        if (meta.codec, dict(meta.params)) != (want_codec, want_params):
            raise PayloadError(f"codec {meta.codec} {dict(meta.params)} is not the run's {want_codec} {want_params}")
    config = codec_config(meta.codec, meta.params)  # valid: parse_header checked it
    _check_entries(entries, meta, config, expected, max_numel)
    offset = PREFIX.size + header_len
    end = offset + sum(sum(e.lens) for e in entries)
    if end > view.nbytes:
        raise PayloadError(f"truncated: sections need {end} bytes, got {view.nbytes}")
    if end < view.nbytes:
        raise PayloadError(f"{view.nbytes - end} bytes of trailing garbage")
    tensors = {}
    for entry in entries:
        sections = []
        for length in entry.lens:
            sections.append(view[offset : offset + length])
            offset += length
        if config is not None:
            tensors[entry.name] = sparseloco.decode_sparse(entry.shape, tuple(sections), config, max_abs)
        else:
            tensors[entry.name] = dense.decode_dense(entry.shape, tuple(sections), meta.codec, max_abs)
    return meta, tensors
