"""What a peer that holds part of the model costs against a full replica: memory, bytes, join time.

Pipeline: a local swarm of a coordinator, `--full` full replicas and one `--stages`-stage group of
weak peers (`--memory-gb`, so the coordinator makes them stages), `--rounds` rounds. A stage holds,
downloads and applies its part of the state only (docs/modes/pipeline.md). SPES (`--spes-preset`):
a swarm of `--spes-peers` expert owners, against a SparseLoCo swarm of as many full replicas of the
same model. Printed per role, each the median over its peers: peak resident memory (ru_maxrss,
whole process: Python, torch, the DHT client), the agreed state it holds, bytes in per round
(rounds after the first; payloads or their parts, and state), start to holding the state, start to
its first contribution applied, and each figure's ratio to the full replica's.

Then each role's join into the running swarm, the issue's join: a full replica starts once the swarm
has run `--rounds` rounds, and once its first contribution is applied a stage is killed and a weak
peer starts in its place; each one's join is from its start to its first contribution applied, and
its download is its first row's bytes in. With `--link RATE:DELAY` the two joiners sit each behind
such a link in its own network namespace (root; launch/testbed.py) while the swarm they join is
unshaped: a volunteer on a home link joining a running swarm, whose download then costs what it does.

The issue's targets are for `1b` and 4 stages (RSS and bytes in at most 35% of a full replica's,
join at most 40%). On a CPU machine a small preset shows the same split of bytes, while its RSS and
join are dominated by what does not grow with the model (the interpreter, torch, the corpus).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.cluster import LocalCluster
from launch.testbed import placement
from models import count_parameters, get_preset
from swarm.modes import default_outer
from swarm.net.schema import to_plain

HELP = "a pipeline stage and an SPES owner against a full replica: peak RSS, state held, bytes in per round, join time"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
WEAK = ("--memory-gb", "0.001")
LATE_ROUNDS = 40  # rounds the coordinator runs past --rounds, for the joiners (the bench stops once they joined)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help="corpus (default %(default)s)")
    parser.add_argument("--preset", default="tiny", help="pipeline model (default %(default)s; the targets are for 1b)")
    parser.add_argument(
        "--layers", type=int, default=None, help="override the pipeline preset's layer count (to fit this machine's memory)"
    )
    parser.add_argument("--stages", type=int, default=4, help="stages of the group (default %(default)s)")
    parser.add_argument("--full", type=int, default=1, help="full replicas beside the group (default %(default)s)")
    parser.add_argument("--spes-preset", default="moe-tiny", help="SPES model; 'none' skips SPES (default %(default)s)")
    parser.add_argument(
        "--spes-peers", type=int, default=4, help="expert owners, and full replicas to compare (default %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds (a stage's first rows may be its group forming)")
    parser.add_argument("--inner-steps", type=int, default=2, help="H (default %(default)s)")
    parser.add_argument(
        "--link", default=None, help="the joiners' link, e.g. 20mbit:20ms (each in its own namespace; root). Default: loopback"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--workdir", default=None)


def run(args: argparse.Namespace) -> int:
    base = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-bench-memory-"))
    print(f"workdir {base}", flush=True)
    overrides = {"n_layers": args.layers} if args.layers else {}
    cfg = get_preset(args.preset, **overrides)
    shape = f"{args.preset}, {cfg.n_layers} layers" if overrides else args.preset
    print(f"pipeline: {shape} ({count_parameters(cfg) / 1e6:.1f}M params), {args.full} full + 1 group of {args.stages} stages")
    stages = {"stages": args.stages, "micro_batches": 1, "link_timeout_s": 60.0}
    pipeline = run_description(args, "pipeline", args.preset, stages)
    if overrides:
        pipeline["model_overrides"] = overrides
    roles = swarm_figures(base / "pipeline", pipeline, args, pipeline=True)
    print_table(roles, reference="full replica")
    if args.spes_preset != "none":
        cfg = get_preset(args.spes_preset)
        print(
            f"\nSPES: {args.spes_preset} ({count_parameters(cfg) / 1e6:.1f}M params), {args.spes_peers} owners vs as many replicas"
        )
        spes = swarm_figures(base / "spes", run_description(args, "spes", args.spes_preset), args, pipeline=False)
        replicas = swarm_figures(base / "sparseloco", run_description(args, "sparseloco", args.spes_preset), args, pipeline=False)
        print_table({"full replica": replicas["full replica"], "expert owner": spes["full replica"]}, reference="full replica")
    return 0


def run_description(args: argparse.Namespace, mode: str, preset: str, options: dict | None = None) -> dict:
    run = {
        "preset": preset,
        "mode": mode,
        "data_source": args.data,
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.inner_steps,
        "max_rounds": args.rounds,
        "round_timeout_s": 300.0,
        "heartbeat_interval_s": 2.0,
        "heartbeat_ttl_s": 20.0,
        "num_shards": 8,
        "eval_batches": 2,
        "outer": to_plain(default_outer(mode)),
    }
    if options:
        run["mode_options"] = options
    return run


def swarm_figures(workdir: Path, run: dict, args: argparse.Namespace, *, pipeline: bool) -> dict[str, dict[str, float]]:
    """Run one swarm for `--rounds` rounds; each role's median figures ("full replica", "stage")
    over those rounds. A pipeline swarm then takes the two joiners (`late_join`) and goes on until
    each one's first contribution is applied."""
    started: dict[str, float] = {}
    peers = args.full + args.stages if pipeline else args.spes_peers
    late = ("late-full", "late-stage") if pipeline else ()
    shaped = list(range(peers, peers + len(late))) if args.link else None
    stop_after = args.rounds + (LATE_ROUNDS if late else 0)
    with (
        placement(args.link if late else None, peers + len(late), tag="memory", shaped_peers=shaped) as place,
        LocalCluster(workdir, run, coordinator_args=("--stop-after", str(stop_after)), **place.coordinator) as cluster,
    ):
        if late:
            print(f"joiners: {place.note}", flush=True)
        for i in range(peers):
            name = f"p{i}"
            started[name] = time.time()
            weak = pipeline and i >= args.full
            cluster.add_peer(name, max_rounds=stop_after, extra=WEAK if weak else (), **place.peer(i))
        deadline = time.monotonic() + 600 + 300 * args.rounds
        _wait(cluster, workdir, deadline, lambda: cluster.rounds_completed(peers) >= args.rounds, f"{args.rounds} rounds")
        time.sleep(3.0)  # the last rows
        names = {f"peer-{cluster.peer_id(n)[-8:]}": n for n in started}
        by_peer: dict[str, list[dict]] = {}
        for r, rows_ in cluster.metrics_by_round().items():
            for row in rows_:
                if r < args.rounds and row["peer"] in names:
                    by_peer.setdefault(row["peer"], []).append(row)
        figures = role_figures(by_peer, {stem: started[name] for stem, name in names.items()})
        if late:
            figures["full replica"].update(late_join(cluster, "late-full", (), place.peer(peers), workdir))
            victim = f"p{args.full + args.stages // 2}"
            cluster.kill(victim)
            time.sleep(run["heartbeat_ttl_s"] + 5.0)  # until the coordinator no longer counts it
            figures["stage"].update(late_join(cluster, "late-stage", WEAK, place.peer(peers + 1), workdir))
    return figures


