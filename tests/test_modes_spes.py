"""SPES: the ownership rule, the expert-merge warm-up, and what a peer trains."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.moe import is_expert_parameter
from swarm.modes import mode_for
from swarm.modes.replica import Replica, initial_state
from swarm.modes.spes.experts import assign_experts, expert_neighbours, merge_alpha, merge_layer
from swarm.run import RunConfig

RUN: dict[str, Any] = dict(mode="spes", preset="moe-nano", data_source="stdlib", data_max_bytes=200_000, batch_size=2, seq_len=32)


def owners(table: dict[str, list[int]], n: int) -> list[int]:
    return [sum(e in v for v in table.values()) for e in range(n)]


def test_every_expert_is_owned_and_loads_are_equal():
    table = assign_experts(["a", "b", "c", "d"], {}, 8)
    assert table == {"a": [0, 1], "b": [2, 3], "c": [4, 5], "d": [6, 7]}
    three = assign_experts(["a", "b", "c"], {}, 8)
    assert owners(three, 8) == [1] * 8 and sorted(len(v) for v in three.values()) == [2, 3, 3]


def test_more_peers_than_experts_gives_double_owners():
    table = assign_experts([f"p{i}" for i in range(16)], {}, 8)
    assert owners(table, 8) == [2] * 8
    assert all(len(v) == 1 for v in table.values())


def test_a_dead_owners_experts_are_reassigned_and_others_keep_theirs():
    before = assign_experts(["a", "b", "c", "d"], {}, 8)
    after = assign_experts(["a", "b", "d"], before, 8)  # c died
    assert owners(after, 8) == [1] * 8
    for peer in "abd":
        assert set(before[peer]) <= set(after[peer])  # nobody loses what it had
    assert set(before["c"]) <= set(after["a"]) | set(after["b"]) | set(after["d"])


def test_a_newcomer_takes_orphaned_experts_first():
    before = assign_experts(["a", "b", "c", "d"], {}, 8)
    current = {p: v for p, v in before.items() if p != "c"}  # c's experts 4, 5 are orphans
    after = assign_experts(["a", "b", "d", "e"], current, 8)
    assert after["e"] == [4, 5]
    assert {p: after[p] for p in "abd"} == current


def test_merge_alpha_schedule():
    assert merge_alpha(0, 0.05, 1000) == pytest.approx(0.05)
    assert merge_alpha(500, 0.05, 1000) == pytest.approx(0.025)
    assert merge_alpha(1000, 0.05, 1000) == 0.0 and merge_alpha(5000, 0.05, 1000) == 0.0
    assert merge_alpha(10, 0.05, 0) == 0.0


def test_merge_uses_the_most_similar_neighbours_and_pre_merge_values():
    # Five experts in a 2-D weight space: 0, 1, 2 point one way, 3 and 4 the other.
    vecs = [[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]]
    experts = [{"w": torch.tensor(v)} for v in vecs]
    neighbours = expert_neighbours([[e["w"]] for e in experts], k=2)
    assert neighbours[0] == [1, 2] and neighbours[3] == [4, 2]
    merge_layer(experts, neighbours, alpha=0.5)
    # θ0 + 0.5·(mean(θ1, θ2) − θ0), with θ1, θ2 taken before anyone merged
    torch.testing.assert_close(experts[0]["w"], torch.tensor([0.925, 0.075]))
    torch.testing.assert_close(experts[1]["w"], torch.tensor([0.9, 0.1]))  # mean(θ0, θ2) = θ1 itself
    torch.testing.assert_close(experts[3]["w"], torch.tensor([0.225, 0.775]))  # neighbours 4 and 2


def test_outer_step_merges_identically_everywhere():
    mode = mode_for(RunConfig(**RUN, inner_steps=10, mode_options={"merge_alpha0": 0.05, "merge_steps": 100}))
    a, b = initial_state(mode.run), initial_state(mode.run)
    delta = {n: torch.full_like(t, 1e-4) for n, t in a.params.items() if n.startswith("blocks.0.")}
    mode.outer_step(a, delta)
    mode.outer_step(b, {n: t.clone() for n, t in delta.items()})
    assert a.hash == b.hash and a.round == 1
    untouched = initial_state(mode.run)
    name = "blocks.1.ffn.experts.3.w_up.weight"  # not in the delta, but the warm-up merged it
    assert not torch.equal(a.params[name], untouched.params[name])
    assert torch.equal(a.params["blocks.1.attn_norm.weight"], untouched.params["blocks.1.attn_norm.weight"])


def test_spes_peer_trains_only_dense_and_owned_experts():
    run = RunConfig(**RUN, inner_steps=2)
    mode = mode_for(run)
    role = mode.assign_roles(["me", "other"], {}, {"me": 0, "other": 1}, now=0.0)["me"]
    worker = mode.make_worker(role, torch.device("cpu"))
    assert isinstance(worker, Replica)
    work = worker.train_round(initial_state(run))
    assert work is not None
    owned = {key for n in work.delta if (key := is_expert_parameter(n)) is not None}
    assert owned == set(role.experts) and {e for _, e in owned} == {0, 1, 2, 3}
    state_ids = {id(p) for p in worker.optimizer.state}
    for name, p in worker.model.named_parameters():
        key = is_expert_parameter(name)
        trained = key is None or key in set(role.experts)
        assert (id(p) in state_ids) == trained, name
        assert p.requires_grad == trained
    assert set(work.delta) == set(mode.contribution_names(role, sorted(dict(worker.model.named_parameters()))))
    full = mode_for(RunConfig(**{**RUN, "mode": "sparseloco"})).make_worker(role, torch.device("cpu"))
    full.train_round(initial_state(run))
    assert worker.memory_bytes()["optimizer_bytes"] < full.memory_bytes()["optimizer_bytes"]


def test_a_new_role_keeps_moments_of_parameters_still_trained():
    run = RunConfig(**RUN, inner_steps=1)
    mode = mode_for(run)
    roles = mode.assign_roles(["me", "other"], {}, {"me": 0, "other": 1}, now=0.0)
    worker = mode.make_worker(roles["me"], torch.device("cpu"))
    assert isinstance(worker, Replica)
    worker.train_round(initial_state(run))
    emb = dict(worker.model.named_parameters())["tok_emb.weight"]
    moment = worker.optimizer.state[emb]["exp_avg"].clone()
    mode.update_worker(worker, roles["other"])
    assert torch.equal(worker.optimizer.state[emb]["exp_avg"], moment)
    trained_experts = {key[1] for n in worker.trained_names() if (key := is_expert_parameter(n)) is not None}
    assert trained_experts == {4, 5, 6, 7}


def test_survivors_give_back_when_a_newcomer_arrives():
    before = assign_experts(["a", "b", "c", "d"], {}, 8)
    survivors = assign_experts(["a", "b", "d"], {p: v for p, v in before.items() if p != "c"}, 8)
    after = assign_experts(["a", "b", "d", "e"], survivors, 8)
    assert owners(after, 8) == [1] * 8 and all(len(v) == 2 for v in after.values())
    assert set(after["e"]) == set(before["c"])  # the newcomer holds what the dead peer held


def test_a_peer_that_gives_back_keeps_its_oldest_experts():
    survivors = {"a": [0, 1, 4], "b": [2, 3, 5], "d": [6, 7]}  # a and b took c's 4 and 5
    after = assign_experts(["a", "b", "d", "e"], survivors, 8)
    assert after == {"a": [0, 1], "b": [2, 3], "d": [6, 7], "e": [4, 5]}
