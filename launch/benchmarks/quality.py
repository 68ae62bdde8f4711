"""SparseLoCo's eval loss against dense DiLoCo's at equal tokens, without the network.

R replicas train in turn in this one process with the swarm's own pieces: `Replica` (H inner AdamW
steps on its data shard), `PayloadEncoder` (codec and error feedback), the payload wire format
(every payload is encoded and decoded), the per-slot mean and the mode's outer step, and with
`--overlap` the one-step-delayed schedule of swarm/round/overlap.py. Only timing and transport are left
out, so a sweep over H, density, chunk size, beta and alpha takes minutes, not hours, and every
figure is deterministic. Payload bytes are the real encoded sizes.

Each row is one setting (`name=value,...` of OuterConfig fields, `H=` for inner steps, or
`reduce=topk|topk2|topk3|topk4`: the round's mean compressed again, issue 21's aggregate; `reduce=count`:
each coordinate averaged over the payloads that selected it; `adam=reset`: the inner AdamW state
cleared every round); the
table prints eval loss on the whole held-out split after the last round, bytes per round per
replica, and both against the DiLoCo row. The `solo` row is one machine training on all the data:
one model, batch R × B, the same number of inner steps, learning-rate schedule and tokens as every
swarm row, so each row's ratio to one machine is printed too. `--jobs` runs rows side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from models import count_parameters, get_preset
from swarm.codec import SlotMean, SparseLoCoCompressor, decode_tensor
from swarm.data.corpus import load_corpus
from swarm.modes import default_outer, mode_for
from swarm.modes.replica import Replica, data_config, initial_state
from swarm.net.transfer import Traffic
from swarm.round.overlap import next_base
from swarm.round.payloads import PayloadEncoder, PayloadStore, aggregate_config
from swarm.run import OuterConfig, RunConfig
from swarm.state import GlobalState

HELP = "SparseLoCo vs DiLoCo eval loss at equal tokens, in-process (sweep H, density, chunk, beta, alpha, overlap)"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
WHOLE_EVAL_SPLIT = 10**6
DEFAULT_ROWS = ("solo", "diloco", "sparseloco", "sparseloco:overlap=0")


@dataclass
class SimResult:
    eval_loss: float
    payload_bytes: float  # median encoded payload per replica per round
    hashes: list[list[str]]  # per round, the agreed state hash each replica computed
    wall_s: float
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (round, eval loss) every --eval-every


BASES = ("payload", "share", "agreed", "own")
REDUCE = ("all", "topk", "topk2", "topk3", "topk4", "count")  # topkN: the aggregate at N times one payload's density;
# count: each coordinate averaged over the payloads that selected it, not over all R


def simulate(
    run: RunConfig,
    replicas: int,
    *,
    corpus: object | None = None,
    base: str = "payload",
    eval_every: int = 0,
    reduce: str = "all",
    reset_adam: bool = False,
) -> SimResult:
    """`run.max_rounds` rounds of `replicas` replicas; every replica applies every payload itself.
    `base` (with overlap) is where round r+1's inner steps start: θ(r) advanced by the replica's own
    payload as the mean ("payload"), by its 1/R share of the mean ("share"), θ(r) itself ("agreed"),
    or θ(r) − Δ_r, the whole local progress ("own", kept to show why not, see overlap.py).
    `reduce`: "all" applies the mean of every payload; "topk" applies the mean compressed again to
    one payload's density (top-k per chunk, 2-bit values), what issue 21's aggregators would publish,
    and each replica puts back into its error buffer its own sent values at the coordinates the
    second compression dropped (docs/performance.md, "The plan for issue 21")."""
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be one of {', '.join(REDUCE)}, got {reduce!r}")
    if base not in BASES:
        raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
    started = time.perf_counter()
    mode = mode_for(run)
    cpu = torch.device("cpu")
    corpus = corpus or load_corpus(data_config(run))
    workers = [Replica(run, shard=i, device=cpu, corpus=corpus) for i in range(replicas)]  # type: ignore[arg-type]
    encoders = [PayloadEncoder(run, f"sim-{i}") for i in range(replicas)]
    shapes = {n: tuple(p.shape) for n, p in sorted(workers[0].model.named_parameters())}
    store = PayloadStore(run, shapes, Traffic())
    states = [initial_state(run) for _ in range(replicas)]  # each replica's own copy of θ(r)
    bases: list[GlobalState] = list(states)
    sizes, hashes, curve = [], [], []
    evaluator = Replica(run, shard=0, device=cpu, corpus=corpus)  # type: ignore[arg-type]
    for r in range(run.max_rounds):
        if reset_adam:  # the inner optimiser starts every round afresh (DiLoCo carries it over)
            for w in workers:
                w.optimizer.state.clear()
        works = [w.train_round(b) for w, b in zip(workers, bases)]
        payloads = []
        for i, (enc, work) in enumerate(zip(encoders, works)):
            assert work is not None
            payloads.append((f"sim-{i}", enc.encode(work.delta, r).data))
            sizes.append(len(payloads[-1][1]))
        if run.outer.overlap and base == "own":
            bases = [own_progress_base(s, w.delta) for s, w in zip(states, works) if w is not None]
        elif run.outer.overlap:  # the next round starts before θ(r+1) is known (swarm/round/overlap.py)
            own = [store.decode(data, sender=sender, round_no=r) for sender, data in payloads]
            weight = {"payload": 1.0, "share": 1.0 / replicas, "agreed": 0.0}[base]
            bases = [next_base(s, o, mode, weight) for s, o in zip(states, own)]
        if reduce.startswith("topk"):
            mean = second_compression(run, shapes, store, payloads, encoders, r, reduce)
            for state in states:
                mode.outer_step(state, mean)
        if reduce == "count":
            mean = contributor_mean(shapes, [store.decode(data, sender=sender, round_no=r) for sender, data in payloads])
            for state in states:
                mode.outer_step(state, mean)
        for state in states if reduce == "all" else ():  # every replica decodes and applies the same payloads in order
            acc = SlotMean(shapes)
            for sender, data in payloads:
                acc.add(store.decode(data, sender=sender, round_no=r))
            mode.outer_step(state, acc.mean())
        hashes.append([s.hash for s in states])
        if not run.outer.overlap:
            bases = list(states)
        if eval_every and (r + 1) % eval_every == 0 and r + 1 < run.max_rounds:
            curve.append((r + 1, evaluator.evaluate(states[0])))
    loss = evaluator.evaluate(states[0])
    curve.append((run.max_rounds, loss))
    return SimResult(loss, statistics.median(sizes), hashes, time.perf_counter() - started, curve)


def second_compression(
    run: RunConfig,
    shapes: dict[str, tuple[int, ...]],
    store: PayloadStore,
    payloads: list[tuple[str, bytes]],
    encoders: list[PayloadEncoder],
    round_no: int,
    reduce: str = "topk",
) -> dict[str, torch.Tensor]:
    """The round's mean compressed again to one payload's density; each sender's values at the
    coordinates that dropped go back into its error buffer (they wait there, as unsent work does)."""
    decoded = [store.decode(data, sender=sender, round_no=round_no) for sender, data in payloads]
    acc = SlotMean(shapes)
    for tensors in decoded:
        acc.add(tensors)
    mean = acc.mean()
    fresh = SparseLoCoCompressor(aggregate_config(run, int(reduce[4:] or 1)))  # what it drops goes back to the senders
    applied = {name: decode_tensor(fresh.compress(name, m)) for name, m in mean.items()}
    for tensors, encoder in zip(decoded, encoders):
        encoder.returned(tensors, applied)
    return applied


def contributor_mean(shapes: dict[str, tuple[int, ...]], decoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each coordinate's mean over the payloads that selected it (non-zero there), in payload order."""
    sums = {name: torch.zeros(shape) for name, shape in shapes.items()}
    counts = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for tensors in decoded:
        for name, t in sorted(tensors.items()):
            sums[name].add_(t)
            counts[name].add_((t != 0).float())
    return {name: sums[name] / counts[name].clamp(min=1) for name in sorted(shapes)}


