"""SPSA end to end on 127.0.0.1: a coordinator and 3 peers fine-tune nano from a checkpoint with one
byte per estimate. Loss falls, replicas are bit-identical every round, a SIGKILLed peer does not
stall the run, and a late joiner that starts from the checkpoint replays every round and matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, wait_for
from models import build_model, get_preset
from swarm.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SAMPLES = 8
RUN = {
    "mode": "spsa",
    "preset": "nano",
    "mode_options": {"samples": SAMPLES, "lr": 3e-3},
    "data_source": str(SHAKESPEARE) if SHAKESPEARE.exists() else "stdlib",
    "data_max_bytes": 400_000,
    "batch_size": 2,
    "seq_len": 32,
    "round_timeout_s": 8.0,
    "heartbeat_interval_s": 1.0,
    "heartbeat_ttl_s": 5.0,
    "num_shards": 8,
    "eval_batches": 4,
}


def coordinator_rounds(cluster: LocalCluster) -> list[dict]:
    path = cluster.workdir / "coordinator" / "rounds.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "inline" in r]


def peer_rows(cluster: LocalCluster, name: str) -> dict[int, dict]:
    stem = f"peer-{cluster.peer_id(name)[-8:]}"
    return {r: row for r, rows in cluster.metrics_by_round().items() for row in rows if row["peer"] == stem}


def test_spsa_swarm_fine_tunes_survives_a_kill_and_a_joiner_replays(tmp_path):
    checkpoint = tmp_path / "pretrained"
    save_checkpoint(checkpoint, model=build_model(get_preset("nano"), seed=7), optimizer=None, meta={"step": 0})
    with LocalCluster(tmp_path / "swarm", RUN, coordinator_args=["--init-from", str(checkpoint)]) as cluster:
        for name in ("p0", "p1", "p2"):
            cluster.add_peer(name)
        wait_for(lambda: cluster.rounds_completed(3) >= 3, 240, "3 rounds by 3 peers", cluster)
        full = wait_for(lambda: [r for r in coordinator_rounds(cluster) if r["applied"] == 3], 120, "a round with all 3", cluster)
        assert all(r["scalars"] == 3 * SAMPLES and r["payload_bytes"] == 3 * SAMPLES for r in full)
        assert all(len(bytes.fromhex(data)) == SAMPLES for r in full for _, data in r["inline"])

        cluster.kill("p2")  # no goodbye: the rounds go on without it
        killed_at = max(cluster.metrics_by_round())
        wait_for(lambda: cluster.rounds_completed(2) >= killed_at + 4, 240, "rounds after the kill", cluster)

        cluster.add_peer("late", extra=["--start-from", str(checkpoint)])  # replays every round since θ(0)
        wait_for(lambda: 0 in peer_rows(cluster, "late"), 240, "the joiner replaying round 0", cluster)
        joined = wait_for(lambda: cluster.first_contribution("late", included=True), 240, "a byte from the joiner", cluster)
        late = peer_rows(cluster, "late")
        assert all(not late[r]["included"] for r in range(min(killed_at, joined)))  # replayed, not trained
        assert all(late[r]["apply_s"] > 0 for r in range(min(killed_at, joined)))

        for r, rows_r in cluster.metrics_by_round().items():
            assert len({row["hash"] for row in rows_r}) == 1, f"replicas differ after round {r}"
        by_round = {r["round"]: r for r in coordinator_rounds(cluster)}
        assert all(by_round[r]["hash"] == rows_r[0]["hash"] for r, rows_r in cluster.metrics_by_round().items() if r in by_round)
        losses = [r["eval_loss"] for r in sorted(by_round.values(), key=lambda r: r["round"]) if r["eval_loss"] is not None]
        assert losses[-1] < losses[0] - 0.05, f"eval loss did not fall: {losses}"
