"""Training library: optimizer and schedule, the reusable step, checkpoints, metrics, the solo trainer.

Swarm peers reuse `Trainer.train_step` for their inner steps; `run_solo` is the single-process baseline.
"""

from swarm.train.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from swarm.train.metrics import MetricsWriter, read_metrics
from swarm.train.optim import OptimConfig, build_optimizer, lr_at
from swarm.train.step import NonFiniteLossError, StepStats, Trainer, evaluate, resolve_device

__all__ = [
    "CheckpointError",
    "MetricsWriter",
    "NonFiniteLossError",
    "OptimConfig",
    "StepStats",
    "Trainer",
    "build_optimizer",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "read_meta",
    "read_metrics",
    "resolve_device",
    "save_checkpoint",
]
