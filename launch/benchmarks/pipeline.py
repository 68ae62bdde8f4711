"""Pipelined replicas with compressed activations against full replicas, in one process.

R replicas train the same model on the same data for the same total tokens under SparseLoCo (the
run's real codec, per-slot mean and the pipeline mode's outer step, projection included):
(a) R full replicas; (b) R-1 full + one 2-stage pipelined replica, uncompressed (h crosses the link
in bf16); (c) as (b) with activations compressed to k = d/ratio (selective: only the pipelined
replica compresses); (d) every replica a compressed 2-stage pipeline. The link is simulated in the
autograd graph exactly as the stage link carries it: c = U^T (h - T[x]) rounded to bf16 forward,
dL/dc rounded to bf16 backward (T: T_fixed, plus the embedding's off-span part of the round when
it is folded). Compressed configurations run once per `--embedding-drift` way (fold, project). Printed: activation bytes per token per boundary (forward;
backward is the same), their ratio to fp32 dense activations, the time those bytes take per step
on a simulated link, eval loss of the final weights on the held-out split, its gap to (b), and
wall time (replicas run one after another on this machine's cores, links cost nothing here).
Differences from a real swarm: a pipelined replica clips its gradient over the whole model (stages
clip per stage) and sends one payload for both stages (the per-slot mean is the same).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import split_stages
from models.subspace import Subspace
from swarm.codec import SlotMean
from swarm.data.corpus import load_corpus
from swarm.data.sampler import eval_batches
from swarm.modes import default_outer, mode_for
from swarm.modes.pipeline.mode import project_state
from swarm.modes.pipeline.options import FULL_REPLICAS
from swarm.modes.pipeline.wire import bytes_per_token, round_trip
from swarm.modes.pipeline.worker import keep_in_subspace
from swarm.modes.replica import Replica, data_config, initial_state, optim_config
from swarm.net.transfer import Traffic
from swarm.round.payloads import PayloadEncoder, PayloadStore
from swarm.run import RunConfig
from swarm.train.step import Trainer, evaluate

HELP = "pipelined replicas, uncompressed and compressed (selective vs all), against full replicas"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help="corpus (default %(default)s)")
    parser.add_argument("--preset", default="tiny", help="model (default %(default)s, d = 384)")
    parser.add_argument(
        "--replicas", type=int, default=3, help="R, in every configuration (default %(default)s: the demo's 2 full + 1 pipelined)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="run size: outer rounds (default %(default)s)")
    parser.add_argument("--inner-steps", type=int, default=10, help="run size: H (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="per replica (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner peak lr")
    parser.add_argument("--ratios", default="8,32,96", help="compression ratios d/k (default %(default)s)")
    parser.add_argument("--link-mbps", type=float, default=80.0, help="simulated link for the time column (default %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--wire-dtype",
        default="bf16",
        choices=["bf16", "fp16", "fp32", "int8"],
        help="of compressed activations and their gradients ((b) always sends bf16; default %(default)s)",
    )
    parser.add_argument(
        "--constrain",
        default="all",
        choices=["all", "stages"],
        help="compressed runs: the agreed weights stay in span(U) as in the swarm (all), or, as an experiment the swarm "
        "does not run, only the pipelined replica's copy is projected and the full replicas stay unconstrained (stages)",
    )
    parser.add_argument(
        "--embedding-drift",
        default="fold,project",
        help="compressed runs: what happens to the embedding's part outside span(U), comma list (default %(default)s)",
    )
    parser.add_argument(
        "--full-replicas",
        default=None,
        help="selective runs: what a full replica holds in span(U) while it trains: nothing, the outer step projects its "
        "work (free); its writers after every inner step (writers); what a stage holds, writers and the embedding "
        "(stage); comma list, one (c) row per way (default: writers, as the swarm; free with --constrain stages)",
    )
    parser.add_argument(
        "--seeds",
        default="0",
        help="run seeds (model init, data order, U and T_fixed), comma list: every configuration runs once per seed and "
        "the table shows the median eval loss and the spread (default %(default)s)",
    )


class _Link(torch.autograd.Function):
    """The stage link in one graph: what stage 1 rebuilds from the bf16 message, and the bf16
    gradient stage 0 gets back."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, fixed: torch.Tensor | None, u: torch.Tensor | None, dtype: str) -> torch.Tensor:
        ctx.u, ctx.dtype = u, dtype
        if u is None or fixed is None:
            return round_trip(h, dtype)
        c = round_trip((h - fixed) @ u, dtype)  # (B, T, k) on the wire
        return c @ u.T + fixed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        u = ctx.u
        if u is None:
            return round_trip(grad, ctx.dtype), None, None, None
        grad_c = round_trip(grad @ u, ctx.dtype)  # (B, T, k) on the wire
        return grad_c @ u.T, None, None, None


