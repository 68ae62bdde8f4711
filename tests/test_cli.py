"""Every console script answers --help; swarm-train runs end to end as a subprocess."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _entry_point(target: str) -> Callable[[list[str]], int]:
    module_name, _, func = target.partition(":")
    return getattr(importlib.import_module(module_name), func)


def _help(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(_entry_point(SCRIPTS[script]), ["--help"], capsys)
    assert "usage:" in out


def test_bench_subcommands_help(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.bench import BENCHMARKS, main

    assert "solo" in BENCHMARKS
    for name in BENCHMARKS:
        assert f"swarm-bench {name}" in _help(main, [name, "--help"], capsys)


def test_presets_table(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.presets import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("nano", "tiny", "small", "1b", "moe-nano", "moe-tiny", "moe-small"):
        assert f"\n{name} " in out
    assert "1.03B" in out


def test_bench_solo_report_format() -> None:
    from launch.benchmarks.solo import LossRow, SpeedRow, format_report

    speed = [SpeedRow("nano", 919_680, 919_680, 15_000.0), SpeedRow("moe-nano", 2_690_000, 923_780, 6_000.0)]
    loss = LossRow("nano", "/x/tiny.txt", 2_000_000, 976, 3e-3, 1.8, 1.75, 130.0, 15_400.0)
    report = format_report("cpu", speed, loss)
    assert "moe-nano" in report and "2.69M" in report and "15,000" in report
    assert "eval 1.8000 nats/byte (2.597 bits/byte)" in report


def test_train_flags_stay_few() -> None:
    from launch.train import build_parser

    flags = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    # 17 of its own plus the 3 metrics flags every training process shares (launch.common.add_metrics_args)
    assert len(flags) <= 20, "swarm-train grew too many flags; put settings in TrainConfig instead"


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "launch.train", *args]
    env = {"PYTHONPATH": str(ROOT), "SWARM_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_swarm_train_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("It was the best of times, it was the worst of times. " * 80)
    common = [
        "--data",
        "corpus.txt",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--device",
        "cpu",
        "--out",
        "run",
    ]
    done = _train([*common, "--steps", "4", "--eval-every", "2", "--sample", "8"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "eval loss" in done.stdout and "sample" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "eval_loss" in records[1]
    assert {p.name for p in (tmp_path / "run/checkpoint").iterdir()} == {
        "meta.json",
        "model.safetensors",
        "optimizer.safetensors",
    }


def test_swarm_train_resume_keeps_settings_and_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.train import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("Call me Ishmael. Some years ago, never mind how long. " * 80)
    args = [
        "--data",
        "corpus.txt",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--device",
        "cpu",
        "--out",
        "run",
        "--lr",
        "0.01",
    ]
    assert main([*args, "--steps", "3"]) == 0
    assert main(["--resume", "run", "--steps", "5"]) == 0
    meta = json.loads((tmp_path / "run/checkpoint/meta.json").read_text())
    assert meta["step"] == 5
    assert meta["train_config"]["batch_size"] == 2 and meta["train_config"]["optim"]["lr"] == 0.01
    assert meta["train_config"]["optim"]["total_steps"] == 5
    assert [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_non_finite_loss_exits_1_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import launch.train
    from swarm.train.step import NonFiniteLossError

    def explode(*args: object, **kwargs: object) -> None:
        raise NonFiniteLossError("non-finite loss at step 7: loss=nan, lm_loss=nan")

    monkeypatch.setattr(launch.train, "run_solo", explode)
    assert launch.train.main(["--steps", "10", "--device", "cpu", "--data", str(ROOT / "pyproject.toml")]) == 1
    assert capsys.readouterr().err == "swarm-train: error: non-finite loss at step 7: loss=nan, lm_loss=nan\n"


def test_swarm_train_errors_are_one_line(tmp_path: Path) -> None:
    done = _train(["--data", "missing.txt", "--steps", "2", "--device", "cpu"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "swarm-train: error: data source not found: 'missing.txt' (expected 'stdlib', a file, a directory or a glob)"
    ]
