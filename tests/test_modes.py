"""The modes runtime: mode lookup and options, per-slot aggregation, role rules."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from swarm.codec import SlotMean
from swarm.modes import available_modes, default_outer, mode_for
from swarm.run import OuterConfig, RunConfig

SHAPES = {"a": (2, 3), "b": (4,), "c": (5,)}


def test_available_modes_are_the_files_in_swarm_modes():
    assert {"sparseloco", "diloco", "spes"} <= set(available_modes())
    assert not {"base", "experts", "replica"} & set(available_modes())


@pytest.mark.parametrize("mode", ["nope", "base", "../x", "experts", "replica"])
def test_an_unknown_mode_is_a_clear_error(mode):
    with pytest.raises(ValueError, match="unknown training mode|defines no MODE"):
        mode_for(RunConfig(mode=mode))


def test_a_knob_that_does_not_belong_to_the_mode_is_an_error():
    with pytest.raises(ValueError, match="mode 'sparseloco' has no option"):
        mode_for(RunConfig(mode="sparseloco", mode_options={"merge_alpha0": 0.1}))
    with pytest.raises(ValueError, match="outer momentum"):
        mode_for(RunConfig(mode="sparseloco", outer=OuterConfig(momentum=0.9)))
    with pytest.raises(ValueError, match="dense"):
        mode_for(RunConfig(mode="diloco", outer=OuterConfig()))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        mode_for(RunConfig(mode="spes", preset="nano"))
    with pytest.raises(ValueError, match="merge_alpha0"):
        mode_for(RunConfig(mode="spes", preset="moe-nano", mode_options={"merge_alpha0": 2.0}))
    run = RunConfig(mode="spes", preset="moe-nano", mode_options={"merge_alpha0": 0.1, "merge_neighbours": 3})
    assert mode_for(run).options.merge_neighbours == 3


def test_slot_mean_covered_by_zero_one_and_three_contributions():
    acc = SlotMean(SHAPES)
    acc.add({"a": torch.full((2, 3), 3.0), "b": torch.full((4,), 1.0)})
    acc.add({"a": torch.full((2, 3), 6.0)})
    acc.add({"a": torch.full((2, 3), 9.0)})
    assert acc.counts == {"a": 3, "b": 1}
    mean = acc.mean()
    assert set(mean) == {"a", "b"}  # c: nobody covered it, so the outer step leaves it alone
    assert torch.equal(mean["a"], torch.full((2, 3), 6.0))  # (3 + 6 + 9) / 3, not / R of the slot's peers
    assert torch.equal(mean["b"], torch.full((4,), 1.0))  # one contribution: its own value


def test_slot_mean_is_bit_identical_in_manifest_order_and_rejects_strangers():
    g = torch.Generator().manual_seed(0)
    payloads = [{"a": torch.randn(2, 3, generator=g) * 1e-3} for _ in range(5)]
    first, second = SlotMean(SHAPES), SlotMean(SHAPES)
    for p in payloads:
        first.add(p)
        second.add(p)
    assert torch.equal(first.mean()["a"], second.mean()["a"])
    with pytest.raises(ValueError, match="not a slot"):
        SlotMean(SHAPES).add({"zzz": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        SlotMean(SHAPES).add({"a": torch.zeros(3, 2)})


def test_replica_modes_give_every_live_peer_a_full_replica():
    mode = mode_for(RunConfig(mode="sparseloco"))
    roles = mode.assign_roles(["p1", "p2"], {}, {"p1": 0, "p2": 1}, now=5.0)
    assert [(r.kind, r.data_shard) for r in roles.values()] == [("replica", 0), ("replica", 1)]
    assert mode.assign_roles(["p1", "p2"], roles, {"p1": 0, "p2": 1}, now=9.0) == roles  # stable
    names = ["x", "y"]
    assert mode.contribution_names(roles["p1"], names) == names


@pytest.mark.parametrize("mode_name", ["sparseloco", "spsa", "pipeline"])
def test_a_worker_moved_to_another_shard_reads_that_shard(mode_name):
    # A peer that took a default shard while the coordinator was slow must train on the one it is
    # then given: two peers on one shard send the same update, and the copy check refuses both.
    from swarm.modes.replica import shard_stream

    outer = default_outer(mode_name)
    data = dict(data_source="stdlib", data_max_bytes=200_000, batch_size=2, seq_len=16)
    run = RunConfig(mode=mode_name, preset="nano", outer=outer, round_timeout_s=60, **data)  # type: ignore[arg-type]
    mode = mode_for(run)
    worker: Any = mode.make_worker(mode.default_role("me", 0), torch.device("cpu"))
    stream = worker.inner.stream if mode_name == "pipeline" else worker.stream
    first_of_0 = next(shard_stream(run, worker.corpus, 0))[0]
    assert torch.equal(next(stream)[0], first_of_0)
    worker.read_shard(3)
    stream = worker.inner.stream if mode_name == "pipeline" else worker.stream
    assert torch.equal(next(stream)[0], next(shard_stream(run, worker.corpus, 3))[0])
    assert not torch.equal(first_of_0, next(shard_stream(run, worker.corpus, 3))[0])


def test_h_ramps_from_its_start_to_h_and_the_lr_schedule_follows_the_steps_taken():
    run = RunConfig(inner_steps=30, inner_steps_start=10, inner_steps_ramp=4, max_rounds=6)
    assert [run.inner_steps_at(r) for r in range(7)] == [10, 15, 20, 25, 30, 30, 30]
    assert [run.steps_before(r) for r in (0, 1, 4, 5, 6)] == [0, 10, 70, 100, 130]
    assert run.total_inner_steps == 130
    flat = RunConfig(inner_steps=30, max_rounds=6)
    assert [flat.inner_steps_at(r) for r in (0, 5)] == [30, 30] and flat.total_inner_steps == 180
    for bad in ({"inner_steps_start": 10}, {"inner_steps_ramp": 3}, {"inner_steps_start": 31, "inner_steps_ramp": 3}):
        with pytest.raises(ValueError, match="inner_steps_start"):
            RunConfig(inner_steps=30, **bad)  # type: ignore[arg-type]


def test_a_replica_takes_the_rounds_h_and_starts_its_lr_schedule_where_the_earlier_rounds_left_it():
    from swarm.modes.replica import Replica, initial_state

    data = dict(data_source="stdlib", data_max_bytes=200_000, batch_size=2, seq_len=16)
    run = RunConfig(inner_steps=6, inner_steps_start=2, inner_steps_ramp=2, warmup_steps=2, max_rounds=4, **data)  # type: ignore[arg-type]
    worker = Replica(run, shard=0, device=torch.device("cpu"))
    state = initial_state(run)
    state.round = 1
    work = worker.train_round(state)
    assert work is not None and work.tokens == run.inner_steps_at(1) * 2 * 16 == 4 * 32
    assert worker.trainer.step == run.steps_before(2) == 2 + 4


def test_the_outer_lr_goes_linearly_to_its_final_value_and_the_outer_step_uses_the_rounds():
    outer = OuterConfig(outer_lr=2.0, outer_lr_final=1.0)
    run = RunConfig(max_rounds=4, outer=outer)
    assert [run.outer_at(r).outer_lr for r in (0, 1, 2, 4, 9)] == [2.0, 1.75, 1.5, 1.0, 1.0]
    assert RunConfig(max_rounds=0, outer=outer).outer_at(3).outer_lr == 2.0  # open-ended: no horizon, constant
    assert RunConfig(max_rounds=4).outer_at(3) == RunConfig().outer
    mode = mode_for(run)
    from swarm.state import GlobalState

    state = GlobalState(round=2, params={"w": torch.zeros(3)})
    mode.outer_step(state, {"w": torch.ones(3)})
    assert torch.equal(state.params["w"], torch.full((3,), -1.5)) and state.round == 3
    with pytest.raises(ValueError, match="outer_lr_final"):
        OuterConfig(outer_lr_final=-1.0)
