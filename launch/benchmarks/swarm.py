"""Swarm vs baselines on the same data, model and total tokens: a local 4-replica SparseLoCo swarm,
a 4-replica dense fp32 DiLoCo swarm (same code path, dense codec, Nesterov 0.9, outer lr 0.7), and
the solo trainer at the same total batch (replicas x per-replica batch) for rounds x H steps.

Printed: bytes on the wire per round per parameter (and the ratio SparseLoCo / DiLoCo), eval loss
on the held-out split (the whole split, same for all three), the median over peers of the fraction
of wall time spent in inner steps, and codec throughput. All peers share this machine's cores, so
absolute speeds are not those of separate machines; ratios measured in the same run are."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from launch.cluster import LocalCluster
from launch.testbed import placement
from models import count_parameters, get_preset
from swarm.codec.bench import codec_throughput
from swarm.data import DataConfig
from swarm.modes import default_outer
from swarm.net.schema import to_plain
from swarm.train.optim import OptimConfig
from swarm.train.solo import TrainConfig, run_solo

HELP = "4-replica SparseLoCo vs dense DiLoCo vs solo: bytes/param, eval loss, compute fraction"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
WHOLE_EVAL_SPLIT = 10**6  # eval batches: more than any split has, so every run sees all of it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help="corpus (default %(default)s)")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=30, help="H (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="per replica (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner (and solo) peak lr")
    parser.add_argument(
        "--overlap",
        choices=("on", "off", "both"),
        default="both",
        help="one-step-delayed outer updates (train round r+1 while round r settles): with, without, or both (default %(default)s)",
    )
    parser.add_argument(
        "--link",
        metavar="RATE:DELAY[:LOSS]",
        help="run each process in its own network namespace behind this shaped link, e.g. 20mbit:50ms (launch/testbed.py; root)",
    )
    parser.add_argument(
        "--modes", default="sparseloco,diloco", help="swarms to run; one mode prints only its overlap table (default %(default)s)"
    )
    parser.add_argument("--workdir", default=None)


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-bench-"))
    params = count_parameters(get_preset(args.preset))
    tokens = args.replicas * args.batch_size * args.seq_len * args.inner_steps * args.rounds
    print(
        f"{args.preset} ({params:,} params), {args.replicas} replicas x H={args.inner_steps} x {args.rounds} rounds, "
        f"{tokens:,} tokens each; logs in {workdir}",
        flush=True,
    )
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.overlap]
    runs: dict[tuple[str, bool], dict] = {}
    modes = args.modes.split(",")
    for mode in modes:
        for overlap in settings:
            run_ = bench_run(args, mode)
            run_["outer"]["overlap"] = overlap
            name = f"{mode}-{'overlap' if overlap else 'in-step'}"
            runs[mode, overlap] = run_swarm(workdir / name, run_, args.replicas, args.rounds, link=args.link)
    if set(modes) >= {"sparseloco", "diloco"}:
        results = {mode: runs[mode, settings[-1]] for mode in ("sparseloco", "diloco")}
        solo = run_solo_baseline(args, args.preset)
        _print_table(args, params, results, solo)
    if len(settings) == 2:
        _print_overlap(runs, modes)
    if len(settings) == 1 and not set(modes) >= {"sparseloco", "diloco"}:
        _print_swarms(runs, params)
    codec = codec_throughput(num_params=10_000_000, repeats=5, num_threads=1)
    print(
        f"\ncodec (10M params, 1 thread): encode {codec['encode_mb_s']:.0f} MB/s, decode {codec['decode_mb_s']:.0f} MB/s, "
        f"{codec['bits_per_param']:.4f} bit/param = {codec['ratio_vs_fp32']:.1f}x less than fp32"
    )
    return 0


def bench_run(args: argparse.Namespace, mode: str) -> dict:
    """The run description every swarm benchmark uses: the arguments' model, data and H, whole eval split."""
    run = {
        "preset": args.preset,
        "mode": mode,
        "data_source": args.data,
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "inner_lr": args.lr,
        "warmup_steps": args.inner_steps,
        "max_rounds": args.rounds,
        "round_timeout_s": 120.0,
        "heartbeat_interval_s": 2.0,
        "heartbeat_ttl_s": 10.0,
        "num_shards": args.replicas,
        "eval_batches": WHOLE_EVAL_SPLIT,
    }
    run["outer"] = to_plain(default_outer(mode))
    return run


