"""Broken payloads and a drifting replica, end to end on 127.0.0.1 (tests/adversary/hostile.py).

A peer that sends a differently malformed payload every round is rejected each time with the reason,
blamed by its own peer id (never by the name it chose), and neither it nor anyone else crashes. A
peer whose weights drift notices the mismatch, reloads the agreed state, and is bit-identical again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for

pytestmark = pytest.mark.slow
HOSTILE = ("-m", "tests.adversary.hostile")


def test_malformed_payloads_are_rejected_and_a_drifter_reloads(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nano_run(inner_lr=3e-3, round_timeout_s=15.0, num_shards=8)) as cluster:
        cluster.add_peer("honest0")
        cluster.add_peer("honest1")
        cluster.add_peer("liar", program=(*HOSTILE, "malformed"))
        cluster.add_peer("drifter", program=(*HOSTILE, "diverge"))
        wait_for(lambda: cluster.log("coordinator").count("rejected: malformed payload") >= 3, 300, "3 rejections", cluster)
        log = cluster.log("coordinator")
        reasons = re.findall(r"rejected: malformed payload: (.*)", log)
        assert len(set(reasons)) >= 3, reasons
        assert all(
            "liar" not in line and cluster.peer_id("liar")[-8:] in line
            for line in log.splitlines()
            if "rejected: malformed" in line
        )

        wait_for(lambda: "reloading state" in cluster.log("drifter"), 180, "the drifter to notice and reload", cluster)
        reload_round = max(cluster.metrics_by_round())
        honest = {"honest0", "honest1", "drifter"}
        wait_for(lambda: cluster.rounds_completed(3) > reload_round + 2, 180, "rounds after the reload", cluster)
        names = cluster.peer_names
        for r, rows in cluster.metrics_by_round().items():
            if r > reload_round:
                assert len({row["hash"] for row in rows if names.get(row["peer"], row["peer"]) in honest}) == 1, rows
        assert cluster.procs["liar"].poll() is None, "a hostile payload must not crash anybody, itself included"
