"""Poisoned updates (sign flip x-1000, noise x1000, zeros) from one hostile volunteer among three
honest ones, end to end on 127.0.0.1: judged by the figure that matters, the eval loss after a fixed
number of rounds stays within 5% of the same run without the attacker, and honest replicas stay
bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from tests.adversary.common import HOSTILE, rows

pytestmark = pytest.mark.slow
ROUNDS = 6


def final_loss(tmp: Path, attack: str | None) -> float:
    """Coordinator's eval loss after ROUNDS rounds of 3 honest peers (+ one attacker)."""
    # Robust aggregation needs three honest contributions in a round to outvote one attacker: every
    # round waits for 4 (or its timeout), as a run open to strangers should (docs/security.md).
    run = nano_run(num_shards=4, round_timeout_s=15.0, min_peers=4)
    with LocalCluster(tmp, run, coordinator_args=("--stop-after", str(ROUNDS))) as cluster:
        for i in range(3):
            cluster.add_peer(f"honest{i}", max_rounds=ROUNDS)
        if attack is not None:
            cluster.add_peer("attacker", max_rounds=ROUNDS, program=(*HOSTILE, attack))
        final = wait_for(lambda: [r for r in rows(cluster) if r.get("final")], 400, "the final evaluation", cluster)
        honest = {n for n in cluster.peer_names.values() if n.startswith("honest")}
        for r, by_peer in cluster.metrics_by_round().items():
            hashes = {row["hash"] for row in by_peer if cluster.peer_names.get(row["peer"]) in honest}
            assert len(hashes) <= 1, f"honest replicas differ after round {r}"
        return final[-1]["eval_loss"]


@pytest.mark.timeout(1200)  # two whole runs of 4 peers; on a loaded 2-core CI box 600 s was not always enough
def test_poisoned_updates_move_the_loss_by_less_than_5_percent(tmp_path):
    clean = final_loss(tmp_path / "clean", None)
    for attack in ("sign-flip", "noise", "zero"):
        attacked = final_loss(tmp_path / attack, attack)
        assert attacked <= clean * 1.05, f"{attack}: eval loss {attacked:.4f} vs {clean:.4f} without the attacker"
