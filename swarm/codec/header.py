"""The payload header: its typed form (PayloadMeta, TensorEntry), msgpack map, and validation.

Everything here that parses network input raises PayloadError; see docs/wire-format.md.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from swarm.codec.base import CODEC_KINDS, SPARSELOCO, ParamValue, PayloadError
from swarm.codec.dense import dense_section_nbytes
from swarm.codec.sparseloco import SparseLoCoConfig, sparse_section_nbytes

FORMAT_VERSION = 2  # 2: the content address is a hash tree over the header and each tensor (a part is checkable)
MAGIC = b"SWP"
PREFIX = struct.Struct("<3sBI")  # magic, format version (u8), header length (u32 LE)
PART_MAGIC = b"SWp"  # a part of a payload: some of its tensors, with the hashes of the others
PART_PREFIX = struct.Struct("<3sBII")  # magic, format version, header length, tensors included (u32 LE)
MAX_HEADER_BYTES = 16 << 20
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 512
MAX_DIMS = 8
MAX_TENSORS = 1 << 16
MAX_DIM = 1 << 40  # a single dimension; products are bounded separately by max_numel
_HEADER_KEYS = frozenset(("version", "codec", "run_id", "round", "sender", "params", "tensors"))
_ENTRY_KEYS = frozenset(("name", "shape", "lens"))


def codec_config(codec: str, params: Mapping[str, object]) -> SparseLoCoConfig | None:
    """The decoder config for (codec, params): SparseLoCoConfig or None for dense. ValueError if bad."""
    if codec not in CODEC_KINDS:
        raise ValueError(f"unknown codec {codec!r}")
    if codec == SPARSELOCO:
        return SparseLoCoConfig.from_wire_params(params)
    if params:
        raise ValueError(f"{codec} takes no params, got {sorted(map(str, params))}")
    return None


def section_nbytes(codec: str, config: SparseLoCoConfig | None, shape: tuple[int, ...]) -> list[int]:
    """Exact section lengths of one tensor under a codec (the size formula)."""
    if config is not None:
        return sparse_section_nbytes(shape, config)
    return dense_section_nbytes(shape, codec)


@dataclass(frozen=True)
class PayloadMeta:
    """Who sent what for which round, and how it is encoded."""

    run_id: str
    round: int
    sender: str
    codec: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self.run_id, "run_id", MAX_ID_CHARS)
        _check_str(self.sender, "sender", MAX_ID_CHARS)
        _check_int(self.round, "round", 0, (1 << 63) - 1)
        codec_config(self.codec, self.params)

    @classmethod
    def for_sparseloco(cls, config: SparseLoCoConfig, *, run_id: str, round: int, sender: str) -> PayloadMeta:
        return cls(run_id, round, sender, SPARSELOCO, config.wire_params())

    @classmethod
    def for_dense(cls, kind: str, *, run_id: str, round: int, sender: str) -> PayloadMeta:
        return cls(run_id, round, sender, kind, {})


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    lens: tuple[int, ...]


def header_dict(meta: PayloadMeta, entries: list[TensorEntry]) -> dict[str, object]:
    """The header map in its canonical key order (payload_size relies on this exact form)."""
    return {
        "version": FORMAT_VERSION,
        "codec": meta.codec,
        "run_id": meta.run_id,
        "round": meta.round,
        "sender": meta.sender,
        "params": dict(meta.params),
        "tensors": [{"name": e.name, "shape": list(e.shape), "lens": list(e.lens)} for e in entries],
    }


def _check_int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    return value


def _check_str(value: object, what: str, max_chars: int) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise ValueError(f"{what} must be a str of at most {max_chars} chars")
    return value


def _check_keys(obj: object, keys: frozenset[str], what: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not a map")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(map(str, set(obj) - keys))
        raise ValueError(f"{what} keys wrong: missing {missing}, unexpected {extra}")
    return obj


def _parse_entry(obj: object, index: int) -> TensorEntry:
    entry = _check_keys(obj, _ENTRY_KEYS, f"tensor entry {index}")
    name = _check_str(entry["name"], f"tensor {index} name", MAX_NAME_CHARS)
    shape, lens = entry["shape"], entry["lens"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ValueError(f"tensor {name!r} shape must be a list of at most {MAX_DIMS} ints")
    if not isinstance(lens, list) or len(lens) > 8:
        raise ValueError(f"tensor {name!r} lens must be a list of at most 8 ints")
    dims = tuple(_check_int(d, f"tensor {name!r} dim", 0, MAX_DIM) for d in shape)
    sizes = tuple(_check_int(n, f"tensor {name!r} section length", 0, 1 << 62) for n in lens)
    return TensorEntry(name, dims, sizes)


def parse_header(obj: object) -> tuple[PayloadMeta, list[TensorEntry]]:
    """Validate an unpacked header; raises PayloadError naming the first problem."""
    try:
        header = _check_keys(obj, _HEADER_KEYS, "header")
        _check_int(header["version"], "header version", FORMAT_VERSION, FORMAT_VERSION)
        if not isinstance(header["codec"], str) or header["codec"] not in CODEC_KINDS:
            raise ValueError(f"unknown codec {header['codec']!r}")
        if not isinstance(header["params"], dict):
            raise ValueError("params is not a map")
        meta = PayloadMeta(header["run_id"], header["round"], header["sender"], header["codec"], header["params"])
        tensors = header["tensors"]
        if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
            raise ValueError(f"tensors must be a list of at most {MAX_TENSORS} entries")
        entries = [_parse_entry(obj, i) for i, obj in enumerate(tensors)]
    except PayloadError:
        raise
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"bad header: {exc}") from None
    names = [e.name for e in entries]
    if any(a >= b for a, b in itertools.pairwise(names)):
        raise PayloadError("tensor names must be unique and in ascending order")
    return meta, entries