class _Pipelined(nn.Module):
    """A model cut in two stages joined by the simulated link; forward returns what Trainer reads."""

    def __init__(self, model: nn.Module, subspace: Subspace | None, dtype: str) -> None:
        super().__init__()
        cfg: Any = model.cfg
        self.first, self.second = split_stages(model, [cfg.n_layers // 2])  # type: ignore[arg-type]
        self.subspace, self.dtype = subspace, dtype

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> SimpleNamespace:
        h = self.first(tokens)  # (B, T, C)
        sub = self.subspace
        h = _Link.apply(h, sub.table[tokens] if sub else None, sub.U if sub else None, self.dtype)
        logits = self.second(h)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return SimpleNamespace(loss=loss, lm_loss=loss)


@dataclass
class Result:
    name: str
    ratio: int
    pipelined: int
    eval_loss: float
    wall_s: float
    act_bytes: float  # per token per boundary, forward


@dataclass(frozen=True)
class Config:
    name: str
    ratio: int
    pipelined: int  # how many of the R replicas are 2-stage pipelines
    drift: str = "fold"
    full_replicas: str = "writers"


def simulate(args: argparse.Namespace, config: Config, seed: int = 0) -> Result:
    name, ratio, pipelined, drift = config.name, config.ratio, config.pipelined, config.drift
    run = RunConfig(
        run_id="bench-pipeline",
        mode="pipeline",
        mode_options={
            "ratio": ratio,
            "full_replicas": config.full_replicas,
            "embedding_drift": drift,
        },
        seed=seed,
        preset=args.preset,
        data_source=args.data,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        inner_steps=args.inner_steps,
        inner_lr=args.lr,
        warmup_steps=args.inner_steps,
        max_rounds=args.rounds,
        num_shards=max(8, args.replicas),
        outer=default_outer("pipeline"),
    )
    mode: Any = mode_for(run)
    dtype = args.wire_dtype if ratio > 1 else "bf16"
    start = time.perf_counter()
    corpus = load_corpus(data_config(run))
    state = initial_state(run)
    sub = mode.subspace
    if sub is not None:
        project_state(sub, state.params, mode.cfg.n_layers)
    replicas = [
        Replica(run, shard=i, device=torch.device("cpu"), corpus=corpus, prepare_model=mode.prepare_model)
        for i in range(args.replicas)
    ]
    if sub is not None and mode.options.full_replicas != "free":
        for rep in replicas[: args.replicas - pipelined]:
            keep_in_subspace(rep, sub, writers_only=mode.options.full_replicas == "writers")
    for rep in replicas[args.replicas - pipelined :]:
        rep.trainer = Trainer(_Pipelined(rep.model, sub, dtype), rep.optimizer, optim_config(run), device=torch.device("cpu"))
        if sub is not None:  # a stage keeps its writers in span(U) after every step
            keep_in_subspace(rep, sub)
    shapes = {n: tuple(t.shape) for n, t in state.params.items()}
    store = PayloadStore(run, shapes, Traffic())
    encoders = [PayloadEncoder(run, f"replica-{i}") for i in range(args.replicas)]
    for r in range(args.rounds):
        acc = SlotMean(shapes)
        loss = 0.0
        if sub is not None:
            sub.begin_round(state.params["tok_emb.weight"])
        staged = state
        if sub is not None and args.constrain == "stages":  # a stage's copy, projected on load
            staged = state.copy()
            project_state(sub, staged.params, mode.cfg.n_layers)
        for i, rep in enumerate(replicas):
            work = rep.train_round(staged if i >= args.replicas - pipelined else state)
            if work is None:
                raise RuntimeError("a replica stopped mid-round")
            loss = work.loss
            if sub is not None and args.constrain == "all":
                sub.project_(work.delta, mode.cfg.n_layers, sub.held_names(mode.cfg.n_layers))
            encoded = encoders[i].encode(work.delta, r)
            acc.add(store.decode(encoded.data, sender=f"replica-{i}", round_no=r))
        if args.constrain == "stages":  # the agreed weights stay unconstrained
            state.apply_outer_step(acc.mean(), run.outer)
        else:
            mode.outer_step(state, acc.mean())
        print(f"  {name} (seed {seed}): round {r} done, last replica loss {loss:.4f}", flush=True)
    batches = eval_batches(corpus.eval_tokens, batch_size=args.batch_size, seq_len=args.seq_len, max_batches=args.eval_batches)
    state.load_into(replicas[0].model)
    loss = evaluate(replicas[0].model, batches, device=torch.device("cpu"))
    width = sub.k if sub is not None else mode.cfg.d_model
    act = float(bytes_per_token(width, dtype)) if pipelined else 0.0
    return Result(name, ratio, pipelined, loss, time.perf_counter() - start, act_bytes=act)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [int(x) for x in args.ratios.split(",") if x]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    ways = args.full_replicas or ("writers" if args.constrain == "all" else "free")
    projections = [x for x in ways.split(",") if x]
    if not seeds:
        raise SystemExit("--seeds needs at least one seed")
    if not projections or any(p not in FULL_REPLICAS for p in projections):
        raise SystemExit(f"--full-replicas takes {', '.join(FULL_REPLICAS)}, got {ways!r}")
    if projections != ["free"] and args.constrain != "all":
        raise SystemExit("--full-replicas writers or stage needs --constrain all")
    drifts = [x for x in args.embedding_drift.split(",") if x]
    if not drifts or any(d not in ("fold", "project") for d in drifts):
        raise SystemExit(f"--embedding-drift takes fold and/or project, got {args.embedding_drift!r}")
    tokens = args.replicas * args.batch_size * args.seq_len * args.inner_steps * args.rounds
    print(
        f"{args.preset}, {args.replicas} replicas x H={args.inner_steps} x {args.rounds} rounds = {tokens:,} tokens per "
        f"configuration; ratios {ratios}, compressed activations in {args.wire_dtype}; full replicas of selective runs "
        f"hold {' / '.join(projections)} in span(U); subspace binds {args.constrain}; seeds {seeds}; data {args.data}",
        flush=True,
    )
    configs = [Config("(a) full replicas", 1, 0), Config("(b) 1 pipelined, uncompressed", 1, 1)]
    for drift in drifts:
        for way in projections:
            configs += [Config(selective_name(q, drift, way), q, 1, drift, way) for q in ratios]
        configs += [Config(f"(d) all compressed, ratio {q}, {drift}", q, args.replicas, drift) for q in ratios]
    results = {config: [simulate(args, config, seed) for seed in seeds] for config in configs}
    _print(args, results, ratios, drifts, projections)
    return 0


def selective_name(ratio: int, drift: str, way: str) -> str:
    return f"(c) selective, ratio {ratio}, {drift}" + ("" if way == "writers" else f", full: {way}")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _print(
    args: argparse.Namespace, results: dict[Config, list[Result]], ratios: list[int], drifts: list[str], projections: list[str]
) -> None:
    """One row per configuration: median over seeds (and the spread when there are several); then,
    per ratio, selective against all compressed seed by seed (same seed: same init, data and U)."""
    d = mode_d(args.preset)
    dense = 4.0 * d  # fp32 activations, bytes per token
    step_tokens = args.batch_size * args.seq_len
    several = len(next(iter(results.values()))) > 1
    loss = {c.name: _median([r.eval_loss for r in rs]) for c, rs in results.items()}
    by_name = {c.name: rs for c, rs in results.items()}
    base = next(v for n, v in loss.items() if n.startswith("(b)"))
    print()
    spread = f" {'min-max':>15}" if several else ""
    head = f"{'configuration':<48} {'act B/token':>11} {'fp32/act':>9} {'link s/step':>11} {'eval loss':>10}{spread} {'gap to (b)':>10} {'wall s':>8}"
    print(head)
    for config, rs in results.items():
        act_bytes = rs[0].act_bytes
        fewer = f"{dense / act_bytes:.0f}x" if act_bytes else "-"
        link = f"{2 * act_bytes * step_tokens * 8 / (args.link_mbps * 1e6):.3f}" if act_bytes else "-"
        gap = (loss[config.name] - base) / base
        act = f"{act_bytes:.0f}" if act_bytes else "-"
        lo, hi = min(r.eval_loss for r in rs), max(r.eval_loss for r in rs)
        extra = f" {f'{lo:.4f}-{hi:.4f}':>15}" if several else ""
        wall = _median([r.wall_s for r in rs])
        print(f"{config.name:<48} {act:>11} {fewer:>9} {link:>11} {loss[config.name]:>10.4f}{extra} {gap:>+10.2%} {wall:>8.0f}")
    print()
    print(f"link column: forward + backward bytes of one {args.batch_size}x{args.seq_len} batch at {args.link_mbps:g} Mb/s")
    if several:
        print("eval loss: median over seeds; selective vs all compared seed by seed (the same seed gives both the same start)")
    for drift in drifts:
        for q in ratios:
            all_name = f"(d) all compressed, ratio {q}, {drift}"
            for way in projections:
                name = selective_name(q, drift, way)
                ratio = dense / by_name[name][0].act_bytes
                gap = (loss[name] - base) / base
                target = "<= 5% at >= 100x" if ratio >= 100 else "<= 2% at >= 25x" if ratio >= 25 else "(no target)"
                diffs = [(c.eval_loss - a.eval_loss) / a.eval_loss for c, a in zip(by_name[name], by_name[all_name])]
                wins = sum(x <= 0 for x in diffs)
                verdict = "selective <= all" if loss[name] <= loss[all_name] else "selective WORSE"
                per_seed = (
                    f"; selective <= all in {wins} of {len(diffs)} seeds, median difference {_median(diffs):+.2%}"
                    if several
                    else ""
                )
                print(
                    f"{name[4:]}: {ratio:.0f}x fewer bytes than fp32, gap {gap:+.2%} (target {target}); "
                    f"selective {loss[name]:.4f} vs all-compressed {loss[all_name]:.4f} ({verdict}){per_seed}"
                )


def mode_d(preset: str) -> int:
    from models import get_preset

    return get_preset(preset).d_model
