"""Shared-seed SPSA maths: seeds, the one-byte codec, exact perturb/restore, the two-point estimate,
clipping and replay (swarm/modes/spsa/)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from swarm.modes.spsa.perturb import load_perturbed, two_point
from swarm.modes.spsa.replay import RoundScalars, apply_scalars, clip_scalars
from swarm.modes.spsa.scalar import decode_scalar, decode_scalars, encode_scalar, encode_scalars
from swarm.modes.spsa.seeds import direction, direction_seed
from swarm.state import NonFiniteUpdateError

SCALE = 8.0


# ----- seeds ---------------------------------------------------------------------------------------


def test_seeds_are_collision_free_over_a_large_sweep():
    peers = [f"Qm{i:04d}" for i in range(40)] + ["1", "12", "2", "21"]  # ids that concatenate alike
    seeds = {direction_seed("run-a", r, p, k) for r in range(100) for p in peers for k in range(24)}
    assert len(seeds) == 100 * len(peers) * 24
    assert direction_seed("run-a", 1, "12", 3) != direction_seed("run-a", 11, "2", 3)
    assert direction_seed("run-a", 0, "p", 0) != direction_seed("run-b", 0, "p", 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_seeds_and_directions_are_identical_across_processes():
    code = (
        "from swarm.modes.spsa.seeds import direction, direction_seed\n"
        "s = direction_seed('run-x', 7, 'QmPeer', 3)\n"
        "print(s, direction(s, 'w', (5, 3)).numpy().tobytes().hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seed = direction_seed("run-x", 7, "QmPeer", 3)
    assert int(out[0]) == seed
    assert out[1] == direction(seed, "w", (5, 3)).numpy().tobytes().hex()


def test_directions_differ_per_tensor_and_are_standard_normal():
    seed = direction_seed("run", 0, "p", 0)
    a, b = direction(seed, "a", (200, 200)), direction(seed, "b", (200, 200))
    assert not torch.equal(a, b)
    assert torch.equal(a, direction(seed, "a", (200, 200)))
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02


# ----- the one-byte codec --------------------------------------------------------------------------


def test_codec_round_trip_within_half_a_level():
    for x in [SCALE * 2.0**e for e in torch.linspace(-15.5, 0, 97).tolist()]:
        for v in (x, -x):
            y = decode_scalar(encode_scalar(v, SCALE), SCALE)
            assert math.copysign(1, y) == math.copysign(1, v)
            assert abs(math.log2(abs(y) / abs(v))) <= 1 / 16 + 1e-12  # half of a 1/8-octave level


def test_codec_saturates_zeroes_and_rejects_non_finite():
    assert decode_scalar(encode_scalar(1e9, SCALE), SCALE) == SCALE
    assert decode_scalar(encode_scalar(-1e9, SCALE), SCALE) == -SCALE
    assert encode_scalar(0.0, SCALE) == 0 and encode_scalar(-1e-30, SCALE) == 0
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            encode_scalar(bad, SCALE)


def test_codec_is_monotonic_and_every_byte_is_well_formed():
    xs = torch.linspace(-2 * SCALE, 2 * SCALE, 20001).tolist()
    ys = [decode_scalar(encode_scalar(x, SCALE), SCALE) for x in xs]
    assert all(a <= b for a, b in itertools.pairwise(ys))
    values = decode_scalars(bytes(range(256)), SCALE)
    assert all(math.isfinite(v) and abs(v) <= SCALE for v in values)
    for b in range(256):
        if b != 0x80:  # the encoder never writes a negative zero
            assert encode_scalars([values[b]], SCALE) == bytes([b])
    assert values[0x80] == 0.0


# ----- perturb and restore -------------------------------------------------------------------------


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw + bᵀw, whose central difference is the directional derivative ∇L·z exactly."""

    def __init__(self, n: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        m = torch.randn(n, n, generator=gen)
        self.a = m @ m.T / n + torch.eye(n)  # plain tensors: not parameters, never perturbed
        self.b = torch.randn(n, generator=gen)
        self.w = nn.Parameter(torch.randn(n, generator=gen))

    def loss(self) -> float:
        w = self.w.double()
        return float(0.5 * w @ self.a.double() @ w + self.b.double() @ w)

    def grad(self) -> torch.Tensor:
        return self.a @ self.w.detach() + self.b


def test_two_point_estimate_is_the_directional_derivative_on_a_quadratic():
    model = Quadratic(64)
    master = {"w": model.w.detach().clone()}
    for sample in range(5):
        seed = direction_seed("run", 0, "p", sample)
        g, plus, minus = two_point(model, master, seed, 1e-2, model.loss)
        exact = float(model.grad() @ direction(seed, "w", (64,)))
        assert g == pytest.approx(exact, rel=2e-3, abs=2e-3)
        assert plus != minus


def test_perturb_restore_leaves_fp32_weights_bit_identical():
    from models import build_model, get_preset

    model = build_model(get_preset("nano"), seed=1)
    master = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in master.items()}
    tokens = torch.randint(0, 260, (2, 33), generator=torch.Generator().manual_seed(0))
    model.eval()

    def loss() -> float:
        return float(model(tokens[:, :-1], tokens[:, 1:]).lm_loss)

    g, plus, minus = two_point(model, master, direction_seed("run", 3, "p", 1), 1e-3, loss)
    assert math.isfinite(g) and plus != minus
    for name, param in model.named_parameters():
        assert torch.equal(master[name], before[name]), f"master {name} changed"
        assert torch.equal(param.detach(), before[name]), f"model {name} not restored exactly"
    load_perturbed(model, master, direction_seed("run", 3, "p", 1), 1e-3)
    assert not torch.equal(dict(model.named_parameters())["tok_emb.weight"].detach(), before["tok_emb.weight"])