def simulate_solo(run: RunConfig, replicas: int, *, corpus: object | None = None, eval_every: int = 0) -> SimResult:
    """One machine on all the data: one replica reading the whole training split at batch
    replicas × B, `run.max_rounds` × H steps under the same lr schedule; its model carries over
    from round to round unchanged (θ(r+1) is exactly what it trained), so this is plain training."""
    started = time.perf_counter()
    solo = dataclasses.replace(run, batch_size=run.batch_size * replicas, num_shards=1)
    cpu = torch.device("cpu")
    corpus = corpus or load_corpus(data_config(solo))
    worker = Replica(solo, shard=0, device=cpu, corpus=corpus)  # type: ignore[arg-type]
    state = initial_state(solo)
    evaluator = Replica(run, shard=0, device=cpu, corpus=corpus)  # type: ignore[arg-type]  # eval at the swarm's batch
    curve = []
    for r in range(solo.max_rounds):
        work = worker.train_round(state)
        assert work is not None
        state = worker_state(worker, state.round + 1)
        if eval_every and (r + 1) % eval_every == 0 and r + 1 < solo.max_rounds:
            curve.append((r + 1, evaluator.evaluate(state)))
    loss = evaluator.evaluate(state)
    curve.append((solo.max_rounds, loss))
    return SimResult(loss, 0.0, [[state.hash]], time.perf_counter() - started, curve)


