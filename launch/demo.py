"""`swarm-demo`: a whole swarm on this machine — a coordinator and N peers as separate processes.

It prints one line per round (loss, tokens/s, bytes on the wire, compression, whether every
replica holds the same weights) from the peers' metrics files, then stops everything it started,
also when stopped early by Ctrl+C or SIGTERM (exit status 130 or 143).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from launch.cluster import LocalCluster, SigtermUnwinds, stopped
from swarm.modes import available_modes, default_outer
from swarm.net.schema import to_plain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarm-demo", description="Run a local swarm: coordinator + N peers on this machine.")
    p.add_argument("--peers", type=int, default=None, help="full peers (default 3; 2 in mode pipeline)")
    p.add_argument(
        "--weak-peers",
        type=int,
        default=None,
        help="peers that announce too little memory for a replica (join-swarm --memory-gb): pipeline stages (default 2 in mode pipeline, else 0)",
    )
    p.add_argument("--mode-option", action="append", default=[], metavar="KEY=VALUE", help="a mode option, e.g. ratio=32")
    p.add_argument("--rounds", type=int, default=30, help="rounds to run before stopping (default %(default)s)")
    p.add_argument("--preset", default=None, help="model preset (default nano; moe-nano in mode spes)")
    p.add_argument("--mode", choices=available_modes(), default="sparseloco", help="training mode (default %(default)s)")
    p.add_argument("--data", default="stdlib", help="corpus (default: the Python standard library's sources)")
    p.add_argument("--inner-steps", type=int, default=10, help="H, inner steps per round (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--status-port", type=int, default=0, help="status page port on 127.0.0.1 (default: any free port)")
    p.add_argument("--workdir", default=None, help="where logs and metrics go (default: a temp dir)")
    p.add_argument("--init-from", default=None, help="fine-tune this checkpoint (swarm-train's, or a saved swarm state)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with SigtermUnwinds():  # SIGTERM unwinds as Ctrl+C does: the cluster reaps every process it started
            return _demo(args)
    except KeyboardInterrupt as e:
        return stopped("swarm-demo", e)


def _demo(args: argparse.Namespace) -> int:
    pipelined = args.mode == "pipeline"  # the demo of issue 9: 2 full replicas + one 2-stage group
    args.peers = args.peers if args.peers is not None else 2 if pipelined else 3
    args.weak_peers = args.weak_peers if args.weak_peers is not None else 2 if pipelined else 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-demo-"))
    run = {
        "preset": args.preset or ("moe-nano" if args.mode == "spes" else "nano"),
        "mode": args.mode,
        "data_source": args.data,
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": max(1, args.inner_steps),
        "round_timeout_s": 60.0,
        "heartbeat_interval_s": 2.0,
        "heartbeat_ttl_s": 8.0,
        "num_shards": max(1, args.peers + args.weak_peers),
        "mode_options": {**({"ratio": 32} if pipelined else {}), **dict(_option(o) for o in args.mode_option)},
        "max_rounds": args.rounds,
    }
    run["outer"] = to_plain(default_outer(args.mode))
    threads = max(1, (os.cpu_count() or 2) // (args.peers + args.weak_peers + 1))
    coordinator_args = ["--init-from", args.init_from] if args.init_from else []
    with LocalCluster(workdir, run, status_port=args.status_port, coordinator_args=coordinator_args) as cluster:
        print(f"logs and metrics in {workdir}", flush=True)
        print(f"coordinator at {cluster.address}", flush=True)
        if cluster.status_url:
            print(f"status page: {cluster.status_url}", flush=True)
        for i in range(args.peers):
            cluster.add_peer(f"peer-{i}", threads=threads, max_rounds=args.rounds)
        for i in range(args.weak_peers):
            cluster.add_peer(f"weak-{i}", threads=threads, max_rounds=args.rounds, extra=["--memory-gb", "0.001"])
        return _follow(cluster, args.rounds)


def _follow(cluster: LocalCluster, rounds: int) -> int:
    print(f"{'round':>5} {'loss':>8} {'tok/s':>8} {'sent':>9} {'recv':>9} {'payload':>9} {'ratio':>6}  replicas", flush=True)
    shown = 0
    deadline = time.monotonic() + 600 + 120 * rounds
    while shown < rounds and time.monotonic() < deadline:
        if cluster.failed():
            print("a process of the swarm exited with an error; see the logs", file=sys.stderr)
            return 1
        by_round = cluster.metrics_by_round()
        # A round is shown once every peer reported it, or once a later round exists (a peer that
        # was reloading state reports no row for the rounds it skipped).
        while shown in by_round and (len(by_round[shown]) >= cluster.num_peers or shown + 1 in by_round):
            print(_row(shown, by_round[shown]), flush=True)
            shown += 1
        time.sleep(0.5)
    return 0 if shown >= rounds else 1


def _option(text: str) -> tuple[str, int | float | bool | str]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _row(r: int, rows: list[dict]) -> str:
    trained = [x for x in rows if x.get("loss") is not None]
    loss = sum(x["loss"] for x in trained) / max(1, len(trained))
    tps = sum(x["tokens"] for x in rows) / max(x["round_s"] for x in rows)
    payload = max(x["payload_bytes"] for x in rows)
    ratio = max((x["compression"] or 0) for x in rows)
    same = "identical" if len({x["hash"] for x in rows}) == 1 else "DIFFER"
    return (
        f"{r:>5} {loss:>8.4f} {tps:>8.0f} {_mb(sum(x['bytes_sent'] for x in rows)):>9} "
        f"{_mb(sum(x['bytes_received'] for x in rows)):>9} {_mb(payload):>9} {ratio:>5.0f}x  {same}"
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}MB" if n >= 1e5 else f"{n / 1e3:.1f}KB"


if __name__ == "__main__":
    raise SystemExit(main())
