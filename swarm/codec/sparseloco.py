"""SparseLoCo compression: per-chunk top-k of the error-fed pseudo-gradient, low-bit values.

Per tensor and round: a = beta * e + delta; keep the k_c largest |a| of every chunk;
quantise them (quant.py); Delta_hat = the dense tensor a receiver decodes; e <- a - Delta_hat.
Delta_hat is built from exactly the values a receiver reconstructs (fp32 table lookups written
into zeros), so the residual kept locally is bit-exactly what nobody else received.

Sections of one tensor, in order: bin-mean table, value codes (in ascending position order
per chunk), then the index sections of the configured index coding (indexcode.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from swarm.codec.base import MAX_ABS_VALUE, SPARSELOCO, EncodedTensor, ParamValue, PayloadError, numel_of
from swarm.codec.chunking import ChunkLayout, chunk_topk
from swarm.codec.indexcode import ELIAS_FANO, INDEX_CODINGS, decode_indices, encode_indices, section_nbytes
from swarm.codec.quant import (
    VALUE_BITS_CHOICES,
    codes_nbytes,
    pack_codes,
    quantize,
    table_from_bytes,
    table_nbytes,
    table_to_bytes,
    unpack_codes,
)

# Bounds on chunk sizes a payload may declare: tiny chunks blow up per-chunk bookkeeping
# (a cheap memory attack), huge ones make the index coder's arithmetic pointless.
MIN_CHUNK_VALUES = 16
MAX_CHUNK_VALUES = 1 << 20
_WIRE_KEYS = ("chunk_rows", "chunk_cols", "chunk_1d", "topk_per_chunk", "value_bits", "index_coding")


@dataclass(frozen=True)
class SparseLoCoConfig:
    chunk_rows: int = 64  # 2-D block height; 64x64 = 4096 values as in the paper
    chunk_cols: int = 64
    chunk_1d: int = 4096  # contiguous run for 1-D and other shapes; same size as a block
    topk_per_chunk: int = 64  # values kept per full 2-D block: density 64/4096 = 1.5625%
    error_decay: float = 0.95  # beta of the error-feedback buffer (published default)
    value_bits: int = 2  # 4 bins over +-3 sigma, each decoded to its members' mean
    index_coding: str = ELIAS_FANO  # 8.0 bits/index at 64-of-4096; "fixed" = 12

    def __post_init__(self) -> None:
        for key in ("chunk_rows", "chunk_cols", "chunk_1d", "topk_per_chunk", "value_bits"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        for key, size in (("chunk_rows*chunk_cols", self.block_values), ("chunk_1d", self.chunk_1d)):
            if not MIN_CHUNK_VALUES <= size <= MAX_CHUNK_VALUES:
                raise ValueError(f"{key} = {size} outside [{MIN_CHUNK_VALUES}, {MAX_CHUNK_VALUES}]")
        if self.topk_per_chunk > self.block_values:
            raise ValueError(f"topk_per_chunk {self.topk_per_chunk} exceeds the block size {self.block_values}")
        if not (isinstance(self.error_decay, (int, float)) and 0.0 <= self.error_decay <= 1.0):
            raise ValueError(f"error_decay must be in [0, 1], got {self.error_decay!r}")
        if self.value_bits not in VALUE_BITS_CHOICES:
            raise ValueError(f"value_bits must be one of {VALUE_BITS_CHOICES}, got {self.value_bits}")
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"index_coding must be one of {INDEX_CODINGS}, got {self.index_coding!r}")

    @property
    def block_values(self) -> int:
        return self.chunk_rows * self.chunk_cols

    @property
    def density(self) -> float:
        return self.topk_per_chunk / self.block_values

    def wire_params(self) -> dict[str, ParamValue]:
        """What a receiver needs to decode (error_decay is the sender's business)."""
        params = asdict(self)
        return {key: params[key] for key in _WIRE_KEYS}

    @classmethod
    def from_wire_params(cls, params: Mapping[str, object]) -> SparseLoCoConfig:
        """Build from a header's params map; raises ValueError on missing/extra/bad keys."""
        if not isinstance(params, Mapping) or set(params) != set(_WIRE_KEYS):
            raise ValueError(f"sparseloco params must have exactly the keys {_WIRE_KEYS}")
        return cls(**{key: params[key] for key in _WIRE_KEYS})  # type: ignore[arg-type]

    def layout(self, shape: tuple[int, ...]) -> ChunkLayout:
        return ChunkLayout.for_shape(shape, self.chunk_rows, self.chunk_cols, self.chunk_1d)


def sparse_section_nbytes(shape: tuple[int, ...], config: SparseLoCoConfig) -> list[int]:
    """Exact byte length of each section of a tensor of `shape` (closed form, no data)."""
    groups = config.layout(shape).size_groups()
    counts = np.array([c for c, _ in groups], dtype=np.int64)
    sizes = np.array([n for _, n in groups], dtype=np.int64)
    ks = chunk_topk(sizes, config.topk_per_chunk, config.block_values)
    selected = int((counts * ks).sum())
    index = section_nbytes(sizes, ks, counts, config.index_coding)
    return [table_nbytes(config.value_bits), codes_nbytes(selected, config.value_bits), *index]


def _select(a: torch.Tensor, layout: ChunkLayout, ks: np.ndarray) -> np.ndarray:
    """Padded block positions of the top-|a| values, ascending within each chunk, (sum(ks),).

    Raises ValueError if `a` holds NaN or inf: topk ranks NaN and inf above every number,
    so any non-finite value is among the picks of its chunk (tested), and checking the picks
    saves a full pass over the tensor.
    """
    magnitude = layout.magnitudes(a)  # (chunks, capacity)
    k_max = int(ks.max())
    uniform = ks.min() == k_max
    top, pos = torch.topk(magnitude, k_max, dim=1, sorted=not uniform)  # (chunks, k_max)
    if not torch.isfinite(top).all():
        raise ValueError("cannot compress a tensor with NaN or inf")
    if uniform:
        return pos.sort(dim=1).values.numpy().reshape(-1)
    keep = torch.arange(k_max) < torch.from_numpy(ks)[:, None]  # edge chunks keep fewer
    pos = torch.where(keep, pos, layout.capacity).sort(dim=1).values
    return pos[keep].numpy()


def encode_selected(a: torch.Tensor, config: SparseLoCoConfig) -> tuple[EncodedTensor, np.ndarray, np.ndarray]:
    """Top-k + quantise fp32 CPU `a`: (encoding, flat positions (N,), decoded values (N,)).

    Delta_hat is zero except `values` at `positions`, exactly what receivers decode.
    """
    shape = tuple(a.shape)
    layout = config.layout(shape)
    sizes = layout.sizes()
    ks = chunk_topk(sizes, config.topk_per_chunk, config.block_values)
    chunk_of = np.repeat(np.arange(sizes.size), ks)  # (N,)
    compact = layout.padded_to_compact(chunk_of, _select(a, layout, ks)) if sizes.size else chunk_of
    flat = layout.flat_positions(chunk_of, compact)  # (N,)
    codes, table = quantize(a.numpy().reshape(-1)[flat], config.value_bits)
    if np.abs(table).max() > MAX_ABS_VALUE:
        raise ValueError(f"pseudo-gradient value {np.abs(table).max():.3g} exceeds {MAX_ABS_VALUE:g}")
    sections = (
        table_to_bytes(table),
        pack_codes(codes, config.value_bits),
        *encode_indices(compact, sizes, ks, config.index_coding),
    )
    encoded = EncodedTensor(SPARSELOCO, shape, sections, config.wire_params())
    return encoded, flat, table[codes]


def encode_sparse(a: torch.Tensor, config: SparseLoCoConfig) -> tuple[EncodedTensor, torch.Tensor]:
    """Top-k + quantise `a` (no error feedback); returns the encoding and dense Delta_hat."""
    a = a.detach().to("cpu", torch.float32).contiguous()
    encoded, flat, values = encode_selected(a, config)
    delta_hat = torch.zeros(a.numel(), dtype=torch.float32)
    delta_hat.numpy()[flat] = values
    return encoded, delta_hat.reshape(a.shape)


def decode_sparse(
    shape: tuple[int, ...],
    sections: tuple[bytes | memoryview, ...],
    config: SparseLoCoConfig,
    max_abs: float = MAX_ABS_VALUE,
) -> torch.Tensor:
    """Dense fp32 Delta_hat from sections; raises PayloadError on any malformed input."""
    expected = sparse_section_nbytes(shape, config)
    lengths = [len(s) for s in sections]
    if lengths != expected:
        raise PayloadError(f"sparseloco section lengths {lengths}, expected {expected}")
    layout = config.layout(shape)
    table = table_from_bytes(sections[0], config.value_bits, max_abs)
    sizes = layout.sizes()
    ks = chunk_topk(sizes, config.topk_per_chunk, config.block_values)
    chunk_of, idx = decode_indices(list(sections[2:]), sizes, ks, config.index_coding)
    codes = unpack_codes(sections[1], idx.size, config.value_bits)
    out = torch.zeros(numel_of(shape), dtype=torch.float32)
    out.numpy()[layout.flat_positions(chunk_of, idx)] = table[codes]
    return out.reshape(shape)


def decode_encoded(encoded: EncodedTensor, max_abs: float = MAX_ABS_VALUE) -> torch.Tensor:
    """Stateless receiver-side decode of one sparseloco EncodedTensor."""
    try:
        config = SparseLoCoConfig.from_wire_params(encoded.params)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"bad sparseloco params: {exc}") from None
    return decode_sparse(encoded.shape, encoded.sections, config, max_abs)


