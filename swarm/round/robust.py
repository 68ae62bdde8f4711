"""Robust aggregation: which valid contributions count, and how far each may pull the weights.

The round leader summarises every decoded contribution (per-tensor norms and the entries it
selected), then: rejects all-zero contributions (free riders) and non-finite ones; detects copies by
the overlap of selected positions (not by digest, which a copier can neither reuse nor frame an
honest peer with); clips each tensor of each contribution to the median norm of that tensor over
the round's accepted contributions; and leaves out contributions that point away from the others
(a sign flip) or nowhere in particular (noise), judged by their cosine with the sum of the rest. The clip factors go into the manifest, so every follower
multiplies by the same numbers and the mean stays bit-identical everywhere; a follower only checks
that each factor shrinks (0 < s ≤ 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

# Share of selected positions two payloads must have in common to count as a copy. A copier that
# re-encodes another payload reproduces its positions exactly (1.0); one that takes 80% of another's
# entries and fills in its own, 0.6-0.75 after its own top-k. Honest SparseLoCo payloads of `nano`
# overlapped 0.13-0.31 (4 replicas, 8 rounds of H = 10, measured; 32 honest peers in the simulator:
# none above 0.6), and above 0.4 right after a bad round (at 0.4 the swarm once stalled). Copies are
# sought after scoring, so Sybils built from honest work (framing, × 0.01) are already out by then.
COPY_OVERLAP = 0.6


ALIGN_FRACTION = 0.25  # a contribution whose alignment with the others is below this share of the round's median is left out


@dataclass
class Summary:
    """What the leader keeps of one decoded contribution: its selected entries (sparse codecs), so
    O(selected positions) rather than O(params); dense codecs keep the values themselves."""

    norms: dict[str, float]
    positions: dict[str, torch.Tensor]  # flat indices of the non-zero entries (sparse codecs only)
    values: dict[str, torch.Tensor]  # the entries at `positions` (sparse) or every entry, flat (dense)
    numels: dict[str, int]

    @property
    def is_zero(self) -> bool:
        return all(n == 0.0 for n in self.norms.values())


def summarise(tensors: dict[str, torch.Tensor], sparse: bool) -> Summary:
    norms = {n: float(torch.linalg.vector_norm(t.double())) for n, t in tensors.items()}
    flat = {n: t.reshape(-1) for n, t in tensors.items()}
    positions = {n: torch.nonzero(f).reshape(-1).to(torch.int64) for n, f in flat.items()} if sparse else {}
    values = {n: (f[positions[n]] if sparse else f).clone() for n, f in flat.items()}
    return Summary(norms, positions, values, {n: f.numel() for n, f in flat.items()})


def alignments(summaries: list[Summary], scales: list[dict[str, float]]) -> list[float]:
    """Cosine of each (clipped) contribution with the sum of all the others, in float64.

    Honest pseudo-gradients from the same weights point roughly the same way (about 0.1 to 0.15 for
    sparse payloads of `nano`, never below 0 in our runs); a sign-flipped one points away, noise is
    near 0. One dense float64 accumulator per tensor: O(params), whatever the number of payloads.
    """
    total: dict[str, torch.Tensor] = {}
    scaled = []
    for summary, scale in zip(summaries, scales):
        mine = {n: v.double() * scale.get(n, 1.0) for n, v in summary.values.items()}
        scaled.append(mine)
        for name, v in mine.items():
            acc = total.setdefault(name, torch.zeros(summary.numels[name], dtype=torch.float64))
            if name in summary.positions:
                acc.index_add_(0, summary.positions[name], v)
            else:
                acc.add_(v)
    total_sq = sum(float((t * t).sum()) for t in total.values())
    scores = []
    for summary, mine in zip(summaries, scaled):
        own_sq = sum(float((v * v).sum()) for v in mine.values())
        dot = 0.0
        for name, v in mine.items():
            t = total[name][summary.positions[name]] if name in summary.positions else total[name]
            dot += float((v * t).sum())
        others_sq = max(total_sq - 2 * dot + own_sq, 0.0)  # |Σ others|² = |total − mine|²
        cross = dot - own_sq  # mine · (total − mine)
        scores.append(cross / math.sqrt(own_sq * others_sq) if own_sq > 0 and others_sq > 0 else 0.0)
    return scores


def misaligned(scores: list[float]) -> list[bool]:
    """Which contributions point away from the round's consensus: below ALIGN_FRACTION of the median
    alignment. Needs 3 or more contributions and a positive median (an honest majority agreeing)."""
    if len(scores) < 3:
        return [False] * len(scores)
    median = lower_median(scores)
    if median <= 0:
        return [False] * len(scores)
    return [score < ALIGN_FRACTION * median for score in scores]


def against_the_rest(summaries: list[Summary], scales: list[dict[str, float]]) -> list[int]:
    """Indices of the (clipped) contributions whose cosine with the sum of the others is negative
    (two or more contributions). Honest ones from the same weights never were in our runs; the
    check a follower makes of a round nobody scored, so a peer that leads cannot slip in its own
    flipped update at an honest size."""
    if len(summaries) < 2:
        return []
    return [i for i, score in enumerate(alignments(summaries, scales)) if score < 0]


def overlap(a: Summary, b: Summary) -> float:
    """Share of selected positions two sparse contributions have in common (0 when not comparable)."""
    common = smaller = 0
    for name in a.positions.keys() & b.positions.keys():
        pa, pb = a.positions[name], b.positions[name]
        common += int(torch.isin(pa, pb).sum())
        smaller += min(pa.numel(), pb.numel())
    return common / smaller if smaller else 0.0


SKETCH = 256  # positions kept per contribution for the copy check's first pass (bottom-k of a hash)
_MIX1, _MIX2 = -4658895280553007687, -7723592293110705685  # splitmix64's multipliers, as signed int64


@dataclass(frozen=True)
class Sketch:
    """The SKETCH smallest hashes of a sparse contribution's (tensor, position) pairs, and how many
    pairs it has: two sketches estimate how much two contributions' positions overlap in O(SKETCH),
    so a round of R contributions needs the exact O(positions) comparison only for the pairs that
    may be copies, not for all R²/2 (at R = 1,000 that was most of a leader's round)."""

    members: frozenset[int]  # the hashes (pairs are compared as sets: R²/2 pairs a round)
    size: int


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit mixing hash (splitmix64's finaliser; int64 arithmetic wraps, shifts are made logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sketch(summary: Summary) -> Sketch:
    keys = []
    for i, name in enumerate(sorted(summary.positions)):
        keys.append(_mix(summary.positions[name] + ((i + 1) << 40)))
    if not keys:
        return Sketch(frozenset(), 0)
    hashed = torch.cat(keys)  # (tensor, position) pairs are distinct: so are their hashes, but for collisions
    smallest = torch.topk(hashed, min(SKETCH, hashed.numel()), largest=False).values
    return Sketch(frozenset(smallest.tolist()), hashed.numel())  # O(positions), no full sort


def may_copy(a: Sketch, b: Sketch) -> bool:
    """Whether two contributions may overlap by COPY_OVERLAP of the smaller one's positions, from
    their sketches (then `overlap` decides exactly). Errs towards yes: the estimate's margin is
    over 4 standard errors at the threshold, and sizes more than 2× apart always get the exact check."""
    small, large = sorted((a.size, b.size))
    if small == 0:
        return False
    if 2 * small < large:
        return True
    kept = min(SKETCH, len(a.members), len(b.members))
    if kept == 0:
        return True
    need = 0.6 * COPY_OVERLAP * small  # |A ∩ B| at the threshold
    common = a.members & b.members
    # The union's `kept` smallest hashes hold at most the common ones: too few common hashes decide
    # it without the union (most pairs, in O(SKETCH) set operations: R²/2 pairs a round).
    if len(common) < need / (a.size + b.size - need) * kept - 1e-9:
        return False
    union = sorted(a.members | b.members)[:kept]
    jaccard = sum(h in common for h in union) / kept
    shared = jaccard * (a.size + b.size) / (1 + jaccard)  # |A ∩ B| from the Jaccard index and the sizes
    return shared >= need


def copy_pairs(sketches: list[Sketch]) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, that `may_copy` flags, of all R²/2 at once: how many hashes each
    pair shares comes from one sparse product, and `may_copy` itself runs only on the pairs that
    count does not rule out (the same answers; at R = 1,000 the pairwise set intersections took a
    leader 12 s of a round)."""
    n = len(sketches)
    if n < 2:
        return []
    column: dict[int, int] = {}
    rows, cols = [], []
    for i, s in enumerate(sketches):
        for h in s.members:
            rows.append(i)
            cols.append(column.setdefault(h, len(column)))
    m = torch.sparse_coo_tensor(
        torch.tensor([rows, cols], dtype=torch.int64).reshape(2, -1),
        torch.ones(len(rows), dtype=torch.float64),
        (n, max(len(column), 1)),
        check_invariants=True,
    )
    with warnings.catch_warnings():  # torch says once that its sparse product goes through CSR, "in beta"
        warnings.simplefilter("ignore", UserWarning)
        common = torch.sparse.mm(m, m.t()).to_dense()
    size = torch.tensor([float(s.size) for s in sketches], dtype=torch.float64)
    held = torch.tensor([float(len(s.members)) for s in sketches], dtype=torch.float64)
    small, large = torch.minimum(size[:, None], size[None, :]), torch.maximum(size[:, None], size[None, :])
    kept = torch.clamp(torch.minimum(held[:, None], held[None, :]), max=SKETCH)
    need = 0.6 * COPY_OVERLAP * small
    total = size[:, None] + size[None, :] - need
    too_few = common < need / torch.where(total > 0, total, 1.0) * kept - 1e-6  # may_copy's first test, with room
    ruled_out = (small == 0) | ((2 * small >= large) & (kept > 0) & too_few)
    ruled_out |= torch.ones(n, n, dtype=torch.bool).tril()  # each pair once, i < j
    maybe = (~ruled_out).nonzero().tolist()
    return [(i, j) for i, j in maybe if may_copy(sketches[i], sketches[j])]


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def upper_median(values: list[float]) -> float:
    """The clip threshold: with half the contributions an attacker's (tiny ones, say), the smallest
    honest norm still sets it (the lower median would be the attacker's)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def clip_scales(summaries: list[Summary]) -> list[dict[str, float]]:
    """Per contribution, the factor for each tensor whose norm exceeds the (upper) median norm of
    that tensor over the contributions that carry it (tensors at or under it are absent: 1)."""
    by_tensor: dict[str, list[float]] = {}
    for s in summaries:
        for name, norm in s.norms.items():
            by_tensor.setdefault(name, []).append(norm)
    medians = {name: upper_median(norms) for name, norms in by_tensor.items()}
    scales = []
    for s in summaries:
        clipped = {}
        for name, norm in s.norms.items():
            if norm > medians[name] > 0:
                clipped[name] = float(medians[name] / norm)
        scales.append(clipped)
    return scales


def tiny(summaries: list[Summary]) -> list[bool]:
    """Which contributions are near zero next to the round's median one (whole-contribution norm):
    they would dilute the mean (it divides by the count) while costing their sender nothing. Needs
    three contributions."""
    return tiny_totals([math.sqrt(sum(n * n for n in s.norms.values())) for s in summaries])


def tiny_totals(totals: list[float]) -> list[bool]:
    """`tiny` over contributions' whole norms."""
    if len(totals) < 3:
        return [False] * len(totals)
    median = upper_median(totals)
    return [t < TINY_FRACTION * median for t in totals]


def clipped_norms(tensors: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, float]:
    """Per-tensor norms of a contribution after its clip factors (float64)."""
    return {n: float(torch.linalg.vector_norm(t.double())) * scales.get(n, 1.0) for n, t in tensors.items()}


TINY_FRACTION = 0.1  # a contribution this much smaller than the round's median one is a free rider

CLIP_TOLERANCE = 1e-3  # relative slack for reduction-order differences between machines


def check_clipping(norms: list[dict[str, float]]) -> str | None:
    """Why a manifest's contributions are not clipped as the rule says (None if they are): after
    its factors, no tensor of any contribution may exceed the round's median norm of that tensor.
    Every follower checks this, so a leader cannot slip in an oversized payload (its own, say)."""
    by_tensor: dict[str, list[float]] = {}
    for contribution in norms:
        for name, norm in contribution.items():
            by_tensor.setdefault(name, []).append(norm)
    for name, values in by_tensor.items():
        limit = upper_median(values) * (1 + CLIP_TOLERANCE)
        worst = max(values)
        if worst > limit and worst > 1e-30:
            return f"tensor {name} of a contribution has norm {worst:.4g} above the round's median {limit:.4g}: not clipped"
    return None


def check_scales(scales: dict[str, float], names: set[str]) -> str | None:
    """Why a manifest's clip factors are unacceptable (None if they are fine)."""
    for name, s in scales.items():
        if name not in names:
            return f"a clip factor for {name!r}, which the payload does not carry"
        if not (isinstance(s, float) and math.isfinite(s) and 0 < s <= 1):
            return f"clip factor {s!r} for {name!r} is not in (0, 1]"
    return None


# An honest round moves the weights by a few percent of their norm (`nano`, 30 inner steps: under
# 0.1 at round 0, less after); a round that would move them by their own norm or more is poison.
MAX_UPDATE_RATIO = 1.0


def check_update(params: dict[str, torch.Tensor], mean: dict[str, torch.Tensor], outer_lr: float) -> str | None:
    """Why a round's mean must not be applied (None if it may): not finite, or the step α · mean
    longer than MAX_UPDATE_RATIO times the weights it moves. Every node applying the manifest
    computes the same mean, so every honest node refuses it alike and keeps its state."""
    step_sq = weights_sq = 0.0
    for name, m in mean.items():
        if not bool(torch.isfinite(m).all()):
            return f"the round's mean of {name} is not finite"
        step_sq += float((m.double() ** 2).sum())
        weights_sq += float((params[name].double() ** 2).sum())
    step = abs(outer_lr) * math.sqrt(step_sq)
    if not math.isfinite(step) or step > MAX_UPDATE_RATIO * math.sqrt(weights_sq):
        return f"the round would move the weights by {step:.4g}, more than {MAX_UPDATE_RATIO:g} × their norm {math.sqrt(weights_sq):.4g}"
    return None
