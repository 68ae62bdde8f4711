"""swarm-bench gpu: what a volunteer's accelerator does with the peer, against the best trainers.

Two tables, for each preset (default `small` and `1b`, bf16 autocast on CUDA):

* The solo trainer: tokens/s, model FLOP utilisation (MFU: the model's FLOPs per token, from its
  config, times tokens/s over the device's peak bf16 FLOP/s, from its name or `--peak-tflops`) and
  peak device memory. The anchors: torchtitan publishes 40-50% MFU for Llama-class models on H100,
  INTELLECT-1 36-41% per node.
* A SparseLoCo peer's round, phase by phase, in this process with the peer's own pieces (`Replica`,
  `PayloadEncoder`, `PayloadStore`, the mode's outer step, `next_base`): the H inner steps, and each
  step between two rounds' inner steps: θ copied to the device, the pseudo-gradient back to the
  CPU, encoding, decoding and applying the round's R payloads, the agreed state's hash, and the
  overlap's next base. Each is printed in seconds and as a share of the round. In step, everything
  between two rounds' inner steps waits for the device; overlapped (the default), decoding,
  applying and hashing the round run beside the next round's inner steps, and only the rest sits
  between them. Only the network is left out: its bytes move while the device trains (the peer's
  transfers run on the event loop, off the training thread).

On a CPU-only machine the same code runs in fp32 (MFU only with `--peak-tflops`): CI runs it on
`nano` for seconds. The figures issue 25 asks for need an NVIDIA H100 or H200: `launch/gpu_check.sh`
runs this benchmark and the CUDA tests as one script.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from launch.presets import human_count
from models import ModelConfig, count_active_parameters, count_parameters, get_preset
from swarm.codec import SlotMean
from swarm.data import DataConfig
from swarm.modes import default_outer, mode_for
from swarm.modes.replica import Replica, initial_state
from swarm.net.transfer import Traffic
from swarm.round.overlap import next_base
from swarm.round.payloads import PayloadEncoder, PayloadStore
from swarm.run import RunConfig
from swarm.state import GlobalState
from swarm.train.solo import TrainConfig, run_solo
from swarm.train.step import resolve_device

HELP = "a peer on one accelerator: solo tokens/s, MFU and memory, and a SparseLoCo round's phases (issue 25)"

# Peak dense bf16 tensor-core FLOP/s (without sparsity) by a substring of the CUDA device name,
# from the vendors' data sheets. The first match wins: more specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)

DEFAULT_PRESETS = ("small", "1b")
PHASES = ("inner", "to_device", "pseudo_gradient", "encode", "apply", "hash", "next_base")
# What stays between two rounds' inner steps when rounds overlap: the next base (θ(r) advanced by
# our own payload) must be on the device before the next inner steps start, and the pseudo-gradient
# and payload before it; decoding and applying the round's payloads and hashing θ(r+1) run beside them.
BETWEEN_OVERLAPPED = ("to_device", "pseudo_gradient", "encode", "next_base")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's peak dense bf16 TFLOP/s: `override`, else from the CUDA device's name, else None."""
    if override is not None:
        return override
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for_name(name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a CUDA device by its name; None for a card not in the table."""
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight a token passes through in a matmul (forward and
    backward; the input embedding is a lookup, not a matmul) plus attention's scores and weighted
    sum, 12 · layers · width · context (the PaLM paper's count; a causal mask halves the useful part
    of it, which this count, like most MFU figures, does not take off)."""
    matmul_weights = count_active_parameters(cfg) - cfg.vocab_size * cfg.d_model
    return 6.0 * matmul_weights + 12.0 * cfg.n_layers * cfg.d_model * seq_len


@dataclass
class SoloRow:
    preset: str
    params: int
    batch: int
    seq_len: int
    tokens_per_s: float
    mfu: float | None
    peak_memory_gb: float | None


@dataclass
class PeerRow:
    preset: str
    inner_steps: int
    payloads: int
    seconds: dict[str, float]  # median per phase over the timed rounds

    @property
    def in_step_between(self) -> float:
        return sum(v for k, v in self.seconds.items() if k not in ("inner", "next_base"))

    @property
    def overlapped_between(self) -> float:
        return sum(self.seconds[k] for k in BETWEEN_OVERLAPPED)

    def share_in_inner(self, between: float) -> float:
        return self.seconds["inner"] / (self.seconds["inner"] + between)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="solo steps per preset, 3 of them warm-up (default %(default)s)")
    parser.add_argument("--inner-steps", type=int, default=30, help="H of the peer's rounds (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="peer rounds, the first a warm-up (default %(default)s)")
    parser.add_argument("--payloads", type=int, default=4, help="payloads a round applies, R (default %(default)s)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s (default: from its name)")
    parser.add_argument("--data", default="stdlib", help="text for the runs (default %(default)s)")
    parser.add_argument("--skip-solo", action="store_true", help="only the peer's phases")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


T = TypeVar("T")


def _timed(device: torch.device, fn: Callable[[], T]) -> tuple[float, T]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def measure_solo(preset: str, device: torch.device, args: argparse.Namespace, peak: float | None) -> SoloRow:
    cfg = get_preset(preset)
    seq_len = min(args.seq_len, cfg.max_seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = TrainConfig(
        preset=preset,
        data=DataConfig(source=args.data),
        batch_size=args.batch_size,
        seq_len=seq_len,
        steps=max(args.steps, 4),
        eval_every=0,
        eval_batches=1,
        out_dir=None,
        device=str(device),
    )
    tokens_per_s = run_solo(train).tokens_per_s_median
    mfu = tokens_per_s * flops_per_token(cfg, seq_len) / (peak * 1e12) if peak else None
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return SoloRow(preset, count_parameters(cfg), args.batch_size, seq_len, tokens_per_s, mfu, memory)


def peer_run(preset: str, args: argparse.Namespace) -> RunConfig:
    cfg = get_preset(preset)
    return RunConfig(
        run_id="gpu-bench",
        preset=preset,
        data_source=args.data,
        batch_size=args.batch_size,
        seq_len=min(args.seq_len, cfg.max_seq_len),
        inner_steps=args.inner_steps,
        warmup_steps=args.inner_steps,
        eval_batches=1,
        mode="sparseloco",
        outer=default_outer("sparseloco"),
    )


def measure_peer(preset: str, device: torch.device, args: argparse.Namespace) -> PeerRow:
    """A SparseLoCo peer's rounds in this process: each phase timed on its own (device synchronised
    around it). The other R − 1 payloads of a round are encoded from our pseudo-gradient under
    other senders' names: their content does not change what decoding and applying them costs."""
    run = peer_run(preset, args)
    mode = mode_for(run)
    replica = Replica(run, shard=0, device=device)
    names = replica.trained_names()
    encoders = [PayloadEncoder(run, f"peer-{i}") for i in range(args.payloads)]
    shapes = {n: tuple(p.shape) for n, p in sorted(replica.model.named_parameters())}
    store = PayloadStore(run, shapes, Traffic())
    state = initial_state(run)

    def one_round(r: int) -> dict[str, float]:
        seconds: dict[str, float] = {}
        seconds["to_device"], _ = _timed(device, lambda: state.load_into(replica.model))
        replica.trainer.step = run.steps_before(r)

        def inner() -> None:
            for _ in range(run.inner_steps_at(r)):
                replica.trainer.train_step(*next(replica.stream))

        seconds["inner"], _ = _timed(device, inner)
        seconds["pseudo_gradient"], delta = _timed(device, lambda: state.pseudo_gradient(replica.model, names))
        seconds["encode"], ours = _timed(device, lambda: encoders[0].encode(delta, r))
        payloads = [(encoders[0].sender, ours.data), *((enc.sender, enc.encode(delta, r).data) for enc in encoders[1:])]

        def overlap_base() -> GlobalState:  # a copy of θ(r) advanced by our own payload
            return next_base(state, store.decode(ours.data, sender=encoders[0].sender, round_no=r), mode)

        seconds["next_base"], _ = _timed(device, overlap_base)

        def apply() -> None:
            acc = SlotMean(shapes)
            for sender, data in payloads:
                acc.add(store.decode(data, sender=sender, round_no=r))
            mode.outer_step(state, acc.mean())

        seconds["apply"], _ = _timed(device, apply)
        seconds["hash"], _ = _timed(device, lambda: state.hash)
        return seconds

    rows = [one_round(r) for r in range(max(args.rounds, 2))]
    timed = rows[1:]  # the first round warms up the device, the allocator and the codec
    return PeerRow(preset, args.inner_steps, args.payloads, {k: statistics.median(s[k] for s in timed) for k in PHASES})


def format_solo(rows: list[SoloRow], device: str, peak: float | None) -> str:
    where = f"{device}, peak bf16 {peak:g} TFLOP/s" if peak else f"{device}, peak FLOP/s unknown (--peak-tflops)"
    lines = [f"solo trainer on {where}", f"{'preset':<8}{'params':>9}{'batch':>12}{'tokens/s':>12}{'MFU':>8}{'peak mem':>10}"]
    for row in rows:
        mfu = f"{100 * row.mfu:.1f}%" if row.mfu is not None else "-"
        memory = f"{row.peak_memory_gb:.1f} GB" if row.peak_memory_gb is not None else "-"
        batch = f"{row.batch} x {row.seq_len}"
        lines.append(f"{row.preset:<8}{human_count(row.params):>9}{batch:>12}{row.tokens_per_s:>12,.0f}{mfu:>8}{memory:>10}")
    return "\n".join(lines)


def format_peer(rows: list[PeerRow]) -> str:
    lines = ["", "a SparseLoCo peer's round, phase by phase (median seconds; share of the in-step round)"]
    lines.append(f"{'preset':<8}{'H':>4}{'R':>4}" + "".join(f"{p:>17}" for p in PHASES))
    for row in rows:
        total = row.seconds["inner"] + row.in_step_between
        cells = "".join(f"{row.seconds[p]:>9.3f} ({100 * row.seconds[p] / total:4.1f}%)" for p in PHASES)
        lines.append(f"{row.preset:<8}{row.inner_steps:>4}{row.payloads:>4}{cells}")
    lines.append("")
    lines.append(f"{'preset':<8}{'inner / wall, in step':>24}{'overlapped':>12}{'between, overlapped':>22}")
    for row in rows:
        between = row.overlapped_between
        lines.append(
            f"{row.preset:<8}{100 * row.share_in_inner(row.in_step_between):>23.1f}%"
            f"{100 * row.share_in_inner(between):>11.1f}%{100 * between / (row.seconds['inner'] + between):>21.1f}%"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for preset in presets:
        get_preset(preset)  # an unknown name fails before anything runs
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"swarm-bench gpu on {name}, torch {torch.__version__}", flush=True)
    if not args.skip_solo:
        print(format_solo([measure_solo(p, device, args, peak) for p in presets], str(device), peak), flush=True)
    print(format_peer([measure_peer(p, device, args) for p in presets]), flush=True)
    return 0
