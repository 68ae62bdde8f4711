"""Shared-seed SPSA (zeroth-order training): the mode and everything only it uses.

  mode.py     the TrainingMode: inline one-byte scalars, applied by replay in manifest order
  worker.py   a peer's local work: K two-point estimates a round, no backprop, no optimizer state
  seeds.py    which random direction a (run, round, peer, sample) stands for
  scalar.py   one byte per directional-derivative estimate
  perturb.py  the two-point estimate on a model, with the fp32 master weights never touched
  replay.py   applying a round's scalars to the global weights, clipping
  log.py      replaying a run's scalar log from the coordinator's round rows
The maths and the byte layout are documented in docs/modes/spsa.md.
"""

from swarm.modes.spsa.mode import MODE

__all__ = ["MODE"]
