"""What the end-to-end adversary tests share: how to start a hostile peer, and the coordinator's round rows."""

from __future__ import annotations

import json

from launch.cluster import LocalCluster

HOSTILE = ("-m", "tests.adversary.hostile")


def rows(cluster: LocalCluster) -> list[dict]:
    path = cluster.workdir / "coordinator" / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
