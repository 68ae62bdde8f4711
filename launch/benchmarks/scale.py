"""How closing a round grows with the swarm: local swarms of 4, 8, 16 peers on this machine.

Each swarm trains a few short rounds (few inner steps, small batches: the model is the preset's,
so payloads have their real size) with every peer required in every round (min_peers = peers)
and rounds in step (no overlap), so a round's timeline is exact:

  last submission ──(leader sees it in the DHT, fetches and checks R payloads, signs, publishes)──▶
  manifest closed ──(every peer reads it, fetches R payloads, decodes, applies)──▶ all applied

Printed per swarm size, medians over rounds 1.. (round 0 includes start-up): close latency (last
submission to manifest), all-applied latency (last submission to the last peer holding θ(r+1)),
and the leader's bytes per round in and out. All peers share this machine's cores and loopback,
so the absolute numbers are those of one small box; the growth with R is the point. With `--link`
every process sits in its own network namespace behind that shaped link (launch/testbed.py).
Peers start from θ(0) written to the work directory (`join-swarm --start-from`), not a download
through their links: a join is not what this measures, and on slow links a big preset's state
would take minutes per peer.

`--exchange` picks how a round's payloads reach the nodes: `every` (each node fetches every
payload), `aggregate` (the coordinator's aggregate, relayed down trees of members: the run's
`aggregate_from` at 2), or `both`, each size run once with each, side by side in one table.
"""

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
from swarm.modes import default_outer
from swarm.modes.replica import initial_state
from swarm.net.schema import from_plain, to_plain
from swarm.run import RunConfig
from swarm.state import save_state

HELP = "round-close latency and the leader's bytes against peers (4, 8, 16), short rounds"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--mode", default="sparseloco", choices=("sparseloco", "diloco"))
    parser.add_argument("--peers", default="4,8,16", help="swarm sizes, comma-separated (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument(
        "--link",
        metavar="RATE:DELAY[:LOSS]",
        help="run each process in its own network namespace behind this shaped link, e.g. 20mbit:50ms (root)",
    )
    parser.add_argument(
        "--exchange",
        choices=("every", "aggregate", "both"),
        default="every",
        help="every payload to every node, the coordinator's aggregate relayed by members, or both (default %(default)s)",
    )
    parser.add_argument("--workdir", default=None)


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-scale-"))
    params = count_parameters(get_preset(args.preset))
    sizes = [int(x) for x in args.peers.split(",")]
    print(
        f"{args.mode}, {args.preset} ({params:,} params), H={args.inner_steps}, {args.rounds} rounds per size, "
        f"{'links ' + args.link if args.link else 'loopback'}; logs in {workdir}"
    )
    exchanges = ["every", "aggregate"] if args.exchange == "both" else [args.exchange]
    rows, runs = [], []
    for peers in sizes:
        for exchange in exchanges:
            runs.append((peers, exchange))
            rows.append(measure(args, peers, workdir / f"peers-{peers}-{exchange}", aggregate=exchange == "aggregate"))
            r = rows[-1]
            print(
                f"  {peers} peers, {exchange}: close {r['close_s']:.2f}s, all applied {r['applied_s']:.2f}s ({r['wall_s']:.0f}s)",
                flush=True,
            )
            print(
                f"    CPU per round: the leader's checks {r['validate_s']:.2f}s wall, {r['validate_cpu_s']:.2f}s CPU;"
                f" a peer's apply {r['apply_s']:.2f}s wall, {r['apply_cpu_s']:.2f}s CPU (medians; `swarm-sim --cpu-s`"
                f" takes them per payload: {r['validate_cpu_s'] / peers:.3f} {r['apply_cpu_s'] / peers:.3f})",
                flush=True,
            )
    print(
        f"\n{'peers':>5} {'exchange':>9} {'close (s)':>10} {'all applied (s)':>16} {'leader in/round':>16} {'leader out/round':>17} "
        f"{'payloads/round':>15} {'per peer in':>12} {'per peer out':>13}"
    )
    for (peers, exchange), r in zip(runs, rows):
        print(
            f"{peers:>5} {exchange:>9} {r['close_s']:>10.2f} {r['applied_s']:>16.2f} {_human(r['leader_in']):>16} "
            f"{_human(r['leader_out']):>17} {_human(r['payloads']):>15} {_human(r['peer_in']):>12} {_human(r['peer_out']):>13}"
        )
    for exchange in exchanges:
        mine = [(peers, r) for (peers, e), r in zip(runs, rows) if e == exchange]
        if len(mine) >= 2:
            (n0, first), (n1, last) = mine[0], mine[-1]
            print(
                f"\n{exchange}, {n0} -> {n1} peers ({n1 / n0:.0f}x): close latency x{last['close_s'] / max(first['close_s'], 1e-9):.1f}, "
                f"leader bytes in x{last['leader_in'] / max(first['leader_in'], 1):.1f}, "
                f"a peer's bytes in x{last['peer_in'] / max(first['peer_in'], 1):.1f}"
            )
    if len(exchanges) == 2:
        for peers in sizes:
            every, aggregate = (r for (n, _), r in zip(runs, rows) if n == peers)
            print(
                f"{peers} peers, the aggregate against every payload: a peer's bytes in x{aggregate['peer_in'] / max(every['peer_in'], 1):.2f}, "
                f"out x{aggregate['peer_out'] / max(every['peer_out'], 1):.2f}, all applied x{aggregate['applied_s'] / max(every['applied_s'], 1e-9):.2f}"
            )
    return 0


