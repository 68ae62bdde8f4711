"""Types shared by every codec: the encoded tensor, the one error type for bad bytes, limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Codec kinds as they appear on the wire (header key "codec").
SPARSELOCO = "sparseloco"
DENSE_FP32 = "dense-fp32"
DENSE_FP16 = "dense-fp16"
CODEC_KINDS = (SPARSELOCO, DENSE_FP32, DENSE_FP16)

# A pseudo-gradient entry this large means a diverged or hostile peer: real ones are
# differences of weights after H inner steps, orders of magnitude below this.
MAX_ABS_VALUE = 1e4

ParamValue = int | str


class PayloadError(ValueError):
    """Bytes from the network that do not form a valid payload; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor after encoding: the raw sections that go on the wire, in codec order.

    `params` are the codec parameters a receiver needs to decode (the same for every
    tensor of a payload, so the payload header carries them once).
    """

    codec: str
    shape: tuple[int, ...]
    sections: tuple[bytes, ...]
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codec not in CODEC_KINDS:
            raise ValueError(f"unknown codec {self.codec!r}; expected one of {CODEC_KINDS}")
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"shape must be non-negative ints, got {self.shape}")

    @property
    def nbytes(self) -> int:
        """Bytes of raw section data (the payload header is extra)."""
        return sum(len(s) for s in self.sections)


def numel_of(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape, in exact Python integers (no overflow)."""
    n = 1
    for d in shape:
        n *= d
    return n
