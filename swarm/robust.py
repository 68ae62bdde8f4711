"""Robust aggregation: which valid contributions count, and how far each may pull the weights.

The round leader summarises every decoded contribution (per-tensor norms and the positions it
selected), then: rejects all-zero contributions (free riders) and non-finite ones; detects copies by
the overlap of selected positions (not by digest, which a copier can neither reuse nor frame an
honest peer with); and clips each tensor of each contribution to the median norm of that tensor over
the round's accepted contributions. The clip factors go into the manifest, so every follower
multiplies by the same numbers and the mean stays bit-identical everywhere; a follower only checks
that each factor shrinks (0 < s ≤ 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COPY_OVERLAP = 0.4  # share of selected positions two payloads have in common to count as a copy (Templar's figure)


@dataclass
class Summary:
    """What the leader keeps of one decoded contribution: O(selected positions), not O(params)."""

    norms: dict[str, float]
    positions: dict[str, torch.Tensor]  # flat indices of the non-zero entries (sparse codecs only)

    @property
    def is_zero(self) -> bool:
        return all(n == 0.0 for n in self.norms.values())


def summarise(tensors: dict[str, torch.Tensor], sparse: bool) -> Summary:
    norms = {n: float(torch.linalg.vector_norm(t.double())) for n, t in tensors.items()}
    positions = {n: torch.nonzero(t.reshape(-1)).reshape(-1).to(torch.int64) for n, t in tensors.items()} if sparse else {}
    return Summary(norms, positions)


def overlap(a: Summary, b: Summary) -> float:
    """Share of selected positions two sparse contributions have in common (0 when not comparable)."""
    common = smaller = 0
    for name in a.positions.keys() & b.positions.keys():
        pa, pb = a.positions[name], b.positions[name]
        common += int(torch.isin(pa, pb).sum())
        smaller += min(pa.numel(), pb.numel())
    return common / smaller if smaller else 0.0


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_scales(summaries: list[Summary]) -> list[dict[str, float]]:
    """Per contribution, the factor for each tensor whose norm exceeds the median norm of that
    tensor over the contributions that carry it (tensors at or under the median are absent: 1)."""
    by_tensor: dict[str, list[float]] = {}
    for s in summaries:
        for name, norm in s.norms.items():
            by_tensor.setdefault(name, []).append(norm)
    medians = {name: lower_median(norms) for name, norms in by_tensor.items()}
    scales = []
    for s in summaries:
        clipped = {}
        for name, norm in s.norms.items():
            if norm > medians[name] > 0:
                clipped[name] = float(medians[name] / norm)
        scales.append(clipped)
    return scales


def check_scales(scales: dict[str, float], names: set[str]) -> str | None:
    """Why a manifest's clip factors are unacceptable (None if they are fine)."""
    for name, s in scales.items():
        if name not in names:
            return f"a clip factor for {name!r}, which the payload does not carry"
        if not (isinstance(s, float) and math.isfinite(s) and 0 < s <= 1):
            return f"clip factor {s!r} for {name!r} is not in (0, 1]"
    return None
