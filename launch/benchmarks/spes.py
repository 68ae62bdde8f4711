"""SPES vs its baselines on the same MoE model, data and total tokens, in one run: (a) a 4-peer SPES
swarm (each peer trains the dense part and its quarter of the experts), (b) 4 full MoE replicas
under SparseLoCo, (c) the solo trainer at the same total batch, and (d) the SPES reference
protocol's traffic for run (a), computed from its rule: every sync, each peer uploads its trainable
weights in fp32 and downloads the whole model in fp32.

Printed: eval loss on the whole held-out split, bytes per round per peer (payload sent; all
transfer bytes sent + received), and gradient + AdamW memory per peer, with the ratios the issue
targets. Peers share this machine's cores, so wall times are not those of separate machines."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from launch.benchmarks.swarm import bench_run, run_solo_baseline, run_swarm
from models import build_model, get_preset
from models.moe import is_expert_parameter

HELP = "4-peer SPES vs 4 full MoE replicas vs solo vs the reference protocol's traffic"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help="corpus (default %(default)s)")
    parser.add_argument("--preset", default="moe-nano")
    parser.add_argument("--replicas", type=int, default=4, help="peers in each swarm (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=20, help="H (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="per peer (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner (and solo) peak lr")
    parser.add_argument("--workdir", default=None)


def model_split(preset: str) -> tuple[int, int, int]:
    """(dense parameters, parameters per expert index over all layers, number of experts)."""
    cfg = get_preset(preset)
    model = build_model(cfg)
    dense = sum(p.numel() for n, p in model.named_parameters() if is_expert_parameter(n) is None)
    experts = sum(p.numel() for n, p in model.named_parameters() if is_expert_parameter(n) is not None)
    return dense, experts // cfg.n_experts, cfg.n_experts


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-bench-spes-"))
    dense, per_expert, n_experts = model_split(args.preset)
    total = dense + per_expert * n_experts
    owned = -(-n_experts // args.replicas)  # experts each SPES peer owns (ceil)
    tokens = args.replicas * args.batch_size * args.seq_len * args.inner_steps * args.rounds
    print(
        f"{args.preset}: {total:,} params ({dense:,} dense, {n_experts} experts x {per_expert:,}); "
        f"{args.replicas} peers x H={args.inner_steps} x {args.rounds} rounds, {tokens:,} tokens each; logs in {workdir}",
        flush=True,
    )
    spes = run_swarm(workdir / "spes", bench_run(args, "spes"), args.replicas, args.rounds)
    full = run_swarm(workdir / "sparseloco", bench_run(args, "sparseloco"), args.replicas, args.rounds)
    solo = run_solo_baseline(args, args.preset)
    trainable = dense + owned * per_expert
    reference = 4 * trainable + 4 * total  # fp32 upload of trainable weights + fp32 download of the model
    _print(spes, full, solo, reference, trainable / total)
    return 0


def _print(spes: dict, full: dict, solo: dict, reference: int, memory_share: float) -> None:
    def f(x: float | None) -> str:
        return f"{x:.4f}" if x is not None else "-"

    print()
    print(f"{'':<34} {'SPES':>12} {'full MoE':>12} {'solo':>10} {'reference':>12}")
    print(
        f"{'eval loss (nats/byte)':<34} {f(spes['eval_loss']):>12} {f(full['eval_loss']):>12} {f(solo['eval_loss']):>10} {'-':>12}"
    )
    print(
        f"{'payload sent / round / peer':<34} {spes['payload_bytes']:>12,.0f} {full['payload_bytes']:>12,.0f} {'-':>10} {'-':>12}"
    )
    print(
        f"{'wire bytes / round / peer':<34} {spes['wire_bytes_per_round']:>12,.0f} "
        f"{full['wire_bytes_per_round']:>12,.0f} {'-':>10} {reference:>12,.0f}"
    )
    print(f"{'grad + AdamW bytes / peer':<34} {spes['memory_bytes']:>12,.0f} {full['memory_bytes']:>12,.0f} {'-':>10} {'-':>12}")
    print(f"{'replicas identical':<34} {spes['identical']!s:>12} {full['identical']!s:>12} {'-':>10} {'-':>12}")
    print(f"{'wall time (s)':<34} {spes['wall_s']:>12.0f} {full['wall_s']:>12.0f} {solo['wall_s']:>10.0f} {'-':>12}")
    print()
    print(f"traffic: reference / SPES = {reference / spes['wire_bytes_per_round']:.1f}x (target >= 10x)")
    if spes["eval_loss"] and full["eval_loss"]:
        print(f"eval loss: SPES / full MoE replicas = {spes['eval_loss'] / full['eval_loss']:.3f} (target <= 1.03)")
    measured = spes["memory_bytes"] / full["memory_bytes"]
    print(
        f"memory: SPES / full replica = {measured:.3f}, (dense + owned experts) / whole = {memory_share:.3f} (target: equal +-5%)"
    )