def run_swarm(workdir: Path, run: dict, peers: int, rounds: int, *, link: str | None = None) -> dict:
    """A local swarm of `peers` one-thread peers for `rounds` rounds; its figures (see the table).
    With `link`, every process runs in its own namespace behind that shaped link (launch/testbed.py)."""
    mode = run["mode"]
    started = time.perf_counter()
    with (
        placement(link, peers) as place,
        LocalCluster(workdir, run, coordinator_args=("--stop-after", str(rounds)), **place.coordinator) as cluster,
    ):
        print(f"{mode}: {place.note}", flush=True)
        for i in range(peers):
            cluster.add_peer(f"{mode}-{i}", threads=1, max_rounds=rounds, **place.peer(i))
        rounds_file = workdir / "coordinator" / "rounds.jsonl"
        deadline = time.monotonic() + 300 + 120 * rounds
        while time.monotonic() < deadline:
            if cluster.failed():
                raise RuntimeError(f"{mode}: a swarm process failed; logs in {workdir}")
            rows = [json.loads(line) for line in rounds_file.read_text().splitlines()] if rounds_file.exists() else []
            if any(r.get("final") for r in rows):  # the last round applied and evaluated
                break
            time.sleep(1.0)
        by_round = cluster.metrics_by_round()
    rows = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    peer_rows = [row for r in sorted(by_round) if r > 0 for row in by_round[r]]  # round 0 includes start-up
    fractions = _compute_fractions(peer_rows)
    payload = statistics.median(row["payload_bytes"] for rows_ in by_round.values() for row in rows_ if row["payload_bytes"])
    finals = [r["eval_loss"] for r in rows if r.get("final")]
    last = {row["peer"]: row for r in sorted(by_round) for row in by_round[r]}  # each peer's last row
    first = {row["peer"]: row for r in sorted(by_round, reverse=True) for row in by_round[r]}
    return {
        "wire_bytes_per_round": statistics.median(
            (last[p]["bytes_sent"] + last[p]["bytes_received"] - first[p]["bytes_sent"] - first[p]["bytes_received"])
            / max(1, last[p]["round"] - first[p]["round"])
            for p in last
        ),
        "memory_bytes": statistics.median(row.get("grad_bytes", 0) + row.get("optimizer_bytes", 0) for row in peer_rows),
        "eval_loss": finals[-1] if finals else None,
        "payload_bytes": payload,
        "compute_fraction": statistics.median(fractions) if fractions else float("nan"),
        "identical": all(len({row["hash"] for row in rows_}) == 1 for rows_ in by_round.values()),
        "wall_s": time.perf_counter() - started,
    }


def _compute_fractions(rows: list[dict]) -> list[float]:
    """Per peer: time in inner steps / wall, from the start of its first trained round in `rows` to
    the start of its last one (each round's inner steps plus whatever the peer did or waited for
    before the next began), so that in step and overlapped schedules are measured alike."""
    per_peer: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("trained_from"):
            per_peer.setdefault(row["peer"], []).append((row["trained_from"], row["compute_s"]))
    fractions = []
    for trained in per_peer.values():
        trained.sort()
        span = trained[-1][0] - trained[0][0]
        if len(trained) >= 2 and span > 0:
            fractions.append(sum(c for _, c in trained[:-1]) / span)
    return fractions


