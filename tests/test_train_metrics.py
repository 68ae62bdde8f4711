"""Metrics JSONL writer and reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.train.metrics import MetricsWriter, read_metrics


def test_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": 2.5})
        writer.write({"step": 2, "loss": float("nan"), "eval_loss": 2.0})
        assert len(read_metrics(path)) == 2  # flushed as written
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None, "eval_loss": 2.0}]
    with pytest.raises(ValueError, match="closed"):
        writer.write({"step": 3})


def test_new_writer_truncates_resume_writer_keeps_history(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as writer:
        for step in range(1, 6):
            writer.write({"step": step})
    with MetricsWriter(path, resume_step=3) as writer:
        writer.write({"step": 4, "again": True})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    MetricsWriter(path).close()
    assert read_metrics(path) == []


def test_reader_skips_a_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{bad\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_metrics(path)
