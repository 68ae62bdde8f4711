"""What the adversary tests share: how to start a hostile peer, the coordinator's round rows, and
the small real-training swarm the simulator runs attacks on."""

from __future__ import annotations

import json

from launch.cluster import DATA, LocalCluster
from swarm.sim.runner import SimConfig, Simulation

HOSTILE = ("-m", "tests.adversary.hostile")

# `nano` replicas training for real in the simulator, as small as still shows an attack's effect.
SMALL_TRAINING = {
    "model": "nano",
    "data": str(DATA) if DATA.exists() else "stdlib",
    "inner_steps": 3,
    "batch_size": 2,
    "seq_len": 32,
    "round_timeout_s": 15.0,
    "step_s": (0.5, 0.6),
}


def rows(cluster: LocalCluster) -> list[dict]:
    path = cluster.workdir / "coordinator" / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_attacked(base: dict, attackers: list[str]) -> Simulation:
    """The simulated swarm of `base` with these hostile peers beside its honest ones, every round
    waiting for all of them (or its timeout), as a run open to strangers should (docs/security.md)."""
    sim = Simulation(SimConfig(**base, attackers=attackers, min_peers=base["peers"] + len(attackers)))
    sim.loop.run_until_complete(sim.main())
    return sim
