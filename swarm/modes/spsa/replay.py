"""Applying a round's scalars to the global weights, the same way on every machine.

    θ(t+1) = θ(t) − lr·wd·θ(t) − lr·(1/N)·Σ_i ĝ_i·z_i     (weight decay wd: an option, matrices only)

over the round's N scalars in manifest order (peers sorted by id, each peer's samples in order),
after clipping (`clip_scalars`). Each tensor's update is accumulated on the CPU in fp32 in that
fixed order, so the result is bit-identical on every peer. Nothing is changed until every tensor's
update has been computed and found finite.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from swarm.modes.spsa.seeds import direction, direction_seed
from swarm.state import NonFiniteUpdateError


@dataclass
class RoundScalars:
    """One round's applied estimates: (peer id, its dequantized scalars) in manifest order."""

    run_id: str
    round: int
    contributions: list[tuple[str, list[float]]]

    def terms(self) -> list[tuple[int, float]]:
        """(direction seed, ĝ) of every scalar, in application order."""
        return [
            (direction_seed(self.run_id, self.round, peer, k), g)
            for peer, scalars in self.contributions
            for k, g in enumerate(scalars)
        ]


def clip_scalars(values: list[float], multiple: float) -> list[float]:
    """Clip every value to ±multiple × the median magnitude of the round's nonzero values.

    A byte is always well-formed, so a hostile peer can only send extreme values; the median of
    the honest majority bounds how far any one can move the weights. Pure Python floats in a fixed
    order: the same result everywhere."""
    magnitudes = [abs(v) for v in values if v != 0]
    if not magnitudes:
        return list(values)
    bound = multiple * statistics.median(magnitudes)
    return [min(bound, max(-bound, v)) for v in values]


@torch.no_grad()
def apply_scalars(
    params: dict[str, torch.Tensor],
    scalars: RoundScalars,
    *,
    lr: float,
    weight_decay: float = 0.0,
    no_decay: frozenset[str] = frozenset(),
) -> int:
    """θ ← θ − lr·(wd·θ + (1/N)Σ ĝ_i z_i) in place; returns N. N = 0 leaves θ as it is. Weight decay
    (decoupled, as in AdamW) skips the tensors in `no_decay` (norm gains and embeddings, see
    swarm/train/optim.py's no_decay_parameter_names)."""
    terms = scalars.terms()
    if not terms:
        return 0
    updates: dict[str, torch.Tensor] = {}
    for name in sorted(params):
        tensor = params[name]
        acc = torch.zeros_like(tensor)
        for seed, g in terms:
            if g != 0:
                acc.add_(direction(seed, name, tensor.shape), alpha=g)
        acc.div_(len(terms))
        if weight_decay and name not in no_decay:
            acc.add_(tensor, alpha=weight_decay)
        if not torch.isfinite(acc).all():
            raise NonFiniteUpdateError(f"round {scalars.round}: SPSA update of {name} is not finite")
        updates[name] = acc
    for name, update in updates.items():
        params[name].sub_(update, alpha=lr)
    return len(terms)
