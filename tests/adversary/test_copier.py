"""A free rider copying another peer's payload is struck and banned; the peer it copied is not."""

from __future__ import annotations

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from tests.adversary.common import HOSTILE

pytestmark = pytest.mark.slow


def test_a_copier_is_caught_and_the_honest_peer_is_not_framed(tmp_path):
    with LocalCluster(tmp_path, nano_run(num_shards=4)) as cluster:
        cluster.add_peer("honest0")
        cluster.add_peer("honest1")
        cluster.add_peer("copier", program=(*HOSTILE, "copy"))
        wait_for(lambda: "[ban]" in cluster.log("coordinator"), 300, "the copier banned", cluster)
        copier, honest = cluster.peer_id("copier")[-8:], [cluster.peer_id(f"honest{i}")[-8:] for i in range(2)]
        log = cluster.log("coordinator").splitlines()
        struck = [line.split("payload from ")[1][:8] for line in log if "copies the payload" in line]
        assert struck and set(struck) == {copier}, "only the copier is struck as a copier"
        banned = [line for line in log if "[ban]" in line]
        assert all(copier in line for line in banned) and not any(h in line for h in honest for line in banned)
        start = max(cluster.metrics_by_round())
        wait_for(lambda: cluster.rounds_completed(2) > start + 1, 120, "rounds after the ban", cluster)
