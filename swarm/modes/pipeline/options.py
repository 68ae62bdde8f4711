"""The pipeline mode's options (``RunConfig.mode_options``), validated when the run is built or read."""

from __future__ import annotations

from dataclasses import dataclass

from models import ModelConfig, count_parameters
from models.subspace import Subspace, SubspaceConfig
from swarm.modes.pipeline.wire import DTYPES

FULL_REPLICAS = ("free", "writers", "stage")


@dataclass
class PipelineOptions:
    stages: int = 2  # S: weak peers that together hold one replica
    ratio: int = 1  # d / k of the activation subspace; 1 = uncompressed (h itself crosses the link)
    wire_dtype: str = "bf16"  # of activations and their gradients on the link
    micro_batches: int = 4  # in flight per inner step (GPipe); the batch is cut into this many
    link_timeout_s: float = 30.0  # deadline of every receive; must stay below the round timeout
    weak_below_gb: float = 0.0  # announced memory under which a peer is a stage; 0 = what a replica needs
    # What a full replica holds in span(U) while it trains a round (compressed runs): "free" nothing
    # (the outer step projects its work), "writers" the residual writers after every inner step, its
    # embedding free in all d directions (the off-span change folds into the link's table), "stage"
    # what a stage holds (writers, and E's off-span part fixed for the round). Measured in the docs
    # (`swarm-bench pipeline --full-replicas free,writers,stage --seeds ...`).
    full_replicas: str = "writers"
    # What happens to the learnable embedding's part outside span(U) (changed by unconstrained full
    # replicas and by top-k): "fold" keeps it and adds it to the link's fixed table for each round,
    # "project" removes it at every outer step (E stays in span(U) like the other writers).
    embedding_drift: str = "fold"

    def __post_init__(self) -> None:
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1 (1 = uncompressed), got {self.ratio}")
        if self.wire_dtype not in DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(DTYPES)}, got {self.wire_dtype!r}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.full_replicas not in FULL_REPLICAS:
            raise ValueError(f"full_replicas must be one of {', '.join(FULL_REPLICAS)}, got {self.full_replicas!r}")
        if self.embedding_drift not in ("fold", "project"):
            raise ValueError(f"embedding_drift must be 'fold' or 'project', got {self.embedding_drift!r}")
        if not self.link_timeout_s > 0 or self.weak_below_gb < 0:
            raise ValueError("link_timeout_s must be > 0 and weak_below_gb >= 0")

    def threshold_gb(self, cfg: ModelConfig) -> float:
        """Memory below which a peer cannot hold a replica: weights, grads and two AdamW moments in
        fp32 (16 bytes a parameter), with half again for activations and the allocator."""
        return self.weak_below_gb or 1.5 * 16 * count_parameters(cfg) / 2**30

    def subspace(self, cfg: ModelConfig, seed: int) -> Subspace | None:
        if self.ratio == 1:
            return None
        fold = self.embedding_drift == "fold"
        return Subspace(SubspaceConfig(cfg.d_model, cfg.vocab_size, self.ratio, seed=seed, fold_embedding=fold))
