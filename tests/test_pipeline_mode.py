"""The pipeline mode without networking: roles, slots, incomplete groups, the projected outer step."""

from __future__ import annotations

import pytest
import torch

from models import build_model, split_stages
from swarm.modes import default_outer, mode_for
from swarm.modes.pipeline.groups import balance_layers, incomplete_groups, plan_roles
from swarm.modes.pipeline.mode import PipelineMode
from swarm.modes.replica import initial_state, model_config
from swarm.net.records import Capacity, Role
from swarm.run import RunConfig


def _caps(weak: list[str], full: list[str], speeds: dict[str, float] | None = None) -> dict[str, Capacity]:
    speeds = speeds or {}
    caps = {p: Capacity(p, p, "cpu", 0.001, speeds.get(p, 100.0)) for p in weak}
    caps.update({p: Capacity(p, p, "cpu", 64.0, speeds.get(p, 100.0)) for p in full})
    return caps


def _plan(
    live: list[str], current: dict[str, Role], caps: dict[str, Capacity], stages: int = 2, n_layers: int = 4
) -> dict[str, Role]:
    shards = {p: i for i, p in enumerate(sorted(caps))}
    return plan_roles(live, current, shards, caps, stages=stages, n_layers=n_layers, weak_below_gb=1.0, now=1.0)


def test_balance_layers_by_speed():
    assert balance_layers(6, [1.0, 1.0]) == [3]
    assert balance_layers(6, [1.0, 1.0, 1.0]) == [2, 4]
    assert balance_layers(6, [3.0, 1.0]) == [5]  # the faster stage takes more blocks (5/3 < 2/1)
    assert balance_layers(4, [100.0, 1.0]) == [3]  # every stage keeps at least one
    with pytest.raises(ValueError):
        balance_layers(2, [1.0, 1.0, 1.0])


def test_weak_peers_form_groups_full_peers_replicas_and_the_rest_wait():
    caps = _caps(weak=["w1", "w2", "w3"], full=["f1", "f2"])
    live = ["f1", "w1", "f2", "w2", "w3"]
    roles = _plan(live, {}, caps)
    assert [roles[p].kind for p in live] == ["replica", "stage", "replica", "stage", "observer"]
    assert roles["w1"].stage == 0 and roles["w2"].stage == 1 and roles["w1"].group_peers == ["w1", "w2"]
    assert roles["w1"].data_shard == roles["w2"].data_shard  # a group reads one shard
    assert roles["w1"].layer_cuts == [2]
    assert _plan(live, roles, caps) == roles  # stable when nothing changes


def test_a_dead_stage_is_filled_by_a_spare_or_the_group_waits_for_one():
    caps = _caps(weak=["w1", "w2", "w3", "w4"], full=["f1"], speeds={"w3": 300.0})
    roles = _plan(["f1", "w1", "w2", "w3"], {}, caps)
    after = _plan(["f1", "w1", "w3"], roles, caps)  # w2 (stage 1) died; w3 was waiting
    assert after["w3"].kind == "stage" and after["w3"].stage == 1 and after["w3"].replica_group == roles["w1"].replica_group
    assert after["w1"].group_peers == ["w1", "w3"] and after["w1"].data_shard == roles["w1"].data_shard
    # The newcomer takes the dead stage's layers, although faster: the survivor keeps its part.
    assert after["w1"].layer_cuts == roles["w1"].layer_cuts == [2]
    alone = _plan(["f1", "w1"], after, caps)  # no spare, no group to form: the group waits as it is
    assert alone["w1"] is after["w1"]
    filled = _plan(["f1", "w1", "w4"], alone, caps)  # a newcomer fills it
    assert filled["w4"].stage == 1 and filled["w1"].group_peers == ["w1", "w4"] and filled["w1"].layer_cuts == [2]


def test_broken_groups_whose_survivors_can_form_a_whole_group_are_dissolved():
    caps = _caps(weak=[f"w{i}" for i in range(6)], full=[])
    roles = _plan([f"w{i}" for i in range(6)], {}, caps, stages=3, n_layers=6)
    assert roles["w0"].group_peers == ["w0", "w1", "w2"] and roles["w3"].group_peers == ["w3", "w4", "w5"]
    after = _plan(["w0", "w1", "w3"], roles, caps, stages=3, n_layers=6)  # w2 and w4, w5 died
    assert {after[p].kind for p in ("w0", "w1", "w3")} == {"stage"} and after["w0"].group_peers == ["w0", "w1", "w3"]


def test_incomplete_groups_sit_out_together():
    caps = _caps(weak=["w1", "w2"], full=["f1"])
    roles = _plan(["f1", "w1", "w2"], {}, caps)
    assert incomplete_groups(roles) == {}
    missing = incomplete_groups({p: roles[p] for p in ("f1", "w1")})
    assert list(missing) == ["w1"] and "incomplete" in missing["w1"]


