"""Encoding our pseudo-gradient and validating others': every codec of the run, and undoing a
round whose manifest left our payload out."""

from __future__ import annotations

import pytest
import torch

from swarm.codec import PayloadError
from swarm.modes import default_outer
from swarm.net.transfer import Traffic
from swarm.round.payloads import PayloadEncoder, PayloadStore
from swarm.run import RunConfig

SHAPES = {"a.weight": (64, 128), "b.bias": (100,)}


def delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 1e-2 for n, s in SHAPES.items()}


@pytest.mark.parametrize("mode,dtype", [("sparseloco", "fp32"), ("diloco", "fp32"), ("diloco", "fp16")])
def test_round_trip_through_the_store(mode, dtype):
    run = RunConfig(run_id="r", mode=mode, outer=default_outer(mode, dtype))
    encoded = PayloadEncoder(run, "peerA").encode(delta(0), round_no=3)
    decoded = PayloadStore(run, SHAPES, Traffic()).decode(encoded.data, sender="peerA", round_no=3)
    assert set(decoded) == set(SHAPES)
    if mode == "diloco":
        tol = 0 if dtype == "fp32" else 1e-5
        for n, t in delta(0).items():
            torch.testing.assert_close(decoded[n], t, rtol=1e-3 if tol else 0, atol=tol)
    else:
        assert (decoded["a.weight"] != 0).sum() == 2 * 64  # two 64x64 blocks, 64 values each


def test_store_checks_who_when_and_which_run():
    run = RunConfig(run_id="r")
    data = PayloadEncoder(run, "peerA").encode(delta(0), round_no=3).data
    store = PayloadStore(run, SHAPES, Traffic())
    store.decode(data, sender="peerA", round_no=3)  # cached now: the checks must still run
    with pytest.raises(PayloadError, match="sender"):
        store.decode(data, sender="peerB", round_no=3)
    with pytest.raises(PayloadError, match="round"):
        store.decode(data, sender="peerA", round_no=4)
    with pytest.raises(PayloadError, match="run"):
        PayloadStore(RunConfig(run_id="other"), SHAPES, Traffic()).decode(data, sender="peerA", round_no=3)
    with pytest.raises(PayloadError):
        PayloadStore(run, {"a.weight": (64, 128)}, Traffic()).decode(data, sender="peerA", round_no=3)


def test_excluded_payload_keeps_the_whole_accumulator():
    run = RunConfig(run_id="r")
    encoder = PayloadEncoder(run, "peerA")
    assert encoder.compressor is not None
    encoder.encode(delta(0), round_no=0)
    e_old = {n: t.clone() for n, t in encoder.compressor.state_dict().items()}
    encoder.encode(delta(1), round_no=1)
    encoder.excluded()  # round 1 went ahead without us: nothing of a_1 was transmitted
    for n, d in delta(1).items():
        assert torch.equal(encoder.compressor.state_dict()[n], e_old[n] * run.outer.error_decay + d)
