"""`swarm-bench memory`'s figures from peers' metrics rows (the swarms it runs are the pipeline
end-to-end tests' kind: tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import math

from launch.benchmarks.memory import print_table, role_figures


def row(r: int, role: str, *, rss: int, state: int, bytes_in: int, included: bool = True, time: float = 0.0) -> dict:
    return {
        "round": r,
        "role": role,
        "rss_peak_bytes": rss,
        "state_bytes": state,
        "round_bytes_in": bytes_in,
        "included": included,
        "time": time,
        "state_held_at": 5.0,
    }


def test_figures_are_each_roles_median_and_leave_out_a_peers_first_row(capsys):
    by_peer = {
        "full": [
            row(0, "replica shard 0", rss=400, state=100, bytes_in=10_000, time=20.0),
            row(1, "replica", rss=410, state=100, bytes_in=40, time=30.0),
        ],
        "s0": [
            row(1, "stage 0 of group 0", rss=100, state=25, bytes_in=9_000, included=False, time=31.0),
            row(2, "stage 0", rss=120, state=25, bytes_in=10, time=40.0),
            row(3, "stage 0", rss=120, state=25, bytes_in=12, time=50.0),
        ],
        "s1": [row(1, "stage 1 of group 0", rss=90, state=25, bytes_in=9_000, time=32.0)],  # one row: no steady bytes
    }
    started = {"full": 0.0, "s0": 1.0, "s1": 2.0}
    figures = role_figures(by_peer, started)
    full, stage = figures["full replica"], figures["stage"]
    assert (full["rss_peak"], full["state"], full["bytes_in"], full["held_s"], full["join_s"]) == (410, 100, 40, 5.0, 20.0)
    assert stage["rss_peak"] == 105 and stage["state"] == 25
    assert stage["bytes_in"] == 11  # s0's rows after its first; s1 has none and is left out
    assert stage["join_s"] == (39.0 + 30.0) / 2  # the first round each one's work was in
    assert not math.isnan(stage["held_s"])
    print_table(figures, reference="full replica")
    out = capsys.readouterr().out
    assert "vs full replica" in out and "26%" in out  # 105 / 410
    assert "join" not in out.splitlines()[0].split("first applied")[1]  # no joiners measured: no join columns


def test_the_join_columns_print_each_joiners_figures_and_their_ratio(capsys):
    full = {"rss_peak": 400, "state": 100, "bytes_in": 40, "held_s": 5.0, "join_s": 20.0}
    figures = {
        "stage": {**full, "rss_peak": 100, "state": 25, "late_download": 30 * 2**20, "late_join_s": 30.0},
        "full replica": {**full, "late_download": 100 * 2**20, "late_join_s": 120.0},
    }
    print_table(figures, reference="full replica")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["join", "download", "join"]
    assert lines[1].startswith("full replica") and lines[1].endswith("100.0 MB  120.0 s")  # the reference first
    assert lines[2].startswith("stage") and lines[2].endswith("30.0 MB   30.0 s")
    assert lines[3].split()[-2:] == ["30%", "25%"]  # its download and its join against the full replica's
