"""Every process SIGKILLed at once: the run resumes from the coordinator's saved state."""

from __future__ import annotations

import json

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from tests.adversary.common import rows

pytestmark = pytest.mark.slow


def test_stop_everything_and_resume_from_the_saved_state(tmp_path):
    cluster = LocalCluster(tmp_path, nano_run(), coordinator_args=("--save-every", "1"))
    with cluster:
        for i in range(2):
            cluster.add_peer(f"p{i}")
        meta_path = tmp_path / "coordinator" / "state" / "meta.json"
        wait_for(lambda: meta_path.exists() and json.loads(meta_path.read_text())["round"] >= 3, 240, "3 rounds saved", cluster)
        for name in list(cluster.procs):
            cluster.kill(name)  # SIGKILL: nothing gets to say goodbye, nobody holds a state any more
        meta = json.loads(meta_path.read_text())
        saved_round, saved_hash = meta["round"], meta["hash"]

        cluster.start_coordinator(["--save-every", "1"])
        for i in range(2):
            cluster.add_peer(f"q{i}")
        wait_for(lambda: "[resume]" in cluster.log("coordinator"), 120, "the coordinator resuming", cluster)
        resumed = wait_for(
            lambda: [r for r in rows(cluster) if "base_hash" in r and r["round"] >= saved_round], 240, "a round after", cluster
        )
        assert resumed[0]["round"] == saved_round and resumed[0]["base_hash"] == saved_hash
        wait_for(lambda: cluster.rounds_completed(2) > saved_round + 1, 240, "training going on", cluster)
