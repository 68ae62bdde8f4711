"""Checkpoints: bit-exact round trip, N == N/2 + resume + N/2, validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import LanguageModel, build_model, freeze_experts, get_preset
from swarm.data.sampler import BatchStream
from swarm.train.checkpoint import (
    META_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from swarm.train.optim import OptimConfig, build_optimizer
from swarm.train.step import Trainer

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=32)
CFG = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=8)
TOKENS = np.frombuffer(b"to be or not to be, that is the question. " * 30, dtype=np.uint8).astype(np.uint16)


def _fresh(preset: str = "nano", seed: int = 0, **overrides: int) -> tuple[LanguageModel, Trainer, BatchStream]:
    model = build_model(get_preset(preset, **{**SMALL, **overrides}), seed=seed)
    trainer = Trainer(model, build_optimizer(model, CFG), CFG, device=torch.device("cpu"))
    return model, trainer, BatchStream(TOKENS, batch_size=4, seq_len=16, seed=1)


def _save(path: Path, trainer: Trainer, stream: BatchStream) -> None:
    assert isinstance(trainer.model, LanguageModel)
    meta = {
        "step": trainer.step,
        "data_state": stream.state_dict(),
        "model_config": trainer.model.cfg.to_dict(),
    }
    save_checkpoint(path, model=trainer.model, optimizer=trainer.optimizer, meta=meta)


def _resume(path: Path, trainer: Trainer, stream: BatchStream) -> None:
    meta = load_checkpoint(path, model=trainer.model, optimizer=trainer.optimizer)
    stream.load_state_dict(meta["data_state"])
    trainer.step = meta["step"]
    restore_rng_state(meta["rng"])


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, trainer, stream = _fresh()
    for _ in range(3):
        trainer.train_step(*next(stream))
    _save(tmp_path / "ck", trainer, stream)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [META_FILE, MODEL_FILE, OPTIM_FILE]
    other, other_trainer, _ = _fresh(seed=5)
    load_checkpoint(tmp_path / "ck", model=other, optimizer=other_trainer.optimizer)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = trainer.optimizer.state_dict()["state"], other_trainer.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for index in saved:
        for slot in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[index][slot], loaded[index][slot])
    assert "optim/blocks.0.attn.qkv.weight/exp_avg" in load_file(str(tmp_path / "ck" / OPTIM_FILE))


def test_half_plus_half_equals_full_run(tmp_path: Path) -> None:
    model, trainer, stream = _fresh()
    full = [trainer.train_step(*next(stream)).loss for _ in range(8)]

    _first_model, first, first_stream = _fresh()
    halves = [first.train_step(*next(first_stream)).loss for _ in range(4)]
    _save(tmp_path / "ck", first, first_stream)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    second_model, second, second_stream = _fresh(seed=99)
    _resume(tmp_path / "ck", second, second_stream)
    halves += [second.train_step(*next(second_stream)).loss for _ in range(4)]

    assert halves == full
    for a, b in zip(model.parameters(), second_model.parameters()):
        assert torch.equal(a, b)


def test_moe_with_frozen_experts(tmp_path: Path) -> None:
    moe = dict(expert_d_ff=32)
    model, _, stream = _fresh("moe-nano", **moe)
    freeze_experts(model, [(0, 1), (1, 2)])
    trainer = Trainer(model, build_optimizer(model, CFG), CFG, device=torch.device("cpu"))
    trainer.train_step(*next(stream))
    _save(tmp_path / "ck", trainer, stream)
    keys = load_file(str(tmp_path / "ck" / OPTIM_FILE)).keys()
    slots = {k.rsplit("/", 1)[0].removeprefix("optim/") for k in keys}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "optim/blocks.0.ffn.router.weight/exp_avg" in keys and slots <= trainable
    assert not any(".experts.0." in k for k in keys)  # frozen in every layer
    other, _, _ = _fresh("moe-nano", seed=3, **moe)
    freeze_experts(other, [(0, 1), (1, 2)])
    load_checkpoint(tmp_path / "ck", model=other, optimizer=build_optimizer(other, CFG))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_shape_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    _, trainer, stream = _fresh()
    _save(tmp_path / "ck", trainer, stream)
    wider, _, _ = _fresh(d_ff=96)
    with pytest.raises(CheckpointError, match=r"shape of blocks.0.ffn.w_gate.weight is \(64, 32\)"):
        load_checkpoint(tmp_path / "ck", model=wider)
    deeper, _, _ = _fresh(n_layers=3)
    with pytest.raises(CheckpointError, match="missing.*blocks.2"):
        load_checkpoint(tmp_path / "ck", model=deeper)


def test_format_version_and_missing_files(tmp_path: Path) -> None:
    model, trainer, stream = _fresh()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing", model=model)
    _save(tmp_path / "ck", trainer, stream)
    meta_path = tmp_path / "ck" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99, this code reads version 1"):
        load_checkpoint(tmp_path / "ck", model=model)
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "ck" / OPTIM_FILE).unlink()
    with pytest.raises(CheckpointError, match="file missing"):
        load_checkpoint(tmp_path / "ck", model=model, optimizer=trainer.optimizer)


def test_optimizer_over_other_params_is_refused(tmp_path: Path) -> None:
    model, _, stream = _fresh("moe-nano", expert_d_ff=32)
    trainer = Trainer(model, build_optimizer(model, CFG), CFG, device=torch.device("cpu"))
    _save(tmp_path / "ck", trainer, stream)
    freeze_experts(model, [(0, 0)])
    with pytest.raises(CheckpointError, match="trainable parameters differ"):
        load_checkpoint(tmp_path / "ck", model=model, optimizer=build_optimizer(model, CFG))


def test_save_replaces_previous_checkpoint(tmp_path: Path) -> None:
    _, trainer, stream = _fresh()
    _save(tmp_path / "ck", trainer, stream)
    trainer.train_step(*next(stream))
    _save(tmp_path / "ck", trainer, stream)
    assert json.loads((tmp_path / "ck" / META_FILE).read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
