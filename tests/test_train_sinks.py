"""TensorBoard and W&B sinks carry the JSONL rows' figures; a backend asked for but missing is a clear error.

TensorBoard files are read back with tensorboard's own EventAccumulator. W&B is checked against a
fake `wandb` module in sys.modules (what is passed to init and log, and the offline decision, with
the network probe replaced: tests never reach the internet); the real package is too heavy for the
test extra, so the one test that runs it offline is skipped unless it is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import swarm.train.sinks as metrics
from launch.train import build_parser, config_from_args
from swarm.train.metrics import read_metrics
from swarm.train.sinks import MetricSinks, MetricsUnavailable, SinkConfig, figures, wandb_mode
from swarm.train.solo import TrainConfig, run_solo

# Rows as the coordinator writes them to rounds.jsonl (the final row carries a flag and no round figures).
COORDINATOR_ROWS: list[dict[str, Any]] = [
    {"round": r, "eval_loss": 5.0 - r, "applied": 2, "rejected": 0, "payload_bytes": 1000 + r, "coverage": {"all": 2}}
    | {"leader": "QmLeader", "base_hash": "ab", "hash": "cd", "time": 1.7e9 + r}
    for r in range(3)
]
SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=64)
ROUND_TAGS = {"eval_loss", "applied", "rejected", "payload_bytes", "coverage/all"}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_figures_are_the_finite_numbers_of_a_row() -> None:
    row = {"round": 3, "loss": 2.5, "tokens": 640, "included": True, "role": "replica", "hash": "x"}
    row |= {"compression": None, "eval_loss": math.nan, "time": 1.7e9, "coverage": {"experts/0": 3, "note": "x"}}
    assert figures(row, "round") == {"loss": 2.5, "tokens": 640.0, "coverage/experts/0": 3.0}


def test_nothing_configured_is_a_no_op() -> None:
    sinks = MetricSinks.open(SinkConfig(), name="coordinator")
    assert not SinkConfig().enabled and sinks.sinks == []
    sinks.log(COORDINATOR_ROWS[0])
    sinks.close()


def test_tensorboard_has_a_tag_per_figure_at_each_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    sinks = MetricSinks.open(SinkConfig(tensorboard_dir=str(tmp_path)), name="coordinator", group="run-x")
    for row in [*COORDINATOR_ROWS, {"round": 2, "eval_loss": 1.5, "hash": "ef", "final": True}]:
        sinks.log(row)
    sinks.close()
    got = scalars(tmp_path / "coordinator")
    assert set(got) == ROUND_TAGS
    assert got["payload_bytes"] == [(0, 1000.0), (1, 1001.0), (2, 1002.0)]
    assert got["eval_loss"] == [(0, 5.0), (1, 4.0), (2, 3.0), (2, 1.5)]


def test_solo_trainer_sends_its_jsonl_rows_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 80)
    flags = ["--data", str(corpus), "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]
    from_flags = config_from_args(build_parser().parse_args(flags))
    assert from_flags.sinks == SinkConfig(tensorboard_dir=str(tmp_path / "tb"))
    assert TrainConfig.from_dict(from_flags.to_dict()) == from_flags  # kept in the checkpoint for --resume
    cfg = dataclasses.replace(from_flags, model_overrides=SMALL, steps=4, batch_size=2, seq_len=32, eval_every=2, device="cpu")
    result = run_solo(cfg, progress=False)
    rows = read_metrics(result.metrics_path)  # type: ignore[arg-type]
    got = scalars(tmp_path / "tb" / "run")
    assert {"loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(got)
    assert got["lm_loss"] == [(r["step"], pytest.approx(r["lm_loss"])) for r in rows]
    assert [step for step, _ in got["eval_loss"]] == [2, 4]


def test_a_backend_that_is_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a)
    )
    with pytest.raises(
        MetricsUnavailable,
        match=r"--tensorboard needs the 'tensorboard' package, which is not installed: pip install tensorboard",
    ):
        SinkConfig(tensorboard_dir="tb")
    with pytest.raises(MetricsUnavailable, match="--wandb needs the 'wandb' package"):
        SinkConfig(wandb_project="p")
    args = build_parser().parse_args(["--tensorboard", "tb"])
    with pytest.raises(ValueError, match="not installed"):
        config_from_args(args)


class FakeRun:
    def __init__(self, **kwargs: Any) -> None:
        self.init = kwargs
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = False

    def log(self, data: dict[str, float], step: int) -> None:
        self.logged.append((dict(data), step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[FakeRun]:
    """A `wandb` module that records runs; the network probe and key lookup report no server."""
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kwargs: Any) -> FakeRun:
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(metrics, "_reachable", lambda url, timeout_s: False)
    monkeypatch.setattr(metrics, "_has_api_key", lambda host: True)
    return runs


def test_wandb_gets_the_same_figures_grouped_by_run(fake_wandb: list[FakeRun]) -> None:
    cfg = SinkConfig(wandb_project="swarm-test", wandb_offline=True, wandb_dir="/tmp/wb")
    sinks = MetricSinks.open(cfg, name="peer-1a2b3c4d", group="run-x", config={"preset": "nano"})
    for row in COORDINATOR_ROWS:
        sinks.log(row)
    sinks.close()
    (run,) = fake_wandb
    assert run.init == {
        "project": "swarm-test",
        "name": "peer-1a2b3c4d",
        "group": "run-x",
        "config": {"preset": "nano"},
        "dir": "/tmp/wb",
        "mode": "offline",
    }
    assert [step for _, step in run.logged] == [0, 1, 2] and set(run.logged[1][0]) == ROUND_TAGS
    assert run.logged[1][0]["eval_loss"] == 4.0 and run.finished


def test_wandb_goes_offline_when_asked_or_when_the_server_is_out_of_reach(
    fake_wandb: list[FakeRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wandb_mode(SinkConfig(wandb_project="p", wandb_offline=True)) == "offline"
    assert wandb_mode(SinkConfig(wandb_project="p")) == "offline"  # _reachable says no
    monkeypatch.setattr(metrics, "_reachable", lambda url, timeout_s: True)
    assert wandb_mode(SinkConfig(wandb_project="p")) == "online"
    monkeypatch.setattr(metrics, "_has_api_key", lambda host: False)
    assert wandb_mode(SinkConfig(wandb_project="p")) == "offline"  # online would stop to ask for a key
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(SinkConfig(wandb_project="p")) == "disabled"  # the user's own setting wins
    MetricSinks.open(SinkConfig(wandb_project="p"), name="solo").close()
    assert fake_wandb[-1].init["mode"] == "disabled"


def test_wandb_offline_flag_needs_a_project() -> None:
    from launch.common import sink_config

    with pytest.raises(ValueError, match="--wandb-offline needs --wandb"):
        sink_config(build_parser().parse_args(["--wandb-offline"]))


@pytest.mark.slow  # W&B starts a service process: seconds when idle, a minute on a loaded CI machine
def test_real_wandb_writes_an_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    sinks = MetricSinks.open(SinkConfig(wandb_project="swarm-test", wandb_offline=True, wandb_dir=str(tmp_path)), name="solo")
    for row in COORDINATOR_ROWS:
        sinks.log(row)
    sinks.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("*.wandb")
    assert data.stat().st_size > 0
