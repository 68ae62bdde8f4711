"""Pseudo-gradient codecs and the payload wire format (pure CPU code; no networking).

Modules: chunking (block tiling for top-k), quant (low-bit values), indexcode (positions),
bitpack (bit streams), sparseloco (compressor with error feedback), dense (fp32/fp16
baseline), header + payload (the versioned wire format), aggregate (the 1/R mean),
bench (throughput). The byte layout is documented in docs/wire-format.md.
"""

from swarm.codec.aggregate import SlotMean, SlotTrimmedMean, mean_of_payloads, slot_aggregator
from swarm.codec.base import (
    CODEC_KINDS,
    DENSE_FP16,
    DENSE_FP32,
    MAX_ABS_VALUE,
    SPARSELOCO,
    EncodedTensor,
    PayloadError,
)
from swarm.codec.dense import encode_dense
from swarm.codec.header import FORMAT_VERSION, PayloadMeta
from swarm.codec.payload import (
    decode_part,
    decode_payload,
    decode_tensor,
    encode_payload,
    inline_digest,
    matches_digest,
    part_digest,
    payload_digest,
    payload_part,
    payload_size,
    tensor_hashes,
)
from swarm.codec.sparseloco import SparseLoCoCompressor, SparseLoCoConfig, decode_sparse, encode_sparse

__all__ = [
    "CODEC_KINDS",
    "DENSE_FP16",
    "DENSE_FP32",
    "FORMAT_VERSION",
    "MAX_ABS_VALUE",
    "SPARSELOCO",
    "EncodedTensor",
    "PayloadError",
    "PayloadMeta",
    "SlotMean",
    "SlotTrimmedMean",
    "SparseLoCoCompressor",
    "SparseLoCoConfig",
    "decode_part",
    "decode_payload",
    "decode_sparse",
    "decode_tensor",
    "encode_dense",
    "encode_payload",
    "encode_sparse",
    "inline_digest",
    "matches_digest",
    "mean_of_payloads",
    "part_digest",
    "payload_digest",
    "payload_part",
    "payload_size",
    "slot_aggregator",
    "tensor_hashes",
]
