"""Solo-trainer baseline: training throughput per preset, and the eval loss nano reaches on a
fixed token budget. Swarm benchmarks compare against these figures on the same machine."""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from launch.presets import human_count
from models import count_active_parameters, count_parameters, get_preset
from swarm.data import DataConfig
from swarm.train.solo import TrainConfig, default_optim, run_solo
from swarm.train.step import resolve_device

HELP = "solo trainer tokens/s for nano, tiny, moe-nano and nano's eval loss after a token budget"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
SPEED_PRESETS = ("nano", "tiny", "moe-nano")
BATCH_SIZE, SEQ_LEN = 16, 128  # TrainConfig's defaults, tuned for nano on CPU
# ~2-2.5 minutes of nano on 2 CPU cores at ~15k tokens/s (977 steps of 16 x 128 bytes).
DEFAULT_TOKENS = 2_000_000


@dataclass
class SpeedRow:
    preset: str
    params: int
    active_params: int
    tokens_per_s: float


@dataclass
class LossRow:
    preset: str
    data: str
    tokens: int
    steps: int
    lr: float
    eval_loss: float
    train_loss: float
    elapsed_s: float
    tokens_per_s: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help=f"text for the runs (default {default_data})")
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help="token budget of the nano loss run (default %(default)s)",
    )
    parser.add_argument(
        "--speed-steps",
        type=int,
        default=8,
        help="steps per throughput run, 3 of them warm-up (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")


def measure_speed(preset: str, data: DataConfig, device: str, steps: int) -> SpeedRow:
    cfg = TrainConfig(
        preset=preset,
        data=data,
        batch_size=BATCH_SIZE,
        seq_len=SEQ_LEN,
        steps=steps,
        eval_every=0,
        eval_batches=1,
        out_dir=None,
        device=device,
    )
    result = run_solo(cfg)
    model_cfg = get_preset(preset)
    return SpeedRow(preset, count_parameters(model_cfg), count_active_parameters(model_cfg), result.tokens_per_s_median)


def measure_loss(data: DataConfig, device: str, tokens: int) -> LossRow:
    steps = max(tokens // (BATCH_SIZE * SEQ_LEN), 1)
    optim = default_optim(get_preset("nano"), steps)
    cfg = TrainConfig(
        preset="nano",
        data=data,
        batch_size=BATCH_SIZE,
        seq_len=SEQ_LEN,
        steps=steps,
        optim=optim,
        eval_every=0,
        eval_batches=32,
        out_dir=None,
        device=device,
    )
    result = run_solo(cfg)
    assert result.final_eval_loss is not None
    return LossRow(
        "nano",
        data.source,
        steps * BATCH_SIZE * SEQ_LEN,
        steps,
        optim.lr,
        result.final_eval_loss,
        result.final_train_loss,
        result.elapsed_s,
        result.tokens_per_s_median,
    )


def format_report(device: str, speed: list[SpeedRow], loss: LossRow) -> str:
    lines = [
        f"solo trainer on {device} ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"batch {BATCH_SIZE} x {SEQ_LEN} bytes",
        f"{'preset':<10}{'params':>10}{'active':>10}{'tokens/s':>12}",
    ]
    for row in speed:
        lines.append(
            f"{row.preset:<10}{human_count(row.params):>10}{human_count(row.active_params):>10}{row.tokens_per_s:>12,.0f}"
        )
    lines.append(
        f"{loss.preset} on {Path(loss.data).name}: {loss.tokens:,} tokens ({loss.steps} steps, lr {loss.lr:g}) -> "
        f"eval {loss.eval_loss:.4f} nats/byte ({loss.eval_loss / math.log(2):.3f} bits/byte), "
        f"train {loss.train_loss:.4f}, {loss.elapsed_s:.0f} s at {loss.tokens_per_s:,.0f} tokens/s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    data = DataConfig(source=args.data)
    speed = [measure_speed(p, data, device, max(args.speed_steps, 4)) for p in SPEED_PRESETS]
    loss = measure_loss(data, device, args.tokens)
    print(format_report(device, speed, loss))
    if args.json:
        report = {"device": device, "speed": [asdict(r) for r in speed], "loss": asdict(loss)}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
