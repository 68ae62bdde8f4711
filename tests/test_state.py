"""The global state: outer steps, hashing, and the state-transfer format."""

from __future__ import annotations

import pytest
import torch

from swarm.modes import default_outer
from swarm.net.records import Heartbeat, Phase
from swarm.processes.statesync import (
    StateError,
    StateSnapshot,
    _split_work,
    build_index,
    parse_index,
    pick_donors,
    split_chunk,
)
from swarm.run import OuterConfig
from swarm.state import GlobalState, NonFiniteUpdateError, load_state, save_state


def make_state(seed: int = 0) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    params = {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(5, generator=g)}
    return GlobalState(round=3, params=dict(sorted(params.items())))


def test_sparseloco_outer_step_applies_alpha_once():
    state = make_state()
    before = state.copy()
    delta = {n: torch.full_like(t, 0.5) for n, t in state.params.items()}
    state.apply_outer_step(delta, OuterConfig(outer_lr=0.8))
    for n in state.params:
        assert torch.equal(state.params[n], before.params[n] - 0.8 * 0.5)
    assert state.round == 4 and state.hash != before.hash


def test_diloco_outer_step_is_nesterov_sgd():
    state = make_state()
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in state.params.items()}
    sgd = torch.optim.SGD(ref.values(), lr=0.7, momentum=0.9, nesterov=True)
    outer = default_outer("diloco")
    for step in range(3):
        delta = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(step)) for n, t in state.params.items()}
        state.apply_outer_step(delta, outer)
        for n, p in ref.items():
            p.grad = delta[n].clone()
        sgd.step()
    for n in ref:
        torch.testing.assert_close(state.params[n], ref[n].detach(), rtol=0, atol=1e-6)


def test_non_finite_update_is_an_error_and_changes_nothing():
    state = make_state()
    before = state.hash
    delta = {n: torch.zeros_like(t) for n, t in state.params.items()}
    delta["b.bias"][0] = float("nan")
    with pytest.raises(NonFiniteUpdateError, match="b.bias"):
        state.apply_outer_step(delta, OuterConfig())
    assert state.hash == before and state.round == 3


def test_hash_depends_on_every_value():
    a, b = make_state(), make_state()
    assert a.hash == b.hash
    b.params["b.bias"][2] += 1e-7
    b._hash = None
    assert a.hash != b.hash


def test_state_transfer_round_trip_and_tampering():
    state = make_state()
    state.momentum = {"a.weight": torch.ones(8, 4)}
    index = parse_index(build_index(state))
    assert (index.round, index.hash) == (3, state.hash)
    infos = index.tensors
    view = StateSnapshot(state).chunk([i.name for i in infos])
    assert view is not None
    chunk = bytes(view)
    tensors = split_chunk(chunk, infos)
    assert torch.equal(tensors["a.weight"], state.params["a.weight"])
    assert torch.equal(tensors["momentum/a.weight"], state.momentum["a.weight"])
    tampered = bytearray(chunk)
    tampered[5] ^= 1
    with pytest.raises(StateError, match="sha256"):
        split_chunk(bytes(tampered), infos)
    with pytest.raises(StateError, match="bytes"):
        split_chunk(chunk[:-4], infos)
    with pytest.raises(StateError):
        parse_index(b"\x93garbage")


def test_work_is_spread_over_donors():
    infos = parse_index(build_index(make_state())).tensors
    parts = _split_work(infos, 2)
    assert sorted(i.name for p in parts for i in p) == sorted(i.name for i in infos)
    assert len(parts) == 2


def _beat(pid: str, round_no: int, h: str, phase: Phase = "training") -> Heartbeat:
    return Heartbeat(pid, pid, "replica", "cpu", phase, round_no, 0.0, None, 0, 0, h, "0", 0.0)


def test_donors_are_the_newest_majority():
    beats = [_beat("a", 5, "x"), _beat("b", 5, "x"), _beat("c", 5, "evil"), _beat("d", 4, "old"), _beat("e", 6, "", "joining")]
    assert pick_donors(beats, exclude="z") == (5, "x", ["a", "b"])
    choice = pick_donors(beats, exclude="a")
    assert choice is not None and (choice == (5, "x", ["b"]) or choice[1] in ("x", "evil"))
    assert pick_donors([_beat("e", 6, "", "joining")], exclude="z") is None


def test_saved_state_round_trips_and_refuses_other_runs_and_corruption(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = GlobalState(round=7, params={"a": torch.randn(3, 4, generator=g)}, momentum={"a": torch.randn(3, 4, generator=g)})
    save_state(state, tmp_path / "s", run_id="r1")
    save_state(state, tmp_path / "s", run_id="r1")  # overwriting an existing copy is atomic and fine
    loaded = load_state(tmp_path / "s", run_id="r1")
    assert loaded is not None and loaded.round == 7 and loaded.hash == state.hash
    assert load_state(tmp_path / "nothing", run_id="r1") is None
    with pytest.raises(ValueError, match="run"):
        load_state(tmp_path / "s", run_id="r2")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4)}, str(tmp_path / "s" / "model.safetensors"))
    with pytest.raises(ValueError, match="hash"):
        load_state(tmp_path / "s", run_id="r1")


def test_snapshot_serves_contiguous_parts_as_views_of_one_buffer():
    state = make_state()
    state.momentum = {"a.weight": torch.ones(8, 4)}
    snap = StateSnapshot(state)
    infos = parse_index(snap.index).tensors
    parts = _split_work(infos, 2)
    assert [i.name for p in parts for i in p] == [i.name for i in infos]  # contiguous runs, in index order
    for part in parts:
        body = snap.chunk([i.name for i in part])
        assert isinstance(body, memoryview)  # no copy
        split_chunk(bytes(body), part)
    shuffled = [i.name for i in reversed(infos)]
    assert isinstance(snap.chunk(shuffled), bytes)  # any order still works, as a copy
    assert snap.chunk(["nope"]) is None and snap.chunk([]) is None
