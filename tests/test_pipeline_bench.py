"""`swarm-bench pipeline` end to end at a size that runs in seconds: every configuration, several
seeds, both ways for the full replicas of a selective run, and the summary lines the notes quote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.bench import main

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(400))


def test_pipeline_bench_runs_every_configuration_per_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    argv = ["pipeline", "--data", str(corpus), "--preset", "nano", "--replicas", "2", "--rounds", "1", "--inner-steps", "2"]
    argv += ["--batch-size", "2", "--seq-len", "32", "--ratios", "8", "--embedding-drift", "fold", "--eval-batches", "2"]
    argv += ["--full-replicas", "free,writers,stage", "--seeds", "0,1", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {
        name: line
        for line in out.splitlines()
        for name in (
            "(a) full replicas",
            "(b) 1 pipelined, uncompressed",
            "(c) selective, ratio 8, fold ",
            "(c) selective, ratio 8, fold, full: free",
            "(c) selective, ratio 8, fold, full: stage",
            "(d) all compressed, ratio 8, fold",
        )
        if line.startswith(name)
    }
    assert len(rows) == 6, out
    assert rows["(d) all compressed, ratio 8, fold"].split()[6:8] == ["32", "16x"]  # k = 16 in bf16 against 128 fp32
    for line in rows.values():  # two seeds: a median and a spread that is not a point
        lo, hi = re.search(r"(\d\.\d{4})-(\d\.\d{4})", line).groups()  # type: ignore[union-attr]
        assert float(lo) < float(hi), line
    assert out.count("seeds, median difference") == 3, out  # one summary line per way of the selective run
    assert "(b) 1 pipelined, uncompressed (seed 1): round 0 done" in out


def test_pipeline_bench_refuses_unknown_ways(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="free, writers, stage"):
        main(["pipeline", "--full-replicas", "sometimes"])
    with pytest.raises(SystemExit, match="at least one seed"):
        main(["pipeline", "--seeds", ","])
