"""Shared-seed SPSA (zeroth-order training): seeds, the one-byte scalar codec, perturbation and replay.

Pure single-process maths, no networking: swarm/modes/spsa.py plugs it into the round runtime.
  seeds.py    which random direction a (run, round, peer, sample) stands for
  scalar.py   one byte per directional-derivative estimate
  perturb.py  the two-point estimate on a model, with the fp32 master weights never touched
  replay.py   applying a round's scalars to the global weights, clipping, and replaying a log
The maths and the byte layout are documented in docs/modes/spsa.md.
"""

from swarm.spsa.perturb import two_point
from swarm.spsa.replay import apply_scalars, clip_scalars
from swarm.spsa.scalar import decode_scalars, encode_scalars
from swarm.spsa.seeds import direction, direction_seed

__all__ = [
    "apply_scalars",
    "clip_scalars",
    "decode_scalars",
    "direction",
    "direction_seed",
    "encode_scalars",
    "two_point",
]