class SparseLoCoCompressor:
    """Holds one error-feedback buffer per parameter name and compresses pseudo-gradients.

    Buffers are fp32 on CPU, created as zeros on a name's first `compress`; they are the
    only state, exposed as plain tensors for checkpointing.
    """

    def __init__(self, config: SparseLoCoConfig) -> None:
        self.config = config
        self._errors: dict[str, torch.Tensor] = {}

    def compress(self, name: str, delta: torch.Tensor) -> EncodedTensor:
        """Encode a = beta * e + delta for `name`; e becomes a - Delta_hat.

        a is computed as torch.add(delta, e, alpha=beta) into a fresh tensor, so a failure
        (non-finite or absurd input -> ValueError) leaves the old buffer untouched.
        """
        delta = delta.detach().to("cpu", torch.float32).contiguous()
        error = self._errors.get(name)
        if error is None:
            a = delta.clone()
        elif error.shape != delta.shape:
            raise ValueError(f"{name!r}: shape {tuple(delta.shape)} differs from its error buffer {tuple(error.shape)}")
        else:
            a = torch.add(delta, error, alpha=self.config.error_decay)
        try:
            encoded, flat, values = encode_selected(a, self.config)
        except ValueError as exc:
            raise ValueError(f"pseudo-gradient of {name!r}: {exc}") from None
        # a - Delta_hat, touching only the sent positions (unique): elsewhere Delta_hat
        # is 0 and a - 0 == a exactly.
        a_flat = a.numpy().reshape(-1)
        a_flat[flat] = a_flat[flat] - values
        self._errors[name] = a
        return encoded

    def compress_all(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        return {name: self.compress(name, delta) for name, delta in deltas.items()}

    @staticmethod
    def decode(encoded: EncodedTensor) -> torch.Tensor:
        return decode_encoded(encoded)

    def error_buffer(self, name: str) -> torch.Tensor | None:
        return self._errors.get(name)

    def names(self) -> Iterator[str]:
        return iter(self._errors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: error.clone() for name, error in self._errors.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace all buffers; they must be finite (a NaN here would poison every round)."""
        errors = {}
        for name, tensor in state.items():
            tensor = tensor.detach().to("cpu", torch.float32).clone()
            if not torch.isfinite(tensor).all():
                raise ValueError(f"error buffer {name!r} holds NaN or inf")
            errors[name] = tensor
        self._errors = errors
