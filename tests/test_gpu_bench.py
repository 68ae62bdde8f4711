"""swarm-bench gpu (issue 25) on the CPU: the arithmetic behind MFU, and the phases of a peer's round."""

from __future__ import annotations

import argparse

import pytest

from launch.benchmarks import gpu
from models import count_active_parameters, get_preset


def test_flops_per_token_counts_every_matmul_weight_six_times_and_attention() -> None:
    cfg = get_preset("1b")
    per_token = gpu.flops_per_token(cfg, 2048)
    weights = count_active_parameters(cfg) - cfg.vocab_size * cfg.d_model  # the input embedding is a lookup
    assert per_token == 6 * weights + 12 * cfg.n_layers * cfg.d_model * 2048
    assert 6.5e9 < per_token < 7.5e9  # about 1.0B weights: 6.1 GFLOP, plus 1.0 GFLOP of attention at 2,048 tokens


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Tesla T4", None),
    ],
)
def test_the_peak_comes_from_the_devices_name(name: str, peak: float | None) -> None:
    assert gpu.peak_for_name(name) == peak


def test_the_benchmark_prints_solo_mfu_and_each_phase_of_a_round(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(
        "--presets nano --device cpu --batch-size 2 --seq-len 32 --steps 4 --inner-steps 2 --rounds 2 --payloads 2 --peak-tflops 1".split()
    )
    assert gpu.run(args) == 0
    out = capsys.readouterr().out
    solo = next(line for line in out.splitlines() if line.startswith("nano") and "x 32" in line)
    assert solo.split()[-2].endswith("%")  # MFU against the given peak
    phases = next(line for line in out.splitlines() if line.startswith("nano") and "(" in line and "x 32" not in line)
    shares = [float(cell.split("%")[0]) for cell in phases.split("(")[1:]]
    assert len(shares) == len(gpu.PHASES) and abs(sum(shares[:-1]) - 100) < 0.5  # next_base is outside the in-step round
    summary = out.splitlines()[-1].split()
    in_step, overlapped = float(summary[1].rstrip("%")), float(summary[2].rstrip("%"))
    assert 0 < in_step <= overlapped < 100
