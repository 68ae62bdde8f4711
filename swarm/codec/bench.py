"""Codec throughput and size on a synthetic GPT-like parameter set (CPU, single process)."""

from __future__ import annotations

import statistics
import time

import torch

from swarm.codec.header import PayloadMeta
from swarm.codec.payload import decode_payload, encode_payload
from swarm.codec.sparseloco import SparseLoCoCompressor, SparseLoCoConfig


def synthetic_shapes(num_params: int) -> dict[str, tuple[int, ...]]:
    """Embedding (vocab not a multiple of 64, to exercise edge chunks) plus transformer blocks
    of width 512 (256 below 2M params) until `num_params` is reached."""
    width = 512 if num_params >= 2_000_000 else 256
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (8 * width + 17, width)}
    total, layer = (8 * width + 17) * width, 0
    while total < num_params:
        block = {
            f"layers.{layer}.attn.qkv.weight": (3 * width, width),
            f"layers.{layer}.attn.proj.weight": (width, width),
            f"layers.{layer}.mlp.fc.weight": (4 * width, width),
            f"layers.{layer}.mlp.proj.weight": (width, 4 * width),
            f"layers.{layer}.norm1.weight": (width,),
            f"layers.{layer}.norm2.weight": (width,),
        }
        shapes.update(block)
        total += sum(torch.Size(s).numel() for s in block.values())
        layer += 1
    shapes["final_norm.weight"] = (width,)
    return shapes


def codec_throughput(
    num_params: int = 10_000_000,
    repeats: int = 5,
    config: SparseLoCoConfig | None = None,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Median MB/s (fp32 bytes of pseudo-gradient per second) to compress + frame a payload
    and to decode it, plus bits per parameter on the wire and the ratio vs dense fp32.

    `num_threads` sets torch's intra-op threads for the measurement only (restored after):
    on an oversubscribed CPU, 1 thread is several times faster than spinning OpenMP workers.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _measure(num_params, repeats, config or SparseLoCoConfig())
    finally:
        torch.set_num_threads(previous_threads)


def _measure(num_params: int, repeats: int, config: SparseLoCoConfig) -> dict[str, float]:
    shapes = synthetic_shapes(num_params)
    generator = torch.Generator().manual_seed(0)
    deltas = {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()}
    numel = sum(delta.numel() for delta in deltas.values())
    compressor = SparseLoCoCompressor(config)
    encode_s, decode_s, size = [], [], 0
    for round_index in range(repeats):
        meta = PayloadMeta.for_sparseloco(config, run_id="bench", round=round_index, sender="peer")
        start = time.perf_counter()
        payload = encode_payload(meta, compressor.compress_all(deltas))
        middle = time.perf_counter()
        decode_payload(payload, expected=shapes)
        encode_s.append(middle - start)
        decode_s.append(time.perf_counter() - middle)
        size = len(payload)
    dense_bytes = 4 * numel
    return {
        "num_params": float(numel),
        "payload_bytes": float(size),
        "encode_mb_s": dense_bytes / 1e6 / statistics.median(encode_s),
        "decode_mb_s": dense_bytes / 1e6 / statistics.median(decode_s),
        "bits_per_param": 8 * size / numel,
        "ratio_vs_fp32": dense_bytes / size,
    }
