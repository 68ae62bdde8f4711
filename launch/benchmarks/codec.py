"""Codec throughput: MB/s of fp32 pseudo-gradient encoded (top-k, 2-bit, error feedback, framing)
and decoded (full validation), and the bits per parameter on the wire, medians over repeats."""

from __future__ import annotations

import argparse

from swarm.codec.bench import codec_throughput

HELP = "SparseLoCo codec MB/s (encode, decode) and bits per parameter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=int, default=10_000_000, help="pseudo-gradient size (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)


def run(args: argparse.Namespace) -> int:
    print(f"{'threads':>7} {'encode MB/s':>12} {'decode MB/s':>12} {'bit/param':>10} {'vs fp32':>8}")
    for threads in (1, None):
        r = codec_throughput(num_params=args.params, repeats=args.repeats, num_threads=threads)
        label = str(threads) if threads else "default"
        print(
            f"{label:>7} {r['encode_mb_s']:>12.0f} {r['decode_mb_s']:>12.0f} "
            f"{r['bits_per_param']:>10.4f} {r['ratio_vs_fp32']:>7.1f}x",
            flush=True,
        )
    return 0
