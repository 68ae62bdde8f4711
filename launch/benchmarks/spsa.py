"""Shared-seed SPSA against its baselines, from the same checkpoint on the same new corpus, in one run:
(a) a 4-peer SPSA swarm (each peer K two-point estimates per round, one byte each), (b) solo SPSA
with the same number of forward passes (4K estimates per round, same rounds), (c) solo backprop
fine-tuning (AdamW) for as many steps as one swarm peer makes estimates.

The checkpoint is nano pretrained here on the Python standard library (`--pretrain-steps` AdamW
steps); fine-tuning reads tinyshakespeare. Printed: eval loss against forward passes and wall time,
bytes per round on the wire and per scalar (the inline payload alone: the target is exactly 1 byte
per scalar; the signed record's fixed overhead is reported apart), peer memory against backprop, and
replay time per round. Peers share this machine's cores, so (a)'s wall time per peer is each peer's
own compute + replay time, what it would take on a machine of its own."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from launch.cluster import LocalCluster
from models import build_model, get_preset
from swarm.data.corpus import DataConfig, load_corpus
from swarm.data.sampler import BatchStream, eval_batches
from swarm.modes import mode_for
from swarm.modes.replica import initial_state
from swarm.net.records import Role, Submission
from swarm.net.schema import encode_record
from swarm.run import RunConfig
from swarm.train.checkpoint import save_checkpoint
from swarm.train.optim import OptimConfig, build_optimizer
from swarm.train.step import Trainer, evaluate

HELP = "4-peer SPSA swarm vs solo SPSA (same forward passes) vs backprop fine-tuning, from one checkpoint"
NEW_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(NEW_TEXT) if NEW_TEXT.is_file() else "stdlib", help="fine-tuning corpus")
    parser.add_argument("--pretrain-data", default="stdlib", help="corpus of the checkpoint (default %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16, help="K: estimates per peer per round")
    parser.add_argument("--lr", type=float, default=None, help="SPSA lr (default: the mode's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--workdir", default=None)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-bench-spsa-"))
    checkpoint = pretrain(args, workdir / "pretrained")
    spsa_run = run_description(args)
    forwards = 2 * args.peers * args.samples * args.rounds
    print(
        f"nano fine-tuned on {args.data}: {args.peers} peers x K={args.samples} x {args.rounds} rounds = {forwards} forward passes",
        flush=True,
    )
    swarm = run_swarm(args, spsa_run, checkpoint, workdir / "swarm")
    solo = run_solo_spsa(args, spsa_run, checkpoint)
    backprop = run_backprop(args, checkpoint)
    print_table(args, spsa_run, swarm, solo, backprop)
    return 0


def run_description(args: argparse.Namespace) -> dict:
    options: dict[str, int | float] = {"samples": args.samples}
    if args.lr is not None:
        options["lr"] = args.lr
    return {
        "mode": "spsa",
        "preset": "nano",
        "mode_options": options,
        "data_source": args.data,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "round_timeout_s": 120.0,
        "heartbeat_interval_s": 2.0,
        "heartbeat_ttl_s": 10.0,
        "num_shards": args.peers,
        "eval_batches": args.eval_batches,
    }


def pretrain(args: argparse.Namespace, directory: Path) -> Path:
    """nano after some AdamW steps on the pretraining corpus: the checkpoint every run starts from."""
    model = build_model(get_preset("nano"), seed=0)
    corpus = load_corpus(DataConfig(source=args.pretrain_data, max_bytes=4_000_000))
    stream = BatchStream(corpus.train_tokens, batch_size=8, seq_len=args.seq_len, seed=0, shard=0, num_shards=1)
    optim = OptimConfig(lr=3e-3, warmup_steps=min(20, args.pretrain_steps), total_steps=max(1, args.pretrain_steps))
    trainer = Trainer(model, build_optimizer(model, optim), optim, device=torch.device("cpu"))
    for _ in range(args.pretrain_steps):
        trainer.train_step(*next(stream))
    save_checkpoint(directory, model=model, optimizer=None, meta={"step": args.pretrain_steps})
    return directory


def run_swarm(args: argparse.Namespace, run: dict, checkpoint: Path, workdir: Path) -> dict:
    started = time.perf_counter()
    coordinator_args = ("--init-from", str(checkpoint), "--stop-after", str(args.rounds))
    with LocalCluster(workdir, run, coordinator_args=coordinator_args) as cluster:
        for i in range(args.peers):
            cluster.add_peer(f"spsa-{i}", threads=1, max_rounds=args.rounds)
        rounds_file = workdir / "coordinator" / "rounds.jsonl"
        deadline = time.monotonic() + 300 + 60 * args.rounds
        while not (rounds_file.exists() and '"final": true' in rounds_file.read_text()):
            if cluster.failed() or time.monotonic() > deadline:
                raise RuntimeError(f"the SPSA swarm failed or stalled; logs in {workdir}")
            time.sleep(1.0)
        by_round = cluster.metrics_by_round()
    rows = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    peer_rows = [row for r in sorted(by_round) for row in by_round[r]]
    per_peer: dict[str, float] = {}
    per_peer_cpu: dict[str, float] = {}
    for row in peer_rows:
        per_peer[row["peer"]] = per_peer.get(row["peer"], 0.0) + row["compute_s"] + row["apply_s"]
        per_peer_cpu[row["peer"]] = per_peer_cpu.get(row["peer"], 0.0) + row["compute_cpu_s"] + row["apply_cpu_s"]
    applied = [r for r in rows if "inline" in r]
    return {
        "eval_loss": next(r["eval_loss"] for r in rows if r.get("final")),
        "start_loss": next(r["eval_loss"] for r in applied if r["eval_loss"] is not None),  # θ(0)'s, or the first measured
        "wall_s": time.perf_counter() - started,
        "wall_per_peer_s": statistics.median(per_peer.values()),
        "cpu_per_peer_s": statistics.median(per_peer_cpu.values()),
        "replay_cpu_s": statistics.median(row["apply_cpu_s"] for row in peer_rows),
        "replay_s": statistics.median(row["apply_s"] for row in peer_rows),
        "scalars_per_round": statistics.median(r["scalars"] for r in applied),
        "payload_per_round": statistics.median(r["payload_bytes"] for r in applied),
        "memory_bytes": max(row["grad_bytes"] + row["optimizer_bytes"] for row in peer_rows),
        "identical": all(len({row["hash"] for row in rows_}) == 1 for rows_ in by_round.values()),
    }


def run_solo_spsa(args: argparse.Namespace, run_fields: dict, checkpoint: Path) -> dict:
    """One process, 4K estimates per round, applied like a round of 4 peers' K (same forward passes)."""
    run = RunConfig(**{**run_fields, "mode_options": {**run_fields["mode_options"], "samples": args.peers * args.samples}})
    mode = mode_for(run)
    worker = mode.make_worker(Role("solo", "replica", 0), torch.device("cpu"))
    state = initial_state(run, checkpoint)
    started, cpu_started, replay_s = time.perf_counter(), time.thread_time(), 0.0
    for r in range(args.rounds):
        work = worker.train_round(state)
        assert work is not None and work.inline is not None
        t = time.perf_counter()
        mode.apply_inline(state, r, [("solo", work.inline)])
        replay_s += time.perf_counter() - t
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    return {"eval_loss": worker.evaluate(state), "wall_s": wall, "cpu_s": cpu, "replay_s": replay_s / args.rounds}


