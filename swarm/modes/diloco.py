"""DiLoCo, the dense baseline: full replicas, dense fp32/fp16 pseudo-gradients, Nesterov outer
momentum (its buffer is part of the hashed global state). Same round path as SparseLoCo."""

from __future__ import annotations

from swarm.modes.replica import ReplicaMode
from swarm.run import OuterConfig


class DiLoCoMode(ReplicaMode):
    name = "diloco"

    @classmethod
    def default_outer(cls, dense_dtype: str = "fp32") -> OuterConfig:
        """DiLoCo's published outer optimizer: Nesterov momentum 0.9, outer lr 0.7, dense payloads."""
        return OuterConfig(
            codec="dense-fp16" if dense_dtype == "fp16" else "dense-fp32", outer_lr=0.7, momentum=0.9, nesterov=True
        )

    def check_run(self) -> None:
        outer = self.run.outer
        if outer.codec == "sparseloco":
            raise ValueError("mode 'diloco' sends dense payloads: codec must be 'dense-fp32' or 'dense-fp16'")
        if outer.nesterov and not outer.momentum:
            raise ValueError("nesterov needs momentum > 0")


MODE = DiLoCoMode