def worker_state(worker: Replica, round_no: int) -> GlobalState:
    """The worker's trained weights as the state of `round_no`."""
    params = {name: p.detach().clone() for name, p in worker.model.named_parameters()}
    return GlobalState(round=round_no, params=params, momentum={})


def own_progress_base(state: GlobalState, delta: dict[str, torch.Tensor]) -> GlobalState:
    """θ(r) − Δ_r: the rejected overlap start (the replica's whole unsynced progress)."""
    params = {name: (t - delta[name]) if name in delta else t.clone() for name, t in state.params.items()}
    return GlobalState(round=state.round + 1, params=params, momentum={n: m.clone() for n, m in state.momentum.items()})


def parse_row(spec: str, base: RunConfig) -> tuple[RunConfig, str, str]:
    """'mode[:field=value,...]' -> (RunConfig, overlap base, reduce): OuterConfig fields, H (inner
    steps), H0 and ramp (H's ramp: H0 steps at round 0, H from round `ramp` on), lr (the inner peak
    learning rate), base= (where an overlapped round starts) or reduce= (all, topk: see `simulate`)."""
    mode, _, rest = spec.partition(":")
    if mode == "solo":  # one machine: the replica's optimiser over the whole data; outer fields do not apply
        mode = "diloco"
    outer = dataclasses.asdict(default_outer(mode))
    inner_steps, inner_lr, start_steps, ramp = base.inner_steps, base.inner_lr, base.inner_steps_start, base.inner_steps_ramp
    fields = {f.name: f.type for f in dataclasses.fields(OuterConfig)}
    start, reduce = "payload", "all"
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "H":
            inner_steps = int(value)
        elif key == "lr":
            inner_lr = float(value)
        elif key == "H0":
            start_steps = int(value)
        elif key == "ramp":
            ramp = int(value)
        elif key == "base" and value in BASES:
            start = value
        elif key == "reduce" and value in REDUCE:
            reduce = value
        elif key == "adam" and value in ("reset", "keep"):
            pass  # run_row's: whether the inner optimiser's state is cleared every round
        elif key in fields:
            current = outer[key]
            outer[key] = bool(int(value)) if isinstance(current, bool) else type(current)(value)
        else:
            raise ValueError(f"{spec}: unknown setting {key!r} (OuterConfig fields, H, H0, ramp, lr, base or reduce)")
    run_ = dataclasses.replace(
        base,
        mode=mode,
        outer=OuterConfig(**outer),
        inner_steps=inner_steps,
        inner_steps_start=start_steps,
        inner_steps_ramp=ramp,
        inner_lr=inner_lr,
        warmup_steps=inner_steps,
    )
    tokens = base.steps_before(base.max_rounds)  # equal tokens whatever H: the most rounds that fit
    rounds = max(r for r in range(1, tokens + 1) if run_.steps_before(r) <= tokens or r == 1)
    run_ = dataclasses.replace(run_, max_rounds=rounds)
    return run_, start, reduce


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_data = str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "stdlib"
    parser.add_argument("--data", default=default_data, help="corpus (default %(default)s)")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30, help="at the default H; other H keep the tokens equal")
    parser.add_argument("--inner-steps", type=int, default=30, help="H (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (keep it small on a shared machine)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run side by side in this many processes")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate every N rounds (at the default H) and print the curve"
    )
    parser.add_argument("rows", nargs="*", default=list(DEFAULT_ROWS), help="mode[:field=value,...] (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    base = RunConfig(
        run_id="quality",
        preset=args.preset,
        data_source=args.data,
        inner_steps=args.inner_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        inner_lr=args.lr,
        warmup_steps=args.inner_steps,
        max_rounds=args.rounds,
        num_shards=args.replicas,
        eval_batches=WHOLE_EVAL_SPLIT,
    )
    params = count_parameters(get_preset(args.preset))
    tokens = args.replicas * args.batch_size * args.seq_len * args.inner_steps * args.rounds
    print(f"{args.preset} ({params:,} params), {args.replicas} replicas, {tokens:,} tokens per row", flush=True)
    for spec in args.rows:
        parse_row(spec, base)  # every row's syntax is checked before the first one runs
    results: dict[str, SimResult] = {}
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            args.jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(args.threads,)
        ) as pool:
            futures = {spec: pool.submit(run_row, spec, base, args.replicas, None, args.eval_every) for spec in args.rows}
            for spec, future in futures.items():
                results[spec] = _report(spec, future.result())
    else:
        corpus = load_corpus(data_config(base))
        for spec in args.rows:
            results[spec] = _report(spec, run_row(spec, base, args.replicas, corpus, args.eval_every))
    _print_table(results, params)
    if args.eval_every:
        _print_curve(results, args.inner_steps)
    return 0