def run_backprop(args: argparse.Namespace, checkpoint: Path) -> dict:
    """AdamW fine-tuning from the checkpoint, one step per estimate one swarm peer makes."""
    run = RunConfig(preset="nano", data_source=args.data, batch_size=args.batch_size, seq_len=args.seq_len)
    model = build_model(get_preset("nano"))
    state = initial_state(run, checkpoint)
    state.load_into(model)
    corpus = load_corpus(DataConfig(source=args.data))
    stream = BatchStream(corpus.train_tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=1, shard=0, num_shards=1)
    steps = args.samples * args.rounds
    optim = OptimConfig(lr=1e-3, warmup_steps=min(10, steps), total_steps=steps)
    trainer = Trainer(model, build_optimizer(model, optim), optim, device=torch.device("cpu"))
    started, cpu_started = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        trainer.train_step(*next(stream))
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    batches = eval_batches(corpus.eval_tokens, batch_size=args.batch_size, seq_len=args.seq_len, max_batches=args.eval_batches)
    memory = sum(
        t.numel() * t.element_size() for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)
    )
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"eval_loss": evaluate(model, batches), "wall_s": wall, "cpu_s": cpu, "steps": steps, "memory_bytes": memory + grads}


def record_overhead(samples: int) -> int:
    """Bytes of a submission record beyond its inline payload (msgpack fields; the DHT adds the
    writer's signature and key on top)."""
    sub = Submission("Qm" + "x" * 44, 12345, "0" * 64, samples, "0" * 32, 2**20, 3.21, inline=bytes(samples))
    return len(encode_record(sub)) - samples


