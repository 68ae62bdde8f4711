"""Trainer.train_step, the finiteness checks, evaluate and device resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import LanguageModel, build_model, get_preset
from swarm.data.sampler import BatchStream
from swarm.train.optim import OptimConfig, build_optimizer, lr_at
from swarm.train.step import NonFiniteLossError, Trainer, evaluate, resolve_device

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=32)
CPU = torch.device("cpu")


def _setup(lr: float = 1e-2) -> tuple[LanguageModel, Trainer, BatchStream]:
    model = build_model(get_preset("nano", **SMALL), seed=0)
    cfg = OptimConfig(lr=lr, warmup_steps=2, total_steps=10)
    trainer = Trainer(model, build_optimizer(model, cfg), cfg, device=CPU)
    tokens = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, dtype=np.uint8).astype(np.uint16)
    return model, trainer, BatchStream(tokens, batch_size=4, seq_len=16, seed=0)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_step_updates_params_and_reports() -> None:
    model, trainer, stream = _setup()
    before = _params(model)
    stats = [trainer.train_step(*next(stream)) for _ in range(5)]
    assert [s.step for s in stats] == [1, 2, 3, 4, 5] and trainer.step == 5
    assert [s.lr for s in stats] == [lr_at(i, trainer.cfg) for i in range(5)]
    assert all(s.tokens == 64 and s.grad_norm > 0 for s in stats)
    assert stats[-1].lm_loss < stats[0].lm_loss
    assert stats[0].loss == pytest.approx(stats[0].lm_loss)  # dense: no auxiliary losses
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_loss_raises_before_any_update() -> None:
    model, trainer, stream = _setup()
    trainer.train_step(*next(stream))
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    before = _params(model)
    state_before = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state.items()}
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2: loss=nan"):
        trainer.train_step(*next(stream))
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(before, model.parameters()))
    assert all(torch.equal(state_before[k], v["exp_avg"]) for k, v in trainer.optimizer.state.items())
    assert trainer.step == 1


def test_infinite_grad_norm_raises_before_any_update() -> None:
    model, trainer, stream = _setup()
    model.tok_emb.weight.register_hook(lambda g: g * float("inf"))
    before = _params(model)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at step 1"):
        trainer.train_step(*next(stream))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(trainer.optimizer.state) == 0
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_restores_mode_and_is_deterministic() -> None:
    model, _, stream = _setup()
    batches = [next(stream) for _ in range(3)]
    model.train()
    first = evaluate(model, batches)
    assert model.training
    model.eval()
    assert evaluate(model, batches) == first and not model.training
    assert 4.0 < first < 7.0  # about ln(260) = 5.56 at init
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