def run_solo_baseline(args: argparse.Namespace, preset: str) -> dict:
    """The solo trainer at the swarm's total batch (replicas x batch) for rounds x H steps."""
    steps = args.inner_steps * args.rounds
    cfg = TrainConfig(
        preset=preset,
        data=DataConfig(source=args.data),
        batch_size=args.replicas * args.batch_size,
        seq_len=args.seq_len,
        steps=steps,
        optim=OptimConfig(lr=args.lr, warmup_steps=args.inner_steps, total_steps=steps),
        eval_every=0,
        eval_batches=WHOLE_EVAL_SPLIT,
        out_dir=None,
    )
    result = run_solo(cfg, progress=False)
    return {"eval_loss": result.final_eval_loss, "tokens_per_s": result.tokens_per_s_median, "wall_s": result.elapsed_s}


def _print_table(args: argparse.Namespace, params: int, results: dict, solo: dict) -> None:
    sparse, dense = results["sparseloco"], results["diloco"]
    print()
    print(f"{'':<28} {'SparseLoCo':>12} {'DiLoCo fp32':>12} {'solo':>10}")
    print(f"{'payload bytes / round':<28} {sparse['payload_bytes']:>12,.0f} {dense['payload_bytes']:>12,.0f} {'-':>10}")
    print(
        f"{'bytes / round / parameter':<28} {sparse['payload_bytes'] / params:>12.4f} {dense['payload_bytes'] / params:>12.4f} {'-':>10}"
    )
    print(f"{'eval loss (nats/byte)':<28} {_f(sparse['eval_loss']):>12} {_f(dense['eval_loss']):>12} {_f(solo['eval_loss']):>10}")
    print(f"{'time in inner steps':<28} {sparse['compute_fraction']:>11.1%} {dense['compute_fraction']:>11.1%} {'100%':>10}")
    print(f"{'replicas identical':<28} {sparse['identical']!s:>12} {dense['identical']!s:>12} {'-':>10}")
    print(f"{'wall time (s)':<28} {sparse['wall_s']:>12.0f} {dense['wall_s']:>12.0f} {solo['wall_s']:>10.0f}")
    print(
        f"\nwire ratio DiLoCo fp32 / SparseLoCo: {dense['payload_bytes'] / sparse['payload_bytes']:.1f}x (anchor 146x, goal 200x)"
    )
    if sparse["eval_loss"] and dense["eval_loss"] and solo["eval_loss"]:
        print(
            f"eval loss SparseLoCo / DiLoCo: {sparse['eval_loss'] / dense['eval_loss']:.3f}, "
            f"SparseLoCo / solo: {sparse['eval_loss'] / solo['eval_loss']:.3f}"
        )


def _print_overlap(runs: dict[tuple[str, bool], dict], modes: list[str]) -> None:
    """Compute fraction and loss with and without one-step-delayed outer updates."""
    print(f"\n{'':<34}" + "".join(f" {m:>12}" for m in modes))
    for overlap, label in ((False, "in step"), (True, "overlapped")):
        rows = [runs[m, overlap] for m in modes]
        print(f"{'time in inner steps, ' + label:<34}" + "".join(f" {r['compute_fraction']:>11.1%}" for r in rows))
        print(f"{'eval loss, ' + label:<34}" + "".join(f" {_f(r['eval_loss']):>12}" for r in rows))
        print(f"{'wall time (s), ' + label:<34}" + "".join(f" {r['wall_s']:>12.0f}" for r in rows))


def _print_swarms(runs: dict[tuple[str, bool], dict], params: int) -> None:
    """One row per swarm run (what a single-mode, single-schedule invocation measured)."""
    print(f"\n{'swarm':<28} {'eval loss':>9} {'payload B':>10} {'B/param':>8} {'in steps':>9} {'identical':>9} {'wall s':>7}")
    for (mode, overlap), r in runs.items():
        name = f"{mode}, {'overlapped' if overlap else 'in step'}"
        print(
            f"{name:<28} {_f(r['eval_loss']):>9} {r['payload_bytes']:>10,.0f} {r['payload_bytes'] / params:>8.4f} "
            f"{r['compute_fraction']:>8.1%} {r['identical']!s:>9} {r['wall_s']:>7.0f}"
        )


def _f(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"
