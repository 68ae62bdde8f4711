"""The solo trainer end to end: config, outputs, resume, and that it really learns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarm.data import DataConfig
from swarm.train.checkpoint import MODEL_FILE, CheckpointError
from swarm.train.metrics import STEP_KEYS, read_metrics
from swarm.train.optim import OptimConfig
from swarm.train.solo import TrainConfig, load_train_config, run_solo

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=64)
SHAKESPEARE = Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"


def _corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("All the world's a stage, and all the men and women merely players. " * 60)
    return str(path)


def _cfg(tmp_path: Path, out: str = "run", **kw: object) -> TrainConfig:
    base = dict(
        model_overrides=SMALL,
        data=DataConfig(source=_corpus(tmp_path), eval_fraction=0.1),
        batch_size=4,
        seq_len=32,
        steps=8,
        eval_every=4,
        eval_batches=2,
        out_dir=str(tmp_path / out),
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_config_defaults_and_validation() -> None:
    cfg = TrainConfig(steps=50)
    assert cfg.optim is not None and cfg.optim.total_steps == 50 and cfg.optim.warmup_steps == 5
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown model preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="exceeds"):
        TrainConfig(seq_len=10_000)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="device must be"):
        TrainConfig(device="tpu")
    assert TrainConfig(device="cuda:1").device == "cuda:1"  # a GPU is only required when the run starts


def test_run_writes_metrics_checkpoint_and_sample(tmp_path: Path) -> None:
    result = run_solo(_cfg(tmp_path, sample_bytes=20), progress=False)
    assert result.steps == 8 and len(result.losses) == 8
    assert result.final_eval_loss is not None and result.tokens_per_s_median > 0
    assert result.sample is not None and len(result.sample.encode("utf-8", "replace")) <= 20 * 3
    records = read_metrics(result.metrics_path)  # type: ignore[arg-type]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(set(STEP_KEYS) <= r.keys() for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert records[-1]["eval_loss"] == result.final_eval_loss
    assert (Path(result.checkpoint_dir) / MODEL_FILE).is_file()  # type: ignore[arg-type]
    assert load_train_config(result.out_dir) == _cfg(tmp_path, sample_bytes=20)  # type: ignore[arg-type]


def test_stop_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = run_solo(_cfg(tmp_path, out="full"), progress=False)
    part = run_solo(_cfg(tmp_path, out="part"), progress=False, stop_at_step=4)
    assert part.steps == 4
    rest = run_solo(_cfg(tmp_path, out="part"), progress=False, resume=tmp_path / "part")
    assert part.losses + rest.losses == full.losses
    assert rest.final_eval_loss == full.final_eval_loss
    a = load_file(str(tmp_path / "full/checkpoint" / MODEL_FILE))
    b = load_file(str(tmp_path / "part/checkpoint" / MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "part/metrics.jsonl")]
    assert steps == list(range(1, 9))


def test_resume_refuses_another_corpus(tmp_path: Path) -> None:
    run_solo(_cfg(tmp_path, steps=2), progress=False)
    other = tmp_path / "other.txt"
    other.write_text("something else entirely " * 100)
    cfg = _cfg(tmp_path, steps=4, data=DataConfig(source=str(other), eval_fraction=0.1))
    with pytest.raises(CheckpointError, match="corpus fingerprint differs"):
        run_solo(cfg, progress=False, resume=tmp_path / "run")


@pytest.fixture
def one_thread() -> Iterator[None]:
    # On a busy 2-core machine two OpenMP threads spin against other processes and run ~3x
    # slower than one; this test checks learning, not speed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"learning check needs {SHAKESPEARE} (not present)")
def test_nano_learns_shakespeare(one_thread: None) -> None:
    cfg = TrainConfig(
        preset="nano",
        data=DataConfig(source=str(SHAKESPEARE)),
        batch_size=16,
        seq_len=64,
        steps=40,
        optim=OptimConfig(lr=5e-3, warmup_steps=5, total_steps=40),
        eval_every=0,
        eval_batches=4,
        out_dir=None,
        device="cpu",
    )
    result = run_solo(cfg, progress=False)
    assert result.losses[0] > 5.0  # ~ln(260) at init
    assert result.final_eval_loss is not None and result.final_eval_loss < 3.0  # 2.70 measured


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_solo(_cfg(tmp_path, steps=2, out_dir=None), progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "tok/s" in err
