"""swarm-bench trust: what scoring contributions by loss costs, and what attacks get against it.

Two tables, one run:
  * the cost of scoring: the coordinator's probe (swarm/round/usefulness.py: one forward pass of a
    few held-out sequences per contribution, plus one) for R contributions, against the compute of
    one peer's round (H inner steps at batch B × T, from its measured step time), per preset;
  * attacks in the simulator with real training (swarm-sim's production round code, `nano` replicas):
    the honest-only run as the baseline, then one operator holding as many identities as there are
    honest peers (sign flip, evasion above the cosine cut, framing), and usurpers while the
    coordinator is away: the final eval loss against the baseline, how many honest contributions
    the coordinator refused, and how many hostile contributions any honest node applied.

    swarm-bench trust                        # both tables (nano and tiny scoring; 4 attack rows)
    swarm-bench trust --presets tiny --contributions 4 16 --no-attacks
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from launch.cluster import DATA
from swarm.data.corpus import load_corpus
from swarm.modes import mode_for
from swarm.modes.replica import data_config, initial_state, measure_tokens_per_s
from swarm.run import RunConfig
from swarm.sim.faults import Fault
from swarm.sim.runner import SimConfig, Simulation

HELP = "cost of scoring contributions by loss, and Sybil/usurper attacks in the simulator"
DEFAULT_DATA = str(DATA) if DATA.exists() else "stdlib"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="*", default=["nano", "tiny"])
    parser.add_argument("--contributions", type=int, nargs="*", default=[4, 16], help="R scored per round")
    parser.add_argument("--inner-steps", type=int, default=30, help="H of the round the cost is compared with")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="probe timings per row (the median is printed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the coordinator's probe and a peer alike)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each attack row")
    parser.add_argument("--no-attacks", action="store_true", help="only the cost table")
    parser.add_argument(
        "--honest-rounds", type=int, default=100, help="rounds of the honest runs counting refusals (0: skip them)"
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    print(
        f"scoring cost ({args.threads} thread(s); a peer's round: H = {args.inner_steps}, batch {args.batch_size} × {args.seq_len})"
    )
    # Against one peer's round: what the scorer, which does not train, adds while the peers train
    # the next round (overlapped: hidden while below one). Against the round's compute: the R
    # trainers' inner steps together, what the swarm spends on the round.
    print("| preset | R | probe s/round | peer inner steps s/round | probe / a peer's round | probe / the round's compute |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for n, probe_s, round_s in cost_rows(preset, args):
            row = f"| {preset} | {n} | {probe_s:.3f} | {round_s:.1f} | {100 * probe_s / round_s:.2f}% | {100 * probe_s / (n * round_s):.2f}% |"
            print(row, flush=True)
    if not args.no_attacks:
        print()
        attack_table(args.data, args.rounds)
    if args.honest_rounds:
        print()
        honest_table(args.data, args.honest_rounds)
    return 0


def trained_sim(data: str, **fields: object) -> SimConfig:
    """A simulated swarm of `nano` replicas training for real on `data`."""
    return SimConfig(model="nano", data=data, round_timeout_s=15.0, step_s=(0.5, 0.6), **fields)  # type: ignore[arg-type]


def honest_table(data: str, rounds: int) -> None:
    """Honest swarms over many rounds, each peer on its own data shard (non-IID: shards are
    disjoint stretches of the corpus): how much honest work the coordinator refused."""
    print(f"honest runs in the simulator (nano, real training, 4 peers, {rounds} rounds, H = 10, batch 8 × 64)")
    print(
        "| mode | contributions applied | hurting: applied on credit | deferred (no strike) | refused and struck | left out otherwise | peers banned | eval loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("sparseloco", "diloco"):
        cfg = trained_sim(data, seed=7, peers=4, rounds=rounds, mode=mode, inner_steps=10, batch_size=8, seq_len=64, min_peers=4)
        sim = Simulation(cfg)
        hurting, paid, deferred = count_refusals(sim)
        sim.loop.run_until_complete(sim.main())
        result = sim.result()
        applied = [a for a in sim.ledger.applied if a.node == "coordinator" and a.round < rounds]
        listed = sum(len(a.entries) for a in applied)
        left_out = sum(len({p.peer_id for p in sim.peers} - set(a.entries)) for a in applied) - len(hurting) - len(deferred)
        banned = sum(sim.coordinator.agreement.validator.banned(p.peer_id) for p in sim.peers)
        loss = result.eval_loss or float("nan")
        row = f"| {mode} | {listed} | {len(paid)} | {len(deferred)} | {len(hurting)} | {left_out} | {banned} | {loss:.4f} |"
        print(row, flush=True)


def count_refusals(sim: Simulation) -> tuple[list[str], list[str], list[str]]:
    """The coordinator's refusals (with a strike) of contributions as hurting the loss, the hurting
    ones it applied on their senders' credit, and those it deferred, as they happen (its event log
    keeps only the latest few)."""
    refused: list[str] = []
    paid: list[str] = []
    deferred: list[str] = []
    node = sim.coordinator.node
    log_event = node.log_event

    def counting(kind: str, text: str) -> None:
        if kind == "reject" and "deferred: " in text:
            deferred.append(text)
        elif kind == "reject" and "raises the loss" in text:
            refused.append(text)
        elif kind == "credit":
            paid.append(text)
        log_event(kind, text)

    node.log_event = counting  # type: ignore[method-assign]
    return refused, paid, deferred


def cost_rows(preset: str, args: argparse.Namespace) -> list[tuple[int, float, float]]:
    run_ = RunConfig(preset=preset, data_source=args.data, batch_size=args.batch_size, seq_len=args.seq_len)
    run_.inner_steps = args.inner_steps
    corpus = load_corpus(data_config(run_))
    probe = mode_for(run_).make_probe(corpus)
    state = initial_state(run_)
    step_s = args.batch_size * args.seq_len / measure_tokens_per_s(run_, torch.device("cpu"), steps=3)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in args.contributions:
        updates = []
        for _ in range(n):  # sparse, as a SparseLoCo share is: 1/64 of the entries
            update = {}
            for name, t in state.params.items():
                u = torch.randn(t.shape, generator=g) * 1e-3
                update[name] = u * (torch.rand(t.shape, generator=g) < 1 / 64)
            updates.append(update)
        times = []
        for seed in range(args.repeats):
            started = time.perf_counter()
            probe.losses(state, updates, seed)
            times.append(time.perf_counter() - started)
        rows.append((n, statistics.median(times), step_s * args.inner_steps))
    return rows


ATTACK_ROWS: list[tuple[str, int, list[str], bool]] = [
    # (name, honest peers, attackers, coordinator leaves after two rounds)
    ("honest only", 3, [], False),
    ("3 Sybils: flip, evade, frame", 3, ["sign-flip", "evade", "frame"], False),
    ("3 Sybils framing", 3, ["frame", "frame", "frame"], False),
    ("3 Sybils shrinking (× 0.01, helpful)", 3, ["shrink", "shrink", "shrink"], False),
    ("3 Sybils: noise, evade, copy (80% of an honest payload)", 3, ["noise", "evade", "copy"], False),
    ("honest only, 32 peers", 32, [], False),
    ("32 Sybils beside 32 honest (8 each: flip, evade, frame, shrink)", 32, ["sign-flip", "evade", "frame", "shrink"] * 8, False),
    ("coordinator away, honest", 4, [], True),
    ("coordinator away, 2 usurpers of 6", 4, ["usurp", "usurp"], True),
]


def attack_table(data: str, rounds: int) -> None:
    print(f"attacks in the simulator (nano, real training, {rounds} rounds, H = 3, batch 2 × 32)")
    print("| run | eval loss | vs its honest run | honest refused | hostile applied | rounds |")
    print("|---|---|---|---|---|---|")
    baselines: dict[tuple[int, bool], float] = {}
    for name, honest, attackers, away in ATTACK_ROWS:
        schedule = [Fault(9.0, "coordinator-leave", "coordinator")] if away else []  # once peers have standing
        cfg = trained_sim(
            data,
            seed=3,
            peers=honest,
            rounds=rounds,
            inner_steps=3,
            batch_size=2,
            seq_len=32,
            attackers=attackers,
            schedule=schedule,
            min_peers=1 if away else honest + len(attackers),
        )
        sim = Simulation(cfg)
        sim.loop.run_until_complete(sim.main())
        result = sim.result()
        hostile = {p.peer_id for p in sim.peers if not p.honest}
        honest_ids = {p.peer_id for p in sim.peers if p.honest}
        applied = [a for a in sim.ledger.applied if a.node == sim.peers[0].name]
        hostile_applied = sum(len(hostile & set(a.entries)) for a in applied)
        refused = sum(1 for a in applied if a.leader == sim.coordinator.peer_id for p in honest_ids - set(a.entries))
        loss = result.eval_loss or float("nan")
        base = baselines.setdefault((honest, away), loss)
        print(f"| {name} | {loss:.4f} | {loss / base:.3f} | {refused} | {hostile_applied} | {result.rounds_closed} |", flush=True)
