"""SparseLoCo: full replicas, H inner AdamW steps, top-k + 2-bit pseudo-gradients with error
feedback, the per-slot mean applied with outer lr α and no momentum (the decayed error buffer
plays that part). Every behaviour is the base interface's; this file pins the settings."""

from __future__ import annotations

from swarm.modes.base import TrainingMode


class SparseLoCoMode(TrainingMode):
    name = "sparseloco"

    def check_run(self) -> None:
        outer = self.run.outer
        if outer.codec != "sparseloco":
            raise ValueError(f"mode {self.run.mode!r} sends sparse payloads: codec must be 'sparseloco', got {outer.codec!r}")
        if outer.momentum or outer.nesterov:
            raise ValueError("outer momentum with the SparseLoCo codec is an error: the error buffer already carries it")


MODE = SparseLoCoMode
