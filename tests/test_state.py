"""The global state: outer steps, hashing, and the state-transfer format."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from swarm.modes import default_outer
from swarm.net.records import Heartbeat, Phase
from swarm.net.transfer import Traffic
from swarm.processes import statesync
from swarm.processes.statesync import (
    StateError,
    StateSnapshot,
    _split_work,
    build_index,
    download_state,
    parse_index,
    pick_donors,
    split_chunk,
)
from swarm.run import OuterConfig
from swarm.state import GlobalState, NonFiniteUpdateError, PartialStateError, load_state, save_state


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
    pieces = StateSnapshot(state).chunk([i.name for i in infos])
    assert pieces is not None
    chunk = b"".join(pieces)
    tensors = split_chunk(chunk, infos)
    assert torch.equal(tensors["a.weight"], state.params["a.weight"])
    assert torch.equal(tensors["momentum/a.weight"], state.momentum["a.weight"])
    tampered = bytearray(chunk)
    tampered[5] ^= 1
    with pytest.raises(StateError, match="leaf"):
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


def test_snapshot_serves_parts_as_views_that_pin_only_the_tensors_asked_for():
    """A slow reader's answer must not keep a replaced round's whole state alive: the answer holds
    the asked tensors' buffers, and the snapshot itself is freed once the server drops it."""
    state = make_state()
    state.momentum = {"a.weight": torch.ones(8, 4)}
    snap = StateSnapshot(state)
    infos = parse_index(snap.index).tensors
    parts = _split_work(infos, 2)
    assert [i.name for p in parts for i in p] == [i.name for i in infos]  # contiguous runs, in index order
    for part in parts:
        body = snap.chunk([i.name for i in part])
        assert body is not None and all(isinstance(v, memoryview) for v in body)  # no copy
        split_chunk(b"".join(body), part)
    shuffled = [i.name for i in reversed(infos)]
    body = snap.chunk(shuffled)
    assert body is not None and b"".join(body) == b"".join(b"".join(snap.chunk([n]) or []) for n in shuffled)
    assert snap.chunk(["nope"]) is None and snap.chunk([]) is None
    first = next(i for i in infos if i.name in state.params)
    one = snap.chunk([first.name])
    assert one is not None and sum(v.nbytes for v in one) == first.nbytes
    gone = weakref.ref(snap)
    del snap, body
    gc.collect()
    assert gone() is None  # what a slow stream holds (`one`) is its tensor, not the snapshot
    assert bytes(one[0]) == state.params[first.name].numpy().tobytes()


def make_big_state(seed: int = 0) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    names = ["blocks.0.w", "blocks.1.w", "blocks.2.w", "emb.weight", "head.weight"]
    params = {n: torch.randn(6, 4, generator=g) for n in names}
    return GlobalState(round=5, params=params, momentum={n: torch.randn(6, 4, generator=g) for n in names[:2]})


def test_a_part_has_the_agreed_hash_and_checks_itself_against_the_next_rounds_leaves():
    full = make_big_state()
    part = full.part(["blocks.1.w", "head.weight"])
    assert part.hash == full.hash and set(part.params) == {"blocks.1.w", "head.weight"} and set(part.momentum) == {"blocks.1.w"}
    g = torch.Generator().manual_seed(1)
    mean = {n: torch.randn(6, 4, generator=g) for n in full.params}
    outer = OuterConfig(outer_lr=0.7, momentum=0.9, nesterov=True)
    full.apply_outer_step(mean, outer)
    part.apply_outer_step(mean, outer)  # only its own tensors; the others' leaves are now unknown
    with pytest.raises(PartialStateError):
        _ = part.hash
    index = parse_index(build_index(full))
    part.adopt(full.round, index.leaves())
    assert part.hash == full.hash
    assert all(torch.equal(part.params[n], full.params[n]) for n in part.params)
    # a part that applied anything else finds out from the agreed leaves
    other = make_big_state().part(["blocks.1.w"])
    other.apply_outer_step({n: 2 * t for n, t in mean.items()}, outer)
    with pytest.raises(ValueError, match="differ"):
        other.adopt(full.round, index.leaves())
    with pytest.raises(ValueError, match="round"):
        other.adopt(full.round + 1, index.leaves())


def test_an_index_must_hash_to_the_hash_it_names():
    import msgpack

    raw = msgpack.unpackb(build_index(make_big_state()), raw=False)
    raw["tensors"][0][2] = "00" * 32  # a donor lying about one leaf (to make a bad part pass)
    with pytest.raises(StateError, match="does not hash"):
        parse_index(msgpack.packb(raw))


