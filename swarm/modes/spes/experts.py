"""SPES maths, free of networking: who owns which expert, and the expert-merging warm-up.

Ownership is by expert index: a peer that owns expert e owns (layer, e) in every MoE layer, so a
peer's memory and traffic are the same in every layer.
"""

from __future__ import annotations

import torch


def assign_experts(live: list[str], current: dict[str, list[int]], n_experts: int) -> dict[str, list[int]]:
    """Expert indices per live peer (oldest first).

    Every expert has an owner. With P ≤ E peers, each expert has exactly one owner and loads differ
    by at most one; with more peers than experts, each peer owns one expert and experts get two (or
    more) owners, whose slots average. Deterministic and stable: a peer keeps what it owns when its
    load allows (peers that own more keep the larger loads), experts of peers that left are orphans,
    and the peers with the fewest experts (newcomers) pick first, least-owned experts (orphans) first.
    """
    if not live:
        return {}
    # Lists are in order of acquisition: a peer that must give experts back keeps its oldest ones.
    held = {p: [e for e in dict.fromkeys(current.get(p, [])) if 0 <= e < n_experts] for p in live}
    by_holding = sorted(live, key=lambda p: (-len(held[p]), live.index(p)))
    base, extra = divmod(n_experts, len(live)) if len(live) <= n_experts else (1, 0)
    load = {p: base + (1 if i < extra else 0) for i, p in enumerate(by_holding)}
    owned = {p: held[p][: load[p]] for p in live}
    owners = [0] * n_experts
    for experts in owned.values():
        for e in experts:
            owners[e] += 1
    for peer in sorted(live, key=lambda p: (len(owned[p]), live.index(p))):
        while len(owned[peer]) < load[peer]:
            pick = min((e for e in range(n_experts) if e not in owned[peer]), key=lambda e: (owners[e], e))
            owned[peer].append(pick)
            owners[pick] += 1
    return owned


def merge_alpha(step: int, alpha0: float, horizon_steps: int) -> float:
    """α(t) = α0 · (1 − min(t / T, 1)): strong merging early, none after T inner steps."""
    return alpha0 * (1.0 - min(step / horizon_steps, 1.0)) if horizon_steps > 0 else 0.0


def expert_neighbours(experts: list[list[torch.Tensor]], k: int) -> list[list[int]]:
    """For each expert, the k most similar others by cosine of the flattened weights.

    Each expert's tensors come in a fixed (name-sorted) order. Similarities are computed pairwise
    in float64 (no E×E×D tensor) and rounded to 1e-9 before ranking, ties going to the lower index,
    so tiny reduction-order differences between machines cannot change the choice.
    """
    flat = [torch.cat([t.reshape(-1) for t in ts]).double() for ts in experts]
    norms = [f.norm().item() for f in flat]
    n = len(flat)
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            c = float(torch.dot(flat[i], flat[j]).item() / denom) if denom > 0 else 0.0
            sim[i][j] = sim[j][i] = round(c, 9)
    k = min(k, n - 1)
    return [sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i][j], j))[:k] for i in range(n)]


def merge_layer(experts: list[dict[str, torch.Tensor]], neighbours: list[list[int]], alpha: float) -> None:
    """θ_i ← θ_i + α · mean_{j∈N_i}(θ_j − θ_i), in place, every θ_j taken before any merge.

    Elementwise in a fixed order (neighbours ascending), so bit-identical on every machine.
    """
    before = [{name: t.clone() for name, t in e.items()} for e in experts]
    for i, expert in enumerate(experts):
        for name, tensor in expert.items():
            total = torch.zeros_like(tensor)
            for j in sorted(neighbours[i]):
                total.add_(before[j][name])
            mean = total.div_(len(neighbours[i]))  # mean_j θ_j, so the step is α·(mean − θ_i)
            tensor.add_(mean.sub_(before[i][name]).mul_(alpha))
