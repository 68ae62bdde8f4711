"""DiLoCo, the dense baseline: full replicas, dense fp32/fp16 pseudo-gradients, Nesterov outer
momentum (its buffer is part of the hashed global state). Same round path as SparseLoCo."""

from __future__ import annotations

from swarm.modes.base import TrainingMode


class DiLoCoMode(TrainingMode):
    name = "diloco"

    def check_run(self) -> None:
        outer = self.run.outer
        if outer.codec == "sparseloco":
            raise ValueError("mode 'diloco' sends dense payloads: codec must be 'dense-fp32' or 'dense-fp16'")
        if outer.nesterov and not outer.momentum:
            raise ValueError("nesterov needs momentum > 0")


MODE = DiLoCoMode