def test_a_part_serves_what_it_holds_with_the_index_of_everything():
    full = make_big_state()
    part = full.part(["blocks.0.w", "blocks.1.w"])
    snap = StateSnapshot(part)
    index = parse_index(snap.index)
    assert index.hash == full.hash and len(index.tensors) == 7
    assert {t.name for t in index.tensors if t.held} == {"blocks.0.w", "blocks.1.w", "momentum/blocks.0.w", "momentum/blocks.1.w"}
    assert snap.chunk(["blocks.0.w"]) is not None and snap.chunk(["emb.weight"]) is None


def test_a_joiner_downloads_its_part_or_all_from_donors_holding_parts(monkeypatch):
    """Donors: two parts that together hold θ, and a liar whose bytes do not match the leaves."""
    full = make_big_state()
    liar = full.copy()
    for t in liar.params.values():
        t.add_(1.0)
    snaps = {
        "early": StateSnapshot(full.part(["blocks.0.w", "blocks.1.w", "emb.weight"])),
        "late": StateSnapshot(full.part(["blocks.2.w", "head.weight"])),
        "liar": StateSnapshot(liar),
    }
    assert parse_index(snaps["liar"].index).hash != full.hash  # its own index names its own hash ...
    snaps["liar"].index = build_index(full)  # ... so it sends the agreed index, and other bytes
    asked: list[tuple[str, tuple[str, ...]]] = []

    async def fake_fetch(p2p, donor, request, *, max_bytes, timeout_s, traffic=None):
        snap = snaps[donor]
        if request["kind"] == "state-index":
            return snap.index
        asked.append((donor, tuple(request["names"])))
        body = snap.chunk(request["names"])
        return b"".join(body) if body is not None else None

    monkeypatch.setattr(statesync, "fetch", fake_fetch)
    get = lambda names=None: asyncio.run(  # noqa: E731
        download_state(None, ["liar", "early", "late"], expected_hash=full.hash, traffic=Traffic(), names=names)
    )
    whole = get()
    assert whole.hash == full.hash and not whole.partial
    assert any(d == "liar" for d, _ in asked)  # it was asked, its bytes refused, another donor gave them
    asked.clear()
    stage = get(["blocks.2.w", "head.weight"])
    assert stage.partial and set(stage.params) == {"blocks.2.w", "head.weight"} and stage.hash == full.hash
    assert {n for _, names in asked for n in names} == {"blocks.2.w", "head.weight"}  # nothing else downloaded
    with pytest.raises(StateError, match="no tensor"):
        get(["nope"])
    del snaps["late"], snaps["liar"]
    with pytest.raises(StateError, match="no donor holds"):
        asyncio.run(download_state(None, ["early"], expected_hash=full.hash, traffic=Traffic(), names=["head.weight"]))


def test_a_donor_serves_the_previous_rounds_snapshot_until_the_next_replaces_it():
    """A joiner asks every donor at once; a part asked just before a round closes reaches a donor
    that has applied it: the donor still answers from the round the joiner asked for."""

    class Server:
        def __init__(self) -> None:
            self.handlers: dict = {}

        def register(self, kind: str, handler: object, *, streams: int = 0) -> None:
            self.handlers[kind] = handler

    class Agreement:
        def __init__(self) -> None:
            self.lock = asyncio.Lock()
            self.state = GlobalState(round=4, params={"a": torch.zeros(2, 2), "b": torch.ones(3)})

    server, agreement = Server(), Agreement()
    statesync.serve_state(server, agreement)  # type: ignore[arg-type]
    chunk = server.handlers["state"]

    async def main() -> list:
        got = [await chunk({"round": 4, "names": ["a"]})]
        agreement.state = GlobalState(round=5, params={"a": torch.full((2, 2), 5.0), "b": torch.ones(3)})
        got.append(await chunk({"round": 4, "names": ["a"]}))  # asked before the donor built round 5's
        got.append(await chunk({"round": 5, "names": ["a"]}))
        got.append(await chunk({"round": 4, "names": ["a"]}))  # kept until round 6's replaces it
        agreement.state = GlobalState(round=6, params={"a": torch.full((2, 2), 6.0), "b": torch.ones(3)})
        got.append(await chunk({"round": 6, "names": ["a"]}))
        got.append(await chunk({"round": 4, "names": ["a"]}))
        got.append(await chunk({"round": 5, "names": ["a"]}))
        return got

    answers = asyncio.run(main())
    values = [None if a is None else torch.frombuffer(bytearray(b"".join(a)), dtype=torch.float32)[0].item() for a in answers]
    assert values == [0.0, 0.0, 5.0, 0.0, 6.0, None, 5.0]
