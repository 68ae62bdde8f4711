"""The SPSA mode on the runtime's interfaces: options, inline payload checks, the clipped replayed
update, the replay log, and starting from a checkpoint (no network: see test_spsa_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from models import build_model
from swarm.codec import inline_digest
from swarm.data.corpus import load_corpus
from swarm.modes import mode_for
from swarm.modes.replica import data_config, initial_state, model_config, start_state
from swarm.modes.spsa.log import ReplayError, inline_entries, read_rows, replay
from swarm.modes.spsa.mode import SpsaMode
from swarm.modes.spsa.replay import RoundScalars, apply_scalars
from swarm.modes.spsa.scalar import decode_scalars
from swarm.net.records import MAX_INLINE_BYTES, ManifestEntry, Role, Submission
from swarm.round.admission import Validator
from swarm.run import RunConfig
from swarm.state import load_state, save_state
from swarm.train.checkpoint import save_checkpoint

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PEERS = ["QmAlpha", "QmBravo", "QmCharlie"]


def small_run(**options: Any) -> RunConfig:
    return RunConfig(
        run_id="run-spsa-test",
        mode="spsa",
        model_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 32},  # ~20k params
        data_source=str(SHAKESPEARE) if SHAKESPEARE.exists() else "stdlib",
        data_max_bytes=200_000,
        batch_size=2,
        seq_len=16,
        mode_options={"samples": 3, **options},
    )


def spsa(run: RunConfig) -> SpsaMode:
    mode = mode_for(run)
    assert isinstance(mode, SpsaMode)
    return mode


def test_options_are_validated():
    for bad in ({"samples": 0}, {"samples": MAX_INLINE_BYTES + 1}, {"eps": 0.0}, {"lr": -1.0}, {"clip_multiple": 0.5}):
        with pytest.raises(ValueError):
            mode_for(small_run(**bad))
    with pytest.raises(ValueError, match="no option"):
        mode_for(small_run(momentum=0.9))


def test_inline_payloads_are_checked_by_length_digest_and_size():
    mode = spsa(small_run())
    assert mode.check_inline(b"\x01\x02\x03") is None
    assert "3 per peer" in (mode.check_inline(b"\x01\x02") or "")
    validator = Validator(node=cast(Any, None), store=cast(Any, None), mode=mode)
    data = b"\x10\x90\x7f"
    assert validator.inline_problem(data, inline_digest(data), 3) is None
    assert validator.inline_problem(data, inline_digest(b"xyz"), 3) is not None
    assert validator.inline_problem(b"", inline_digest(b""), 0) is not None
    with pytest.raises(ValueError):
        Submission("p", 0, "d", 2000, "h", 0, None, inline=b"x" * (MAX_INLINE_BYTES + 1))
    other = mode_for(RunConfig())
    assert not other.inline_payload and other.check_inline(data) is not None


def test_an_extreme_byte_is_clipped_to_a_multiple_of_the_median():
    run = small_run(samples=2, clip_multiple=4.0)
    mode = spsa(run)
    honest = [(PEERS[0], bytes([100, 228])), (PEERS[1], bytes([104, 96]))]
    hostile = [*honest, (PEERS[2], bytes([127, 255]))]  # ±scale, the largest a byte can say
    scalars = mode.round_scalars(5, hostile)
    magnitudes = sorted(abs(g) for _, gs in scalars.contributions for g in gs)
    median = (magnitudes[2] + magnitudes[3]) / 2
    assert scalars.contributions[2][1] == [4 * median, -4 * median]
    assert scalars.contributions[0][1] == decode_scalars(bytes([100, 228]), mode.options.scalar_scale)
    state, expected = initial_state(run), initial_state(run)
    mode.apply_inline(state, 0, hostile)
    apply_scalars(expected.params, RoundScalars(run.run_id, 0, scalars.contributions), lr=mode.options.lr)
    assert state.round == 1 and all(torch.equal(state.params[n], expected.params[n]) for n in state.params)


def test_replaying_a_recorded_log_from_a_saved_state_reproduces_the_swarm(tmp_path):
    run = small_run()
    mode = spsa(run)
    corpus = load_corpus(data_config(run))
    workers = {p: mode.make_worker(Role(p, "replica", i), torch.device("cpu"), corpus) for i, p in enumerate(PEERS)}
    replicas = {p: initial_state(run) for p in PEERS}  # one global state per peer, as in a swarm
    save_state(replicas[PEERS[0]], tmp_path / "round0", run_id=run.run_id)
    with (tmp_path / "rounds.jsonl").open("w") as log:
        for r in range(3):
            payloads = []
            for p in PEERS:
                work = workers[p].train_round(replicas[p])
                assert work is not None and work.inline is not None and len(work.inline) == 3
                payloads.append((p, work.inline))
            for p in PEERS:
                mode.apply_inline(replicas[p], r, payloads)
            assert len({s.hash for s in replicas.values()}) == 1, f"replicas differ after round {r}"
            entries = [ManifestEntry(p, inline_digest(b), len(b), inline=b) for p, b in payloads]
            log.write(json.dumps({"round": r, "inline": inline_entries(entries), "hash": replicas[PEERS[0]].hash}) + "\n")
    rows = read_rows(tmp_path / "rounds.jsonl")
    start = load_state(tmp_path / "round0", run_id=run.run_id)
    assert start is not None and start.hash != replicas[PEERS[0]].hash
    replayed = replay(mode, start, rows)
    assert replayed.round == 3 and replayed.hash == replicas[PEERS[0]].hash
    assert workers[PEERS[0]].memory_bytes() == {"grad_bytes": 0, "optimizer_bytes": 0}
    assert not any(p.requires_grad for p in workers[PEERS[0]].model.parameters())

    rows[1]["inline"][0][1] = "00" * 3  # a tampered log no longer matches the recorded hashes
    again = load_state(tmp_path / "round0", run_id=run.run_id)
    assert again is not None
    with pytest.raises(ReplayError, match="round 1"):
        replay(mode, again, rows)


def test_start_state_from_the_runs_checkpoint_or_a_saved_state(tmp_path):
    run = small_run()
    model = build_model(model_config(run), seed=7)  # "pretrained": other weights than the seed's
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, meta={"step": 0})
    init = initial_state(run, tmp_path / "ckpt")
    assert init.hash != initial_state(run).hash
    run.init_hash = init.hash
    assert start_state(run, tmp_path / "ckpt").hash == init.hash
    save_state(init, tmp_path / "saved", run_id=run.run_id)
    assert start_state(run, tmp_path / "saved").hash == init.hash
    other = build_model(model_config(run), seed=8)
    save_checkpoint(tmp_path / "other", model=other, optimizer=None, meta={"step": 0})
    with pytest.raises(ValueError, match="initial weights"):
        start_state(run, tmp_path / "other")
