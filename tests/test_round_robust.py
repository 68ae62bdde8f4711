"""Robust aggregation: clipping to the median norm, zero updates, copies by selected positions."""

from __future__ import annotations

import torch

from swarm.codec import SlotMean
from swarm.round.robust import (
    alignments,
    check_clipping,
    check_scales,
    clip_scales,
    clipped_norms,
    lower_median,
    misaligned,
    overlap,
    summarise,
    upper_median,
)

SHAPES = {"w": (4, 4)}


def sparse(seed: int, scale: float = 1.0, positions: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(16)
    idx = torch.tensor(positions) if positions is not None else torch.randperm(16, generator=g)[:4]
    t[idx] = torch.randn(len(idx), generator=g) * scale
    return {"w": t.reshape(4, 4)}


def test_lower_median_is_an_element_of_the_list():
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0


def test_a_huge_contribution_is_clipped_to_the_upper_median_norm():
    honest = [sparse(i) for i in range(3)]
    attacker = {"w": honest[0]["w"] * -1000}
    summaries = [summarise(c, sparse=True) for c in [*honest, attacker]]
    scales = clip_scales(summaries)
    median = upper_median([s.norms["w"] for s in summaries])
    assert "w" in scales[3] and 0 < scales[3]["w"] < 1e-2
    clipped = float(torch.linalg.vector_norm(attacker["w"] * scales[3]["w"]))
    assert abs(clipped - median) < 1e-4 * median
    assert all(not s or s["w"] <= 1 for s in scales[:3])


def test_clipped_mean_stays_near_the_honest_mean():
    honest = [{"w": torch.full((4, 4), 1e-3) + 1e-4 * i} for i in range(3)]
    poisoned = [*honest, {"w": honest[0]["w"] * -1000}]
    scales = clip_scales([summarise(c, sparse=False) for c in poisoned])
    acc = SlotMean(SHAPES)
    for c, s in zip(poisoned, scales):
        acc.add(c, s)
    mean = acc.mean()["w"]
    assert bool((mean > 0).all()), "one flipped contribution must not reverse the update"
    plain = (honest[0]["w"] + honest[1]["w"] + honest[2]["w"] + poisoned[3]["w"]) / 4
    assert bool((plain < 0).all())  # what the plain mean would have done


def test_zero_update_and_overlap():
    assert summarise({"w": torch.zeros(4, 4)}, sparse=True).is_zero
    a = summarise(sparse(0, positions=[0, 1, 2, 3]), sparse=True)
    b = summarise(sparse(1, positions=[0, 1, 2, 9]), sparse=True)
    c = summarise(sparse(2, positions=[10, 11, 12, 13]), sparse=True)
    assert overlap(a, b) == 0.75 and overlap(a, c) == 0.0


def test_scale_checks():
    assert check_scales({"w": 0.5}, {"w"}) is None
    assert "not in (0, 1]" in str(check_scales({"w": 1.5}, {"w"}))
    assert "not in (0, 1]" in str(check_scales({"w": float("nan")}, {"w"}))
    assert "does not carry" in str(check_scales({"x": 0.5}, {"w"}))


def test_a_sign_flip_and_noise_point_away_from_the_others():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(64, generator=g)
    honest = [{"v": (common + 2 * torch.randn(64, generator=g)).reshape(8, 8)} for _ in range(3)]
    flipped = {"v": (common + 2 * torch.randn(64, generator=g)).reshape(8, 8) * -1000}  # its own update, flipped
    noise = {"v": torch.randn(8, 8, generator=g) * 1000}
    for attacker in (flipped, noise):
        summaries = [summarise(c, sparse=False) for c in [*honest, attacker]]
        scores = alignments(summaries, clip_scales(summaries))
        assert all(s > 0 for s in scores[:3]), scores
        assert misaligned(scores) == [False, False, False, True], scores
    assert misaligned([0.1, 0.2]) == [False, False]  # too few to tell


def test_followers_catch_a_leader_that_did_not_clip():
    honest = [sparse(i) for i in range(3)]
    contributions = [*honest, {"w": honest[0]["w"] * -1000}]
    summaries = [summarise(c, sparse=True) for c in contributions]
    scales = clip_scales(summaries)
    assert check_clipping([clipped_norms(c, s) for c, s in zip(contributions, scales)]) is None
    unclipped = [clipped_norms(c, {}) for c in contributions]
    assert "not clipped" in str(check_clipping(unclipped))


def test_half_the_contributions_tiny_neither_set_the_clip_nor_pass_as_work():
    """Three honest and three × 0.01: the clip threshold is still an honest norm, and the tiny ones
    are refused as contributing next to nothing (they would dilute the mean)."""
    from swarm.round.robust import tiny

    honest = [sparse(i) for i in range(3)]
    shrunk = [{"w": c["w"] * 0.01} for c in honest]
    summaries = [summarise(c, sparse=True) for c in [*honest, *shrunk]]
    scales = clip_scales(summaries)
    smallest_honest = min(s.norms["w"] for s in summaries[:3])
    clipped = [s.norms["w"] * scale.get("w", 1.0) for s, scale in zip(summaries[:3], scales[:3])]
    assert all(c >= smallest_honest * (1 - 1e-6) for c in clipped), "honest work is clipped to an honest norm at most"
    assert tiny(summaries) == [False, False, False, True, True, True]


def test_the_copy_checks_sketch_never_skips_a_copy_and_skips_unrelated_pairs():
    """The first pass of the copy check (`may_copy` on bottom-k sketches) decides which pairs get
    the exact comparison: every pair at or above COPY_OVERLAP must pass it, whatever the sizes;
    pairs with honest overlaps (under 10%) should not, or it saves nothing."""
    import torch

    from swarm.round.robust import COPY_OVERLAP, Summary, may_copy, overlap, sketch

    g = torch.Generator().manual_seed(7)
    numel = 200_000

    def payload(positions: torch.Tensor) -> Summary:
        dense = torch.zeros(numel)
        dense[positions] = 1.0
        return summarise({"w": dense.reshape(400, 500)}, sparse=True)

    def pick(n: int) -> torch.Tensor:
        return torch.randperm(numel, generator=g)[:n]

    caught = skipped = 0
    for trial in range(40):
        k = 3000
        victim = pick(k)
        share = [0.6, 0.65, 0.8, 1.0][trial % 4]
        size = [k, k // 2 + 1, 2 * k, k][trial % 4]  # a copier may send fewer or more entries
        copied = victim[torch.randperm(k, generator=g)[: int(share * min(size, k))]]
        own = pick(size)
        mixed = torch.unique(torch.cat([copied, own[: size - copied.numel()]]))
        a, b = payload(victim), payload(mixed)
        if overlap(a, b) >= COPY_OVERLAP:
            assert may_copy(sketch(a), sketch(b)), f"trial {trial}: a copy skipped"
            caught += 1
        honest = payload(pick(k))
        if not may_copy(sketch(a), sketch(honest)):
            skipped += 1
    assert caught >= 20 and skipped == 40


def test_the_sketch_checks_set_shortcut_decides_as_the_whole_union_does():
    """`may_copy` rejects a pair from the count of hashes its two sketches share before it builds
    their union's bottom-k (the count bounds what the union can hold); the shortcut must never
    change a decision. The reference below is the union computation alone."""
    import random

    import torch

    from swarm.round.robust import COPY_OVERLAP, SKETCH, Sketch, may_copy, sketch

    def reference(a: Sketch, b: Sketch) -> bool:
        small, large = sorted((a.size, b.size))
        if small == 0:
            return False
        if 2 * small < large:
            return True
        ha, hb = (torch.tensor(sorted(x.members), dtype=torch.int64) for x in (a, b))
        union = torch.unique(torch.cat([ha, hb]))[: min(SKETCH, ha.numel(), hb.numel())]
        both = torch.isin(union, ha) & torch.isin(union, hb)
        jaccard = float(both.sum()) / union.numel()
        return jaccard * (a.size + b.size) / (1 + jaccard) >= 0.6 * COPY_OVERLAP * small

    rng = random.Random(3)
    decided = {True: 0, False: 0}
    for _ in range(600):
        numel = rng.choice([500, 5000, 50_000])
        k = rng.randint(1, numel // 8)
        first = rng.sample(range(numel), k)
        share = rng.uniform(0.0, 0.8)  # from unrelated to mostly a copy, around the threshold
        kept = [p for p in first if rng.random() < share]
        second = kept + rng.sample(range(numel), max(1, k - len(kept)))  # about as many positions

        def one(positions: list[int], numel: int = numel) -> Sketch:
            dense = torch.zeros(numel)
            dense[sorted(set(positions))] = 1.0
            return sketch(summarise({"w": dense}, sparse=True))

        a, b = one(first), one(second)
        expected = reference(a, b)
        assert may_copy(a, b) == expected
        decided[expected] += 1
    assert min(decided.values()) > 50, decided


def test_the_copy_checks_pairs_at_once_are_the_pairs_may_copy_flags_one_by_one():
    """`copy_pairs` rules most pairs out from one sparse product of the sketches; it must flag
    exactly the pairs that `may_copy` flags when called on every pair (sizes apart, empty ones,
    copies, partial copies and unrelated ones mixed)."""
    import random

    import torch

    from swarm.round.robust import Sketch, copy_pairs, may_copy, sketch

    rng = random.Random(5)
    numel = 20_000

    def one(positions: list[int]) -> Sketch:
        dense = torch.zeros(numel)
        if positions:
            dense[sorted(set(positions))] = 1.0
        return sketch(summarise({"w": dense}, sparse=True))

    flagged = 0
    for _ in range(6):
        bases = [rng.sample(range(numel), rng.choice([40, 300, 3000])) for _ in range(4)]
        sketches = [Sketch(frozenset(), 0)]
        for _ in range(40):
            base = rng.choice(bases)
            share = rng.choice([0.0, 0.2, 0.5, 0.7, 1.0])
            size = rng.choice([len(base), len(base) // 3 + 1, 2 * len(base)])
            kept = [p for p in base if rng.random() < share][:size]
            sketches.append(one(kept + rng.sample(range(numel), max(0, size - len(kept)))))
        brute = [(i, j) for i in range(len(sketches)) for j in range(i + 1, len(sketches)) if may_copy(sketches[i], sketches[j])]
        assert copy_pairs(sketches) == brute
        flagged += len(brute)
    assert flagged > 100
    assert copy_pairs([]) == [] and copy_pairs([sketches[1]]) == []