def late_join(cluster: LocalCluster, name: str, extra: tuple, where: dict, workdir: Path) -> dict[str, float]:
    """Start a peer into the running swarm; its start to holding the state, to its first
    contribution applied, and its download (its first row's bytes in)."""
    started = time.time()
    cluster.add_peer(name, max_rounds=LATE_ROUNDS, extra=extra, **where)

    def joined() -> dict | None:
        stem = f"peer-{cluster.peer_id(name)[-8:]}"
        rows = sorted(
            (row for rows in cluster.metrics_by_round().values() for row in rows if row["peer"] == stem), key=lambda r: r["round"]
        )
        first = next((r for r in rows if r["included"]), None)
        return {"rows": rows, "first": first} if first else None

    _wait(cluster, workdir, time.monotonic() + 1800, lambda: joined() is not None, f"{name}'s first contribution applied")
    got = joined()
    assert got is not None
    rows = got["rows"]
    figures = {
        "late_held_s": rows[0]["state_held_at"] - started,
        "late_join_s": got["first"]["time"] - started,
        "late_download": rows[0]["round_bytes_in"],
    }
    print(
        f"{name}: {figures['late_join_s']:.1f} s to its first contribution applied, {_mb(figures['late_download'])} in its first row",
        flush=True,
    )
    return figures