def measure(args: argparse.Namespace, peers: int, workdir: Path, *, aggregate: bool = False) -> dict:
    outer = to_plain(default_outer(args.mode))
    outer["overlap"] = False  # a round's timeline stays exact: submission, manifest, applied
    run_ = {
        "preset": args.preset,
        "mode": args.mode,
        "data_source": args.data,
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.inner_steps,
        "max_rounds": args.rounds,
        "min_peers": peers,
        "round_timeout_s": 120.0,
        "heartbeat_interval_s": 2.0,
        "heartbeat_ttl_s": 30.0,
        "num_shards": peers,
        "eval_batches": 1,
        "outer": outer,
        "aggregate_from": 2 if aggregate else 0,
    }
    start_from = workdir / "initial"  # θ(0), the run's own initial weights: every peer starts from it
    save_state(initial_state(from_plain(RunConfig, dict(run_))), start_from, run_id="initial")
    started = time.perf_counter()
    with (
        placement(args.link, peers, tag="scale") as place,
        LocalCluster(workdir, run_, coordinator_args=("--stop-after", str(args.rounds)), **place.coordinator) as cluster,
    ):
        for i in range(peers):
            cluster.add_peer(f"p{i}", threads=1, max_rounds=args.rounds, extra=["--start-from", str(start_from)], **place.peer(i))
        rounds_file = workdir / "coordinator" / "rounds.jsonl"
        deadline = time.monotonic() + 600 + 60 * peers
        while time.monotonic() < deadline:
            if cluster.failed():
                raise RuntimeError(f"a swarm process failed; logs in {workdir}")
            complete = cluster.rounds_completed(peers)
            closed = sum("closed_at" in line for line in rounds_file.read_text().splitlines()) if rounds_file.exists() else 0
            # Done when every peer finished every round; or when the coordinator has closed them all
            # and every peer finished all but the last (on slow links a straggler may still be
            # fetching the last round's payloads from peers that have left: that round is not measured).
            if complete >= args.rounds or (closed >= args.rounds and complete >= args.rounds - 1):
                break
            time.sleep(1.0)
        else:
            raise TimeoutError(f"{peers} peers did not finish {args.rounds} rounds; logs in {workdir}")
        by_round = cluster.metrics_by_round()
    leader = {row["round"]: row for row in map(json.loads, rounds_file.read_text().splitlines()) if "closed_at" in row}
    close, applied, leader_in, leader_out, payloads, peer_in, peer_out = [], [], [], [], [], [], []
    validate, validate_cpu, apply, apply_cpu = [], [], [], []
    for r in range(1, args.rounds):
        rows = by_round.get(r, [])
        if len(rows) < peers or r not in leader or r - 1 not in leader:
            continue
        last_submit = max(row["submitted_at"] for row in rows)
        close.append(leader[r]["closed_at"] - last_submit)
        applied.append(max(row["time"] for row in rows) - last_submit)
        leader_in.append(leader[r]["bytes_received"] - leader[r - 1]["bytes_received"])
        leader_out.append(leader[r]["bytes_sent"] - leader[r - 1]["bytes_sent"])
        payloads.append(leader[r]["payload_bytes"])
        before = {row["peer"]: row["bytes_received"] for row in by_round.get(r - 1, [])}
        peer_in.append(statistics.median(row["bytes_received"] - before.get(row["peer"], 0) for row in rows))
        sent = {row["peer"]: row["bytes_sent"] for row in by_round.get(r - 1, [])}
        peer_out.append(statistics.median(row["bytes_sent"] - sent.get(row["peer"], 0) for row in rows))
        validate.append(leader[r].get("validate_s", 0.0))
        validate_cpu.append(leader[r].get("validate_cpu_s", 0.0))
        apply.append(statistics.median(row["apply_s"] for row in rows))
        apply_cpu.append(statistics.median(row["apply_cpu_s"] for row in rows))
    if not close:
        raise RuntimeError(f"no complete round to measure; logs in {workdir}")
    med = statistics.median
    return {
        "close_s": med(close),
        "applied_s": med(applied),
        "leader_in": med(leader_in),
        "leader_out": med(leader_out),
        "payloads": med(payloads),
        "peer_in": med(peer_in),
        "peer_out": med(peer_out),
        "validate_s": med(validate),
        "validate_cpu_s": med(validate_cpu),
        "apply_s": med(apply),
        "apply_cpu_s": med(apply_cpu),
        "wall_s": time.perf_counter() - started,
    }


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
