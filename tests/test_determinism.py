"""The outer step gives the same bits whatever the CPU's vector unit and the thread count.

Each case runs in a child process so that torch's kernel choice (ATEN_CPU_CAPABILITY=default: the
portable scalar-style kernels a CPU without AVX2/FMA would use) and its thread count are fixed
before torch starts. Inputs come from numpy's generator, not torch's, whose normal sampler is
itself vectorised and would hand each kernel set different numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cluster import LocalCluster, nano_run, wait_for
from swarm.net.schema import to_plain
from swarm.run import OuterConfig
from swarm.state import GlobalState

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"a.weight": (257, 131), "b.bias": (70_001,), "c.weight": (3, 5)}  # odd sizes: vector tails everywhere
OUTERS = {
    "sparseloco": OuterConfig(codec="sparseloco", outer_lr=0.7),
    "diloco": OuterConfig(codec="dense-fp32", outer_lr=0.7, momentum=0.9, nesterov=True),
}
ROUNDS = 3

CHILD = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from tests.test_determinism import outer_hashes
torch.set_num_threads({threads})
print(json.dumps(outer_hashes()))
"""


def inputs(round_no: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """θ(0) and round r's mean pseudo-gradient, as float32 numpy arrays."""
    rng = np.random.default_rng(1000 + round_no)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in sorted(SHAPES.items())}
    delta = {n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in sorted(SHAPES.items())}
    return params, delta


def outer_hashes() -> dict[str, str]:
    """State hash after ROUNDS outer steps, per outer configuration (run in the child processes)."""
    result = {}
    for label, outer in OUTERS.items():
        params, _ = inputs(0)
        state = GlobalState(round=0, params={n: torch.from_numpy(a.copy()) for n, a in params.items()})
        for r in range(ROUNDS):
            _, delta = inputs(r)
            state.apply_outer_step({n: torch.from_numpy(d) for n, d in delta.items()}, outer)
        result[label] = state.hash
    return result


def run_child(threads: int, capability: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = CHILD.format(repo=str(REPO), threads=threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_sparseloco_hash() -> str:
    """θ ← θ − α·Δ with numpy: one float32 rounding for the product, one for the difference."""
    params, _ = inputs(0)
    alpha = np.float32(OUTERS["sparseloco"].outer_lr)
    for r in range(ROUNDS):
        _, delta = inputs(r)
        params = {n: (p - alpha * delta[n]).astype(np.float32) for n, p in params.items()}
    return GlobalState(round=ROUNDS, params={n: torch.from_numpy(a) for n, a in params.items()}).hash


def test_outer_step_matches_plain_float32_arithmetic() -> None:
    """What every CPU computes when each operation rounds once: a fused multiply-add would not."""
    assert outer_hashes()["sparseloco"] == reference_sparseloco_hash()


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="needs an x86 vector unit")
def test_outer_step_bits_across_kernels_and_threads() -> None:
    """Portable kernels on one thread, this CPU's vector kernels on one and on three threads."""
    runs = {
        "default x1": run_child(1, "default"),
        "native x1": run_child(1, None),
        "native x3": run_child(3, None),
    }
    assert len({json.dumps(r, sort_keys=True) for r in runs.values()}) == 1, runs
    assert runs["native x1"]["sparseloco"] == reference_sparseloco_hash()


def rounds_with_both(cluster: LocalCluster) -> list[int]:
    return [r for r, rows in cluster.metrics_by_round().items() if len(rows) == 2 and all(row["applied"] == 2 for row in rows)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="needs an x86 vector unit")
def test_swarm_agrees_across_threads_and_kernels(tmp_path: Path) -> None:
    """Two peers, one on one thread with this CPU's vector kernels, one on two threads with the
    portable kernels, α = 0.7, overlapped rounds: after every round all hold the same state hash."""
    run = nano_run(round_timeout_s=120.0, min_peers=2, outer=to_plain(OuterConfig(outer_lr=0.7)))
    with LocalCluster(tmp_path, run) as cluster:
        cluster.add_peer("native-1", threads=1)
        cluster.add_peer("portable-2", threads=2, prefix=("env", "ATEN_CPU_CAPABILITY=default"))
        wait_for(lambda: len(rounds_with_both(cluster)) >= 2, 300, "2 rounds with both payloads applied", cluster)
        by_round = cluster.metrics_by_round()
    for r, rows in by_round.items():  # after the first joint round the rounds trained from delayed bases
        assert len({row["hash"] for row in rows}) == 1, f"replicas differ after round {r}: {rows}"
