"""End-to-end swarms on 127.0.0.1: real processes, real DHT, real payloads.

Each test starts a coordinator and peers as child processes (launch/cluster.py), waits on their
per-round metrics files, and reaps every process in the end, whatever happens.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for

pytestmark = pytest.mark.slow


def run_config() -> dict:
    """The nano run, with a higher inner lr so the loss falls visibly within three rounds."""
    return nano_run(inner_lr=3e-3, round_timeout_s=15.0, num_shards=8)


def rounds_done_by(cluster: LocalCluster, peers: set[str], at_least: int) -> bool:
    by_round = cluster.metrics_by_round()
    return all(sum(1 for row in by_round.get(r, []) if _peer_name(cluster, row) in peers) == len(peers) for r in range(at_least))


def _peer_name(cluster: LocalCluster, row: dict) -> str:
    return cluster.peer_names.get(row["peer"], row["peer"])


def mean_losses(cluster: LocalCluster) -> dict[int, float]:
    """Mean inner-step loss per round over the peers that trained in it (a peer that arrived
    after a round closed applies it without training and reports no loss)."""
    means = {}
    for r, rows in cluster.metrics_by_round().items():
        trained = [row["loss"] for row in rows if row["loss"] is not None]
        if trained:
            means[r] = sum(trained) / len(trained)
    return means


def assert_identical(cluster: LocalCluster, rounds: range | None = None) -> None:
    """Every peer that finished a round holds the same global weights after it."""
    for r, rows in cluster.metrics_by_round().items():
        if rounds is None or r in rounds:
            hashes = {row["hash"] for row in rows}
            assert len(hashes) == 1, f"replicas differ after round {r}: {rows}"


def test_rounds_join_and_kill(tmp_path: Path) -> None:
    """Through rounds' aggregates (`aggregate_from` 2: the coordinator publishes each round's, and
    every node fetches that, from the coordinator or a member relaying it, instead of every payload;
    the other end-to-end swarms exchange every payload)."""
    with LocalCluster(tmp_path, {**run_config(), "aggregate_from": 2}) as cluster:
        for i in range(3):
            cluster.add_peer(f"p{i}")
        wait_for(lambda: cluster.rounds_completed(3) >= 3, 240, "3 rounds by 3 peers", cluster)
        assert_identical(cluster)
        losses = mean_losses(cluster)
        first, last = losses[min(losses)], losses[max(losses)]
        assert last < first - 0.2, f"loss did not fall: {losses}"
        rows = [json.loads(line) for line in (cluster.workdir / "coordinator" / "rounds.jsonl").read_text().splitlines()]
        assert rows and all(row["aggregate"] for row in rows if row["applied"] >= 2), rows

        # A peer joining mid-run downloads the state and contributes from its next round.
        cluster.add_peer("late")
        tried = wait_for(lambda: cluster.first_contribution("late"), 180, "the late joiner's first payload", cluster)
        # Its first round may already be closing when it arrives; the next one must include it, unless
        # the coordinator refused it on probation (a newcomer's share must clearly lower the probe loss).
        counted = wait_for(
            lambda: cluster.first_contribution("late", included=True), 120, "an applied payload from the joiner", cluster
        )
        late = cluster.peer_id("late")[-8:]
        for r in range(tried + 1, counted):
            refused = f"[reject] round {r}: payload from {late} rejected: on probation"
            assert refused in cluster.log("coordinator"), f"round {r} left out the joiner's payload, not on probation"
        wait_for(lambda: cluster.rounds_completed(4) > counted, 120, "every peer finishing that round", cluster)
        assert all(row["applied"] == 4 for row in cluster.metrics_by_round()[counted])
        assert_identical(cluster)

        # A peer SIGKILLed mid-round: the round closes without it; survivors stay identical.
        cluster.kill("p0")
        killed_at = max(cluster.metrics_by_round())
        survivors = 3
        wait_for(lambda: cluster.rounds_completed(survivors) > killed_at + 2, 180, "2 rounds after the kill", cluster)
        assert_identical(cluster)
        assert "closed without" in cluster.log("coordinator") or any(
            row["applied"] == 3 for r, rows in cluster.metrics_by_round().items() if r > killed_at for row in rows
        )

        # Ctrl+C: the peer announces that it leaves and exits cleanly; the others go on.
        cluster.procs["p1"].send_signal(signal.SIGINT)
        assert cluster.procs["p1"].wait(timeout=60) == 0
        assert "[leave]" in cluster.log("p1")
        left_at = max(cluster.metrics_by_round())
        wait_for(lambda: cluster.rounds_completed(2) > left_at + 1, 180, "a round after the Ctrl+C", cluster)


def test_coordinator_down_and_back(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, run_config()) as cluster:
        cluster.add_peer("p0")
        cluster.add_peer("p1")
        wait_for(lambda: cluster.rounds_completed(2) >= 2, 240, "2 rounds", cluster)
        listening = re.search(r"listening on (\S+)", cluster.log("p0"))
        assert listening, cluster.log("p0")
        peer_address = listening.group(1)
        cluster.kill("coordinator")
        down_at = max(cluster.metrics_by_round())
        wait_for(lambda: cluster.rounds_completed(2) > down_at + 3, 180, "3 rounds without the coordinator", cluster)
        assert_identical(cluster)

        # The restarted coordinator keeps its peer id and run, catches up, and leads again.
        cluster.start_coordinator(extra=["--initial-peers", peer_address])
        log = lambda: cluster.log("coordinator")  # noqa: E731
        wait_for(lambda: re.search(r"round (\d+) closed by us", log()), 180, "the coordinator leading again", cluster)
        assert "resuming run" in log()
        assert_identical(cluster)
