"""The maths of one-step-delayed outer updates (swarm/round/overlap.py), without the network.

The in-process simulator of `swarm-bench quality` runs the swarm's own replica, encoder, wire
format, per-slot mean and outer step; each simulated replica applies every round to its own copy
of the agreed state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from launch.benchmarks.quality import simulate
from launch.cluster import NANO_RUN
from swarm.codec import SparseLoCoCompressor
from swarm.data.corpus import load_corpus
from swarm.modes import mode_for
from swarm.modes.replica import data_config
from swarm.round.overlap import next_base
from swarm.round.payloads import PayloadEncoder, codec_config
from swarm.run import OuterConfig, RunConfig
from swarm.state import GlobalState


def tiny_run(mode: str = "sparseloco", **outer: object) -> RunConfig:
    fields = {k: v for k, v in NANO_RUN.items() if k in {f.name for f in dataclasses.fields(RunConfig)}}
    fields.update(
        mode=mode, inner_steps=2, warmup_steps=2, batch_size=2, seq_len=32, max_rounds=2, eval_batches=1, run_id="overlap"
    )
    fields["model_overrides"] = {"n_layers": 1}
    return RunConfig(**fields, outer=OuterConfig(**outer))  # type: ignore[arg-type]


def test_next_base_is_the_outer_step_with_our_payload_on_a_copy() -> None:
    run = tiny_run(outer_lr=0.7)
    mode = mode_for(run)
    theta = GlobalState(round=4, params={"a": torch.arange(4.0), "b": torch.ones(3)})
    own = {"a": torch.full((4,), 0.5)}  # a contribution that covers "a" only (an SPES peer, say)
    base = next_base(theta, own, mode)
    assert base.round == 5
    assert torch.equal(base.params["a"], torch.arange(4.0) - 0.5 * 0.7)
    assert torch.equal(base.params["b"], torch.ones(3))
    assert theta.round == 4 and torch.equal(theta.params["a"], torch.arange(4.0))
    theta.params["a"].sub_(100.0)  # the agreed state advancing in place must not move the base
    theta.params["b"].sub_(100.0)
    assert torch.equal(base.params["a"], torch.arange(4.0) - 0.5 * 0.7)
    assert torch.equal(base.params["b"], torch.ones(3))


@pytest.mark.parametrize(
    ("mode", "outer"),
    [("sparseloco", {"outer_lr": 0.7}), ("diloco", {"codec": "dense-fp32", "outer_lr": 0.7, "momentum": 0.9, "nesterov": True})],
)
def test_delayed_rounds_keep_replicas_identical(mode: str, outer: dict) -> None:
    """Every replica computes the same agreed state each round, and the delay really changes what
    the payloads hold (the overlapped run ends elsewhere than the synchronous one)."""
    run = tiny_run(mode, **outer)
    corpus = load_corpus(data_config(run))
    overlapped = simulate(dataclasses.replace(run, outer=dataclasses.replace(run.outer, overlap=True)), 2, corpus=corpus)
    in_step = simulate(dataclasses.replace(run, outer=dataclasses.replace(run.outer, overlap=False)), 2, corpus=corpus)
    for round_hashes in overlapped.hashes + in_step.hashes:
        assert len(set(round_hashes)) == 1
    assert overlapped.hashes[0] == in_step.hashes[0]  # round 0 trains from θ(0) either way
    assert overlapped.hashes[-1] != in_step.hashes[-1]
    assert torch.isfinite(torch.tensor(overlapped.eval_loss))


def test_error_feedback_with_delayed_manifest() -> None:
    """Round r+1 is trained before round r's manifest is known; the peer restores an excluded
    payload's error buffer before encoding round r+1, which must give exactly the payload of a peer
    whose buffer held all of round r's accumulated update: e = β·e_old + Δ_r."""
    run = tiny_run(codec="sparseloco", error_decay=0.9)
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)} for _ in range(3)]
    peer = PayloadEncoder(run, "peer")
    peer.encode(deltas[0], 0)
    included_1 = peer.encode(deltas[1], 1)  # round 0 applied with our payload in it
    peer.excluded()  # the manifest of round 1, read after round 2's inner steps, left us out
    got = peer.encode(deltas[2], 2)

    ref = SparseLoCoCompressor(codec_config(run))
    ref.compress("w", deltas[0]["w"])
    ref.compress("b", deltas[0]["b"])
    e0 = ref.state_dict()  # the buffer after an applied round 0
    expected = {n: e0[n].mul(0.9).add_(deltas[1][n]) for n in e0}  # round 1 not transmitted
    replay = PayloadEncoder(run, "peer")
    assert replay.compressor is not None
    replay.compressor.load_state_dict(expected)
    assert replay.encode(deltas[2], 2).data == got.data
    assert got.data != included_1.data


def test_the_default_sparseloco_settings_train_identical_replicas_and_beat_the_start() -> None:
    """The settings users get (`default_outer`: error decay, α and its schedule, overlap) at a
    seconds-long size: every replica holds the same state every round, and the swarm learns."""
    from swarm.modes import default_outer

    run = dataclasses.replace(tiny_run(), outer=default_outer("sparseloco"), max_rounds=4)
    corpus = load_corpus(data_config(run))
    result = simulate(run, 2, corpus=corpus, eval_every=2)
    assert all(len(set(round_hashes)) == 1 for round_hashes in result.hashes)
    from swarm.modes.replica import Replica, initial_state

    untrained = Replica(run, shard=0, device=torch.device("cpu"), corpus=corpus).evaluate(initial_state(run))
    assert result.eval_loss < untrained
    assert [r for r, _ in result.curve] == [2, 4]


def test_a_second_compression_of_the_mean_applies_one_payloads_density_and_returns_the_rest() -> None:
    """Issue 21's aggregate (the round's mean compressed again, `reduce=topk`): what is applied has
    at most one payload's density, replicas stay identical, and each sender's values at the
    coordinates that dropped wait in its error buffer."""
    from launch.benchmarks.quality import second_compression
    from swarm.net.transfer import Traffic
    from swarm.round.payloads import PayloadStore

    run = tiny_run(outer_lr=2.0)
    torch.manual_seed(0)
    shapes = {"w": (64, 64), "b": (64,)}
    encoders = [PayloadEncoder(run, f"sim-{i}") for i in range(4)]
    store = PayloadStore(run, shapes, Traffic())
    deltas = [{n: torch.randn(s) for n, s in shapes.items()} for _ in encoders]
    payloads = [(enc.sender, enc.encode(d, 0).data) for enc, d in zip(encoders, deltas)]
    before = [enc.compressor.state_dict() for enc in encoders if enc.compressor is not None]
    applied = second_compression(run, shapes, store, payloads, encoders, 0)
    k = codec_config(run).topk_per_chunk
    assert int((applied["w"] != 0).sum()) <= k  # one 64 x 64 chunk: one payload's top-k
    own = store.decode(payloads[0][1], sender="sim-0", round_no=0)
    after = encoders[0].compressor.state_dict() if encoders[0].compressor is not None else {}
    returned = after["w"] - before[0]["w"]
    assert torch.equal(returned, own["w"] * (applied["w"] == 0))  # exactly its dropped values
    assert int((returned != 0).sum()) > 0

    corpus = load_corpus(data_config(run))
    result = simulate(dataclasses.replace(run, max_rounds=3), 2, corpus=corpus, reduce="topk")
    assert all(len(set(round_hashes)) == 1 for round_hashes in result.hashes)