# ----- clipping and replay -------------------------------------------------------------------------


def test_clip_to_a_multiple_of_the_median_magnitude():
    assert clip_scalars([1.0, -2.0, 3.0, 0.0, -1000.0], 4.0) == [1.0, -2.0, 3.0, 0.0, -10.0]  # median |g| = 2.5
    assert clip_scalars([0.0, 0.0], 4.0) == [0.0, 0.0]


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(16, 8, generator=gen), "norm": torch.ones(8)}


def test_replay_applies_the_mean_update_in_manifest_order_bit_identically():
    scalars = RoundScalars("run", 4, [("p1", [0.5, -1.0]), ("p2", [2.0, 0.0])])
    one, two = _params(), _params()
    assert apply_scalars(one, scalars, lr=0.1) == 4
    apply_scalars(two, scalars, lr=0.1)
    assert all(torch.equal(one[n], two[n]) for n in one)
    expected = _params()
    for name, t in expected.items():
        update = sum(g * direction(seed, name, t.shape) for seed, g in scalars.terms())
        t -= 0.1 * update / 4
        assert torch.allclose(one[name], t, atol=1e-6)
    untouched = _params()
    assert apply_scalars(untouched, RoundScalars("run", 4, []), lr=0.1) == 0
    assert all(torch.equal(untouched[n], _params()[n]) for n in untouched)


def test_replay_weight_decay_skips_listed_tensors_and_non_finite_changes_nothing():
    params = _params()
    apply_scalars(params, RoundScalars("run", 0, [("p", [0.0])]), lr=0.1, weight_decay=0.5, no_decay=frozenset({"norm"}))
    assert torch.allclose(params["a.weight"], _params()["a.weight"] * 0.95)
    assert torch.equal(params["norm"], torch.ones(8))
    with pytest.raises(NonFiniteUpdateError):
        apply_scalars(params, RoundScalars("run", 0, [("p", [math.inf])]), lr=0.1)
    assert torch.allclose(params["a.weight"], _params()["a.weight"] * 0.95)