def _run(**options: int | float | bool | str) -> RunConfig:
    outer = default_outer("pipeline")
    return RunConfig(mode="pipeline", mode_options=options, preset="nano", round_timeout_s=60, outer=outer)


def test_stage_slots_cover_the_model_once():
    run = _run()
    mode = mode_for(run)
    caps = _caps(weak=["w1", "w2"], full=["f1"])
    roles = _plan(["f1", "w1", "w2"], {}, caps)
    names = sorted(n for n, _ in build_model(model_config(run)).named_parameters())
    first, second = (set(mode.contribution_names(roles[p], names)) for p in ("w1", "w2"))
    assert first & second == set() and first | second == set(names)
    assert "tok_emb.weight" in first and "head.weight" in second and "blocks.1.attn.qkv.weight" in first
    assert mode.contribution_names(roles["f1"], names) == names
    assert mode.contribution_names(Role("s", "observer", 0), names) == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratio": 0}, "ratio"),
        ({"stages": 1}, "stages"),
        ({"stages": 5}, "cannot be split"),
        ({"wire_dtype": "int4"}, "wire_dtype"),
        ({"link_timeout_s": 90.0}, "round_timeout_s"),
        ({"embedding_drift": "keep"}, "embedding_drift"),
        ({"full_replicas": "sometimes"}, "full_replicas"),
        ({"nope": 1}, "no option"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        mode_for(_run(**options))


@pytest.mark.parametrize("drift", ["fold", "project"])
def test_outer_step_keeps_the_global_weights_in_the_subspace(drift):
    run = _run(ratio=8, embedding_drift=drift)
    mode = mode_for(run)
    state = initial_state(run)
    mean = {n: torch.randn_like(t) * 1e-3 for n, t in state.params.items()}
    mode.outer_step(state, mean)
    model = build_model(model_config(run))
    mode.prepare_model(model)
    state.load_into(model)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    assert isinstance(mode, PipelineMode) and mode.subspace is not None
    sub = mode.subspace
    e = state.params["tok_emb.weight"]
    off_span = e - (e @ sub.U) @ sub.U.T
    if drift == "fold":  # the off-span change of E survives the outer step, and the link folds it in
        assert off_span.abs().max() > 1e-4
    else:
        assert off_span.abs().max() < 1e-6
    sub.begin_round(e)
    first, second = split_stages(model, [2])
    with torch.no_grad():
        composed = second(sub.expand(sub.compress(first(tokens), tokens), tokens))
        assert torch.allclose(model(tokens).logits, composed, atol=1e-4)


@pytest.mark.parametrize("way", ["writers", "stage", "free"])
def test_what_a_full_replica_holds_in_span_u_while_it_trains(way):
    from models.subspace import writer_names

    outer = default_outer("pipeline")
    run = RunConfig(
        mode="pipeline",
        mode_options={"ratio": 8, "full_replicas": way},
        preset="nano",
        round_timeout_s=60,
        outer=outer,
        data_source="stdlib",
        data_max_bytes=200_000,
        batch_size=2,
        seq_len=16,
        inner_steps=3,
        warmup_steps=1,
    )
    mode = mode_for(run)
    assert isinstance(mode, PipelineMode) and mode.subspace is not None
    sub, layers = mode.subspace, mode.cfg.n_layers
    state = initial_state(run)
    mode.outer_step(state, {})  # θ(0) as the swarm holds it: writers in span(U)
    worker = mode.make_worker(mode.default_role("me", 0), torch.device("cpu"))
    work = worker.train_round(state)
    assert work is not None
    u = sub.U.double()
    params = dict(worker.model.named_parameters())

    def off_span_rows(w: torch.Tensor) -> float:  # the part of the output side outside span(U)
        w = w.detach().double()
        return float((w - u @ (u.T @ w)).abs().max())

    writers_off = max(off_span_rows(params[n]) for n in writer_names(layers))
    e_start, e_now = state.params["tok_emb.weight"].double(), params["tok_emb.weight"].detach().double()
    e_moved_off = float(((e_now - e_start) - ((e_now - e_start) @ u) @ u.T).abs().max())
    if way == "free":
        assert writers_off > 1e-4 and e_moved_off > 1e-4  # it learns every direction; the outer step projects
    else:
        assert writers_off < 1e-5  # its writers stay in span(U) after every step
        if way == "writers":
            assert e_moved_off > 1e-4  # the embedding learns all d directions (its change folds)
        else:
            assert e_moved_off < 1e-5  # as a stage: E's off-span part fixed for the round
    for name in writer_names(layers):  # what it sends survives the outer step: no off-span writer change
        assert off_span_rows(work.delta[name]) < 1e-5, name