def _wait(cluster: LocalCluster, workdir: Path, deadline: float, done: Callable[[], bool], what: str) -> None:
    while time.monotonic() < deadline:
        if cluster.failed():
            raise RuntimeError(f"a swarm process failed; logs in {workdir}")
        if done():
            return
        time.sleep(1.0)
    raise RuntimeError(f"the swarm did not reach {what}; logs in {workdir}")


def role_figures(by_peer: dict[str, list[dict]], started: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each role's median figures from its peers' metrics rows (`started`: each peer's start time)."""
    figures: dict[str, list[dict[str, float]]] = {}
    for peer, rows in by_peer.items():
        rows = sorted(rows, key=lambda r: r["round"])
        role = "stage" if rows[-1]["role"].startswith("stage") else "full replica"
        first = next((r for r in rows if r["included"]), None)
        later = [r["round_bytes_in"] for r in rows[1:]]  # its first row holds its join's download
        figures.setdefault(role, []).append(
            {
                "rss_peak": max(r["rss_peak_bytes"] for r in rows),
                "state": rows[-1]["state_bytes"],
                "bytes_in": statistics.median(later) if later else float("nan"),
                "held_s": rows[-1]["state_held_at"] - started[peer],
                "join_s": first["time"] - started[peer] if first else float("nan"),
            }
        )
    return {role: {k: _median([f[k] for f in fs]) for k in fs[0]} for role, fs in figures.items()}


def _median(values: list[float]) -> float:
    known = [v for v in values if v == v]
    return statistics.median(known) if known else float("nan")


COLUMNS = (  # key, heading, width, kind
    ("rss_peak", "peak RSS", 12, "bytes"),
    ("state", "state held", 12, "bytes"),
    ("bytes_in", "bytes in/round", 16, "bytes"),
    ("held_s", "state held at", 15, "s"),
    ("join_s", "first applied", 15, "s"),
    ("late_download", "join download", 15, "bytes"),
    ("late_join_s", "join", 9, "s"),
)


def print_table(roles: dict[str, dict[str, Any]], *, reference: str) -> None:
    """One line per role (the join columns where they were measured), and each figure's ratio to the
    reference role's."""
    columns = [c for c in COLUMNS if any(c[0] in f for f in roles.values())]
    ref = roles.get(reference)
    roles = dict(sorted(roles.items(), key=lambda kv: kv[0] != reference))  # the reference first
    print(f"{'role':<16}" + "".join(f"{heading:>{width}}" for _, heading, width, _ in columns))
    for role, f in roles.items():
        cells = [_cell(f.get(key, float("nan")), kind) for key, _, _, kind in columns]
        print(f"{role:<16}" + "".join(f"{cell:>{width}}" for cell, (_, _, width, _) in zip(cells, columns)))
        if ref is not None and role != reference:
            ratios = [_ratio(f.get(key, float("nan")), ref.get(key, float("nan"))) for key, *_ in columns]
            print(f"{'  vs ' + reference:<16}" + "".join(f"{r:>{width}}" for r, (_, _, width, _) in zip(ratios, columns)))


def _cell(value: float, kind: str) -> str:
    if kind == "bytes":
        return _mb(value)
    return "-" if value != value else f"{value:.1f} s"


def _mb(n: float) -> str:
    if n != n:
        return "-"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b and a == a and b == b else "-"
