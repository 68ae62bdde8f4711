"""swarm-sim: the round protocol in virtual time, a coordinator and N peers in one process.

Each seed draws the peers' links from a network profile, their step times, and (with --faults) a
schedule of crashes, restarts, partitions, slow peers, leaving peers and coordinator outages. The
production round code runs against a simulated network on a virtual clock; the invariants
(docs/simulation.md) are checked after every round any node settles. A broken invariant prints
the seed, the fault schedule and the last events, and the command exits 1:

    swarm-sim --seeds 0..199 --faults all          # many random schedules
    swarm-sim --seed 17 --faults all --trace       # one seed again, its whole trace
    swarm-sim --peers 8 --attack idle --attack sign-flip --profile volunteers
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from swarm.sim.faults import KINDS
from swarm.sim.hostile import ATTACKS
from swarm.sim.runner import SimConfig, SimResult, simulate


def seed_range(text: str) -> range:
    """'7' or '0..199' (both ends included)."""
    low, sep, high = text.partition("..")
    try:
        first, last = int(low), int(high) if sep else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are N or A..B, got {text!r}") from None
    if last < first:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}")
    return range(first, last + 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", "--seed", type=seed_range, default=range(0, 1), help="a seed or a range A..B (default 0)")
    p.add_argument("--peers", type=int, default=4, help="honest peers (default 4)")
    p.add_argument("--rounds", type=int, default=6, help="rounds each honest peer settles (default 6)")
    p.add_argument("--profile", default="lan", help="network profile: lan, datacenter, volunteers, or a .json file")
    p.add_argument("--faults", nargs="*", default=[], help=f"fault kinds to draw ({', '.join(KINDS)}, or all)")
    p.add_argument("--attack", action="append", default=[], help=f"add a hostile peer ({', '.join(sorted(ATTACKS))})")
    p.add_argument("--round-timeout", type=float, default=20.0, help="round_timeout_s of the run (default 20)")
    p.add_argument("--inner-steps", type=int, default=10, help="H (default 10)")
    p.add_argument("--heartbeat-s", type=float, default=2.0, help="heartbeat interval (default 2; production's is 5), TTL 5× it")
    p.add_argument(
        "--step-s", type=float, nargs=2, default=(0.5, 1.5), metavar=("LOW", "HIGH"), help="range of a peer's inner-step time"
    )
    p.add_argument("--overlap", action="store_true", help="peers train round r+1 while round r settles (production default)")
    p.add_argument(
        "--payload-bytes", type=float, default=0, help="`sized` payloads: each travels as this many bytes (e.g. 20e6 for 1B)"
    )
    p.add_argument("--state-bytes", type=float, default=0, help="`sized` state downloads (e.g. 4e9 for 1B in fp32)")
    p.add_argument(
        "--cpu-s",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("CHECK", "APPLY"),
        help="compute per payload: a leader's checks of a submission, a node's apply of one (`swarm-bench scale` measures both)",
    )
    p.add_argument(
        "--model",
        default="",
        metavar="PRESET",
        help="peers train this preset for real (H inner AdamW steps on their shards, the real codec) and the line"
        " ends with the eval loss; default: seeded pseudo-gradients on a small model",
    )
    p.add_argument("--data", default="stdlib", help="with --model: the corpus (default stdlib)")
    p.add_argument("--min-peers", type=int, default=1, help="contributions a round waits for (the run's min_peers)")
    p.add_argument("--batch-size", type=int, default=4, help="with --model: sequences per inner step")
    p.add_argument("--seq-len", type=int, default=64, help="with --model: tokens per sequence")
    p.add_argument(
        "--aggregate-from",
        type=int,
        default=0,
        metavar="N",
        help="coordinator-led rounds of N or more contributions, or in a swarm of N or more members, carry their aggregate, which nodes apply instead of every payload (0: never)",
    )
    p.add_argument("--trace", action="store_true", help="print every seed's event trace")
    return p


def describe(result: SimResult) -> str:
    closes, applied = result.close_s, result.all_applied_s
    close = f"close p50 {statistics.median(closes):.1f}s max {max(closes):.1f}s" if closes else "no round closed"
    if applied:
        close += (
            f", all applied p50 {statistics.median(applied):.1f}s p99 {_p99(applied):.1f}s after the last accepted submission"
        )
        if len(applied) < result.rounds_closed:  # the others: some honest node up never held their state
            close += f" ({len(applied)} of {result.rounds_closed} rounds)"
    elif closes:
        close += ", no round applied by every honest node up"
    rounds = max(1, result.rounds_closed)
    peers = [n for n in result.bytes_in if n != "coordinator"]
    traffic = (
        f"coordinator in {result.bytes_in['coordinator'] / rounds / 1e6:.2f} MB/round, a peer in/out (median)"
        f" {statistics.median(result.bytes_in[n] for n in peers) / rounds / 1e6:.2f}"
        f"/{statistics.median(result.bytes_out[n] for n in peers) / rounds / 1e6:.2f} MB/round"
    )
    short = result.honest_done < result.honest_up
    done = f"; only {result.honest_done} of {result.honest_up} honest nodes up hold θ({result.config.rounds})" if short else ""
    loss = f"; eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    return f"seed {result.config.seed}: {result.rounds_closed} rounds, {close}; {traffic}; {result.virtual_s:.0f} virtual s{loss}{done}"


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("swarm").setLevel(logging.ERROR)  # the trace is the output; node logs would drown it
    logging.getLogger("models").setLevel(logging.ERROR)
    failed: list[int] = []
    started = time.perf_counter()
    for seed in args.seeds:
        seed_started = time.perf_counter()
        try:
            cfg = SimConfig(
                seed=seed,
                peers=args.peers,
                rounds=args.rounds,
                profile=args.profile,
                faults=args.faults,
                attackers=args.attack,
                round_timeout_s=args.round_timeout,
                heartbeat_s=args.heartbeat_s,
                cpu_s=(args.cpu_s[0], args.cpu_s[1]),
                aggregate_from=args.aggregate_from,
                model=args.model,
                min_peers=args.min_peers,
                data=args.data,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                inner_steps=args.inner_steps,
                step_s=(args.step_s[0], args.step_s[1]),
                overlap=args.overlap,
                payload_bytes=int(args.payload_bytes),
                state_bytes=int(args.state_bytes),
            )
            result = simulate(cfg)
        except ValueError as e:
            raise SystemExit(f"swarm-sim: {e}") from None
        print(f"{describe(result)} ({time.perf_counter() - seed_started:.1f}s wall)", flush=True)
        if args.trace or not result.ok:
            print("\n".join(f"    {line}" for line in result.trace))
        if not result.ok:
            failed.append(seed)
            for v in result.violations:
                print(f"  VIOLATION {v}")
            print(f"  reproduce: swarm-sim --seed {seed} {' '.join(_flags(args))} --trace")
    elapsed = time.perf_counter() - started
    print(f"{len(args.seeds)} seeds in {elapsed:.1f}s: {len(failed)} with violations {failed if failed else ''}".rstrip())
    return 1 if failed else 0


def _flags(args: argparse.Namespace) -> list[str]:
    flags = [f"--peers {args.peers}", f"--rounds {args.rounds}", f"--profile {args.profile}"]
    flags += [f"--round-timeout {args.round_timeout:g}", f"--inner-steps {args.inner_steps}"]
    flags += [f"--heartbeat-s {args.heartbeat_s:g}"] if args.heartbeat_s != 2.0 else []
    flags += [f"--cpu-s {args.cpu_s[0]:g} {args.cpu_s[1]:g}"] if any(args.cpu_s) else []
    flags += [f"--step-s {args.step_s[0]:g} {args.step_s[1]:g}"] + (["--overlap"] if args.overlap else [])
    flags += [f"--payload-bytes {args.payload_bytes:g}"] if args.payload_bytes else []
    flags += [f"--state-bytes {args.state_bytes:g}"] if args.state_bytes else []
    if args.faults:
        flags.append("--faults " + " ".join(args.faults))
    flags += [f"--attack {a}" for a in args.attack]
    return flags


if __name__ == "__main__":
    sys.exit(main())
