"""Volunteers behind NAT on shaped links (launch/testbed.py; needs root): an all-public swarm against
one where half the peers sit behind their own NAT router, same model, link and rounds.

Printed: median round time (coordinator's round closings, after the first round), bytes per round
crossing each kind of host's link as the kernel counts them (so relayed traffic shows up at the
relaying host, the coordinator: NAT'd peers bootstrap through it and use it as their relay), whether
every peer contributed and replicas stayed identical, and the join-to-first-contribution time of a
volunteer that joins the running swarm: public in the first swarm, behind NAT in the second (from
starting `join-swarm` to the round that applied its first payload closing)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from launch.benchmarks.swarm import DEFAULT_TEXT
from launch.cluster import LocalCluster, wait_for
from launch.testbed import Host, placement
from models import count_parameters, get_preset

HELP = "all-public vs half-NAT'd swarm on shaped links: round time, bytes per link, NAT'd join time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help="corpus (default %(default)s)")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--link", default="20mbit:50ms", help="every host's link, RATE:DELAY[:LOSS] (default %(default)s)")
    parser.add_argument("--peers", type=int, default=4, help="peers at the start; half behind NAT in the second swarm")
    parser.add_argument("--rounds", type=int, default=6, help="rounds measured (default %(default)s)")
    parser.add_argument("--inner-steps", type=int, default=10, help="H (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--workdir", default=None)


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-bench-nat-"))
    params = count_parameters(get_preset(args.preset))
    print(f"{args.preset} ({params:,} params), {args.peers} peers, H={args.inner_steps}, link {args.link}; logs in {workdir}")
    results = {}
    for label, nat in (("all public", 0), ("half behind NAT", args.peers // 2)):
        results[label] = run_one(args, workdir / label.replace(" ", "-"), nat)
    _print_table(results)
    return 0


def _run_description(args: argparse.Namespace) -> dict:
    return {
        "preset": args.preset,
        "mode": "sparseloco",
        "data_source": args.data,
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.inner_steps,
        "round_timeout_s": 60.0,
        "heartbeat_interval_s": 2.0,
        "heartbeat_ttl_s": 10.0,
        "num_shards": args.peers + 1,
        "eval_batches": 2,
    }


def run_one(args: argparse.Namespace, workdir: Path, nat_peers: int) -> dict:
    """A swarm of args.peers (the last `nat_peers` behind NAT) plus one late joiner of the same kind."""
    total = args.peers + 1  # the joiner's host is made up front, like the others
    with (
        placement(args.link, total, nat_peers=nat_peers + (1 if nat_peers else 0), tag="bnat") as place,
        LocalCluster(workdir, _run_description(args), **place.coordinator) as cluster,
    ):
        print(f"{workdir.name}: {place.note}", flush=True)
        names = [f"peer{i}" for i in range(total)]
        for i, name in enumerate(names[:-1]):
            cluster.add_peer(name, threads=1, **place.peer(i))
        wait_for(lambda: cluster.rounds_completed(args.peers) >= 2, 600, "two rounds with every peer", cluster)
        joiner = names[-1]
        spawned = time.time()
        cluster.add_peer(joiner, threads=1, **place.peer(total - 1))
        first = wait_for(lambda: cluster.first_contribution(joiner, included=True), 600, "the joiner's first payload", cluster)
        start_round = cluster.rounds_completed(total)
        before = _link_bytes(place.hosts)
        wait_for(lambda: cluster.rounds_completed(total) >= start_round + args.rounds, 300 * args.rounds, "rounds", cluster)
        after = _link_bytes(place.hosts)
        closed = _closings(workdir)
        by_round = cluster.metrics_by_round()
        measured = [r for r in sorted(by_round) if start_round <= r < start_round + args.rounds]
        contributed_at = closed.get(first)
        per_round = {name: (after[name] - before[name]) / args.rounds for name in before}
        return {
            "round_s": statistics.median(closed[r] - closed[r - 1] for r in measured if r in closed and r - 1 in closed),
            "coordinator_bytes": per_round.get("coord", 0.0),
            "public_bytes": _mean(v for k, v in per_round.items() if k != "coord" and not place.hosts[k].nat),
            "nat_bytes": _mean(v for k, v in per_round.items() if place.hosts[k].nat),
            "all_bytes": sum(per_round.values()),
            "everyone": all(sum(1 for row in by_round[r] if row.get("included")) == total for r in measured),
            "identical": all(len({row["hash"] for row in by_round[r]}) == 1 for r in measured),
            "join_s": (contributed_at - spawned) if contributed_at else float("nan"),
            "joiner_nat": bool(nat_peers),
        }


def _link_bytes(hosts: dict[str, Host]) -> dict[str, int]:
    """Bytes sent + received on each host's link so far (the kernel's counters)."""
    return {name: sum(host.interface_bytes()) for name, host in hosts.items()}


def _closings(workdir: Path) -> dict[int, float]:
    path = workdir / "coordinator" / "rounds.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    when = {row["round"]: row.get("closed_at", row.get("time")) for row in rows}  # the final row has neither
    return {r: t for r, t in when.items() if t is not None}


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def _print_table(results: dict[str, dict]) -> None:
    labels = list(results)
    print()
    print(f"{'':<40}" + "".join(f"{label:>18}" for label in labels))
    rows = [
        ("round time (s, median)", lambda r: f"{r['round_s']:.1f}"),
        ("bytes / round, all links", lambda r: f"{r['all_bytes'] / 1e3:,.0f} kB"),
        ("  coordinator's link (the relay)", lambda r: f"{r['coordinator_bytes'] / 1e3:,.0f} kB"),
        ("  a public peer's link", lambda r: f"{r['public_bytes'] / 1e3:,.0f} kB"),
        ("  a NAT'd peer's link", lambda r: f"{r['nat_bytes'] / 1e3:,.0f} kB" if r["nat_bytes"] else "-"),
        ("every peer in every round", lambda r: str(r["everyone"])),
        ("replicas identical", lambda r: str(r["identical"])),
        ("join to first contribution (s)", lambda r: f"{r['join_s']:.0f} ({'NAT' if r['joiner_nat'] else 'public'})"),
    ]
    for name, show in rows:
        print(f"{name:<40}" + "".join(f"{show(results[label]):>18}" for label in labels))
    public, nat = (results[label] for label in labels)
    print(
        f"\nbehind NAT / all public: round time {nat['round_s'] / public['round_s']:.2f}x, "
        f"coordinator's bytes {nat['coordinator_bytes'] / max(1.0, public['coordinator_bytes']):.2f}x, "
        f"all bytes {nat['all_bytes'] / max(1.0, public['all_bytes']):.2f}x"
    )
