"""SPES end to end on 127.0.0.1: a coordinator and 4 peers each owning 2 of moe-nano's 8 experts
per layer. Loss falls, replicas stay bit-identical, a SIGKILLed owner's experts get new owners
and move again, and a late joiner takes over the experts freed for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, get_json, wait_for

pytestmark = pytest.mark.slow
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
EXPERTS = [f"expert {e}" for e in range(8)]
RUN = {
    "mode": "spes",
    "preset": "moe-nano",
    "data_source": str(SHAKESPEARE) if SHAKESPEARE.exists() else "stdlib",
    "inner_steps": 4,
    "batch_size": 4,
    "seq_len": 64,
    "warmup_steps": 4,
    "round_timeout_s": 20.0,
    "heartbeat_interval_s": 1.0,
    "heartbeat_ttl_s": 5.0,
    "num_shards": 8,
    "eval_batches": 2,
}


def coordinator_rounds(cluster: LocalCluster) -> list[dict]:
    path = cluster.workdir / "coordinator" / "rounds.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "coverage" in r]


def experts_of(cluster: LocalCluster, name: str) -> set[int]:
    """The experts a peer trained in its latest reported round (from its metrics 'role' field)."""
    stem = f"peer-{cluster.peer_id(name)[-8:]}"
    rows = [row for r, rows in sorted(cluster.metrics_by_round().items()) for row in rows if row["peer"] == stem]
    if not rows:
        return set()
    listed = rows[-1]["role"].split()[1]
    return set() if listed == "none" else {int(e) for e in listed.split(",")}


def all_experts_moved_after(cluster: LocalCluster, round_no: int) -> int | None:
    """The first round after `round_no` in which every expert got a contribution."""
    for row in coordinator_rounds(cluster):
        if row["round"] > round_no and all(row["coverage"].get(e, 0) >= 1 for e in EXPERTS):
            return row["round"]
    return None


def assert_identical(cluster: LocalCluster) -> None:
    for r, rows in cluster.metrics_by_round().items():
        assert len({row["hash"] for row in rows}) == 1, f"replicas differ after round {r}"


def test_spes_swarm_owns_trains_reassigns_and_takes_in_a_joiner(tmp_path):
    with LocalCluster(tmp_path, RUN, status_port=0) as cluster:
        names = [f"p{i}" for i in range(4)]
        for name in names:
            cluster.add_peer(name)
        wait_for(lambda: cluster.rounds_completed(4) >= 4, 300, "4 rounds by 4 peers", cluster)
        owned = {n: experts_of(cluster, n) for n in names}
        assert sorted(len(v) for v in owned.values()) == [2, 2, 2, 2]
        assert set().union(*owned.values()) == set(range(8))
        # A peer that joined a little late follows a few rounds without training until it has caught
        # up (fast rounds on a quiet machine outrun it): wait for a round all four contributed to.
        full = wait_for(
            lambda: [r for r in coordinator_rounds(cluster) if r["coverage"].get("dense") == 4], 240, "a round of all 4", cluster
        )
        assert all(r["coverage"][e] == 1 for r in full for e in EXPERTS)
        assert_identical(cluster)
        ownership = get_json(cluster.status_url + "api/roles")["ownership"]
        assert ownership["layers"] == 4 and ownership["experts"] == 8
        assert sorted(len(o) for o in ownership["owners"].values()) == [1] * 8  # the status page's map
        # Over the rows of rounds a peer trained (a loaded peer that fell behind applies a round without a loss).
        trained = {r: [x["loss"] for x in rows if x["loss"] is not None] for r, rows in cluster.metrics_by_round().items()}
        losses = {r: sum(values) / len(values) for r, values in trained.items() if values}
        assert losses[max(losses)] < losses[min(losses)] - 0.1, f"loss did not fall: {losses}"

        # An owner dies: its experts go to the survivors and move again.
        cluster.kill("p0")
        wait_for(
            lambda: set().union(*(experts_of(cluster, n) for n in names[1:])) == set(range(8)),
            240,
            "the survivors training p0's experts",
            cluster,
        )
        reassigned_at = max(cluster.metrics_by_round())
        moved = wait_for(
            lambda: all_experts_moved_after(cluster, reassigned_at), 240, "every expert moving after the kill", cluster
        )

        # A late joiner downloads the state and takes over the dead peer's experts.
        cluster.add_peer("late")
        wait_for(lambda: experts_of(cluster, "late") == owned["p0"], 240, "the joiner training p0's experts", cluster)
        joined = cluster.first_contribution("late", included=True) or wait_for(
            lambda: cluster.first_contribution("late", included=True), 120, "an applied payload from the joiner", cluster
        )
        assert joined > moved - 1
        wait_for(lambda: all_experts_moved_after(cluster, joined), 120, "every expert moving with the joiner in", cluster)
        assert_identical(cluster)