def print_table(args: argparse.Namespace, run: dict, swarm: dict, solo: dict, backprop: dict) -> None:
    k, peers = args.samples, args.peers
    forwards = 2 * peers * k * args.rounds
    print(f"\nfirst eval loss the swarm's coordinator measured (round 0 or 1): {swarm['start_loss']:.4f}")
    print(f"{'run':<34} {'fwd passes':>10} {'eval loss':>9} {'wall s':>8} {'wall/peer s':>11} {'cpu/peer s':>10}")
    table = [
        (
            f"(a) SPSA swarm, {peers} peers",
            forwards,
            swarm["eval_loss"],
            swarm["wall_s"],
            swarm["wall_per_peer_s"],
            swarm["cpu_per_peer_s"],
        ),
        ("(b) solo SPSA, same fwd passes", forwards, solo["eval_loss"], solo["wall_s"], solo["wall_s"], solo["cpu_s"]),
        (
            "(c) solo backprop (AdamW)",
            backprop["steps"],
            backprop["eval_loss"],
            backprop["wall_s"],
            backprop["wall_s"],
            backprop["cpu_s"],
        ),
    ]
    for name, passes, loss, wall, per_peer, cpu in table:
        print(f"{name:<34} {passes:>10} {loss:>9.4f} {wall:>8.1f} {per_peer:>11.1f} {cpu:>10.1f}")
    print(f"  (c) counts forward+backward steps, {backprop['steps']} = the estimates one swarm peer makes")
    print(
        "  wall/peer: a swarm peer's compute + replay wall time, on cores it shares with the other peers here;"
        " cpu/peer: the CPU time of that work (one torch thread), its time on a core of its own"
    )
    speedup = solo["cpu_s"] / max(swarm["cpu_per_peer_s"], 1e-9)
    shared = solo["wall_s"] / max(swarm["wall_per_peer_s"], 1e-9)
    reached = swarm["eval_loss"] <= solo["eval_loss"] + 1e-3
    print(
        f"time per peer, (b) / (a): {speedup:.2f}x on a core each (target >= 3x), {shared:.2f}x with {peers} peers"
        f" sharing this machine; (a) reaches (b)'s loss: {'yes' if reached else 'no'}"
    )
    print(
        f"bytes per round: {swarm['payload_per_round']:.0f} payload for {swarm['scalars_per_round']:.0f} scalars "
        f"= {swarm['payload_per_round'] / max(swarm['scalars_per_round'], 1):.2f} byte/scalar (target 1); "
        f"fixed record overhead {record_overhead(k)} bytes per peer per round, apart"
    )
    print(
        f"peer memory beyond the weights: SPSA {swarm['memory_bytes']} bytes (grads + optimizer) vs backprop {backprop['memory_bytes'] / 2**20:.1f} MiB"
    )
    print(
        f"replay time per round: swarm {swarm['replay_s'] * 1000:.0f} ms wall, {swarm['replay_cpu_s'] * 1000:.0f} ms CPU"
        f" ({peers * k} scalars), solo {solo['replay_s'] * 1000:.0f} ms"
    )
    print(f"replicas bit-identical every round: {'yes' if swarm['identical'] else 'NO'}")