def run_row(spec: str, base: RunConfig, replicas: int, corpus: object | None = None, eval_every: int = 0) -> SimResult:
    """One row; `eval_every` counts rounds at the default H (tokens, whatever the row's H)."""
    cfg, start, reduce = parse_row(spec, base)
    reset_adam = "adam=reset" in spec.partition(":")[2].split(",")  # the inner optimiser starts each round afresh
    every = eval_every * base.inner_steps // cfg.inner_steps
    if spec.partition(":")[0] == "solo":
        res = simulate_solo(cfg, replicas, corpus=corpus, eval_every=every)
    else:
        res = simulate(cfg, replicas, corpus=corpus, base=start, eval_every=every, reduce=reduce, reset_adam=reset_adam)
    res.curve = [(r * cfg.inner_steps // base.inner_steps, loss) for r, loss in res.curve]
    return res


def _report(spec: str, res: SimResult) -> SimResult:
    print(f"  {spec:<48} eval {res.eval_loss:.4f}  {res.payload_bytes:>10,.0f} B/round  ({res.wall_s:.0f}s)", flush=True)
    return res


def _print_curve(results: dict[str, SimResult], inner_steps: int) -> None:
    """Eval loss against tokens (in rounds at the default H), and each row's ratio to solo's."""
    solo = next((dict(r.curve) for spec, r in results.items() if spec.startswith("solo")), {})
    print(f"\n{'setting':<48} eval loss (vs solo) after the tokens of n rounds at H = {inner_steps}")
    for spec, res in results.items():
        points = [f"{at}: {loss:.4f}" + (f" ({loss / solo[at]:.3f})" if at in solo else "") for at, loss in res.curve]
        print(f"{spec:<48} " + "  ".join(points))


def _print_table(results: dict[str, SimResult], params: int) -> None:
    ref = next((r for spec, r in results.items() if spec.startswith("diloco")), None)
    solo = next((r for spec, r in results.items() if spec.startswith("solo")), None)
    print(
        f"\n{'setting':<48} {'eval loss':>9} {'vs solo':>8} {'vs DiLoCo':>9} {'bytes/round':>12} {'B/param':>8} "
        f"{'fewer B':>8} {'identical':>9}"
    )
    for spec, res in results.items():
        vs_solo = f"{res.eval_loss / solo.eval_loss:.3f}" if solo else "-"
        vs = f"{res.eval_loss / ref.eval_loss:.3f}" if ref else "-"
        sends = res.payload_bytes > 0
        fewer = f"{ref.payload_bytes / res.payload_bytes:.0f}x" if ref and sends else "-"
        size, per_param = (f"{res.payload_bytes:,.0f}", f"{res.payload_bytes / params:.4f}") if sends else ("-", "-")
        same = all(len(set(h)) == 1 for h in res.hashes)
        print(f"{spec:<48} {res.eval_loss:>9.4f} {vs_solo:>8} {vs:>9} {size:>12} {per_param:>8} {fewer:>8} {same!s:>9}")
