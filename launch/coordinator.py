"""`swarm-coordinator`: start (or restart) a run and print the line volunteers need."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from launch.common import add_metrics_args, add_network_args, dht_options, run_node, sink_config
from swarm.data.shards import read_manifest
from swarm.data.tokenizer import TOKENIZER_FILE, load_tokenizer, vocab_overrides
from swarm.modes import available_modes, default_outer, mode_for
from swarm.net.schema import from_plain, to_plain
from swarm.processes.coordinator import Coordinator, CoordinatorConfig
from swarm.run import SHARDS_SOURCE, RunConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarm-coordinator", description="Start a Swarm run and coordinate it.")
    p.add_argument("--state-dir", default="runs/coordinator", help="identity key and run description (reuse to restart)")
    p.add_argument("--run-file", help="JSON file with RunConfig fields (flags below override it)")
    run = p.add_argument_group("run")
    run.add_argument("--preset", help="model preset (see swarm-presets), default nano")
    run.add_argument("--mode", choices=available_modes(), help="training mode (default sparseloco)")
    run.add_argument(
        "--mode-option", action="append", default=[], metavar="KEY=VALUE", help="a knob of the mode (e.g. merge_alpha0=0.05)"
    )
    run.add_argument("--dense-dtype", choices=["fp32", "fp16"], default="fp32", help="payload dtype in diloco mode")
    run.add_argument(
        "--data",
        help="corpus: 'stdlib', a text file, a directory, a glob, a .jsonl file, or a shard manifest .json (swarm-data manifest)",
    )
    run.add_argument("--tokenizer", help="a BPE tokenizer.json (swarm-tokenizer train): served to peers, sets the vocab")
    run.add_argument("--inner-steps", type=int, help="H: inner AdamW steps per round (default 30)")
    run.add_argument("--batch-size", type=int, help="sequences per inner step per peer")
    run.add_argument("--seq-len", type=int, help="tokens per sequence")
    run.add_argument("--round-timeout", type=float, help="seconds a round waits for late peers")
    run.add_argument(
        "--min-peers",
        type=int,
        help="contributions a round waits for (open runs: at least 4, so robust aggregation can outvote one)",
    )
    run.add_argument(
        "--trim", type=float, help="coordinate-wise trimmed mean: fraction dropped at each end (dense codecs; default 0 = off)"
    )
    run.add_argument("--max-rounds", type=int, help="schedule horizon in rounds (0 = open-ended)")
    run.add_argument("--seed", type=int)
    p.add_argument("--stop-after", type=int, default=None, help="exit after coordinating this many rounds")
    p.add_argument("--no-eval", action="store_true", help="skip the per-round eval loss")
    p.add_argument("--init-from", default=None, help="start θ(0) from this checkpoint (solo or a saved swarm state): fine-tuning")
    p.add_argument(
        "--save-every", type=int, default=10, help="rounds between saves of the agreed state to STATE_DIR/state (0: on exit only)"
    )
    p.add_argument("--status-port", type=int, default=None, help="serve the status page on this port (0 = any free port)")
    p.add_argument("--status-host", default="127.0.0.1", help="address the status page binds to (default %(default)s)")
    add_network_args(p)
    add_metrics_args(p)
    p.add_argument("--initial-peers", nargs="*", default=[], help="other peers to connect to (restarting into a live run)")
    return p.parse_args(argv)


def build_run(args: argparse.Namespace) -> RunConfig:
    base = json.loads(Path(args.run_file).read_text()) if args.run_file else {}
    overrides = {
        "preset": args.preset,
        "mode": args.mode,
        "data_source": args.data,
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "round_timeout_s": args.round_timeout,
        "min_peers": args.min_peers,
        "max_rounds": args.max_rounds,
        "seed": args.seed,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if str(base.get("data_source", "")).endswith(".json"):  # a shard manifest: the corpus by content
        base["corpus"] = to_plain(read_manifest(base["data_source"]))
        base["data_source"] = SHARDS_SOURCE
    if args.tokenizer:  # the run names the file by hash and takes its vocabulary
        tok = load_tokenizer(args.tokenizer)
        base["tokenizer_sha256"], base["tokenizer_bytes"] = tok.sha256, Path(args.tokenizer).stat().st_size
        base["model_overrides"] = vocab_overrides(tok, base.get("model_overrides", {}))
    if args.mode_option:
        base["mode_options"] = {**base.get("mode_options", {}), **dict(_option(o) for o in args.mode_option)}
    if "outer" not in base or args.mode is not None:  # the outer optimiser follows the mode
        base["outer"] = to_plain(default_outer(base.get("mode", "sparseloco"), args.dense_dtype))
    if args.trim is not None:
        base["outer"] = {**base["outer"], "trim": args.trim}
    run = from_plain(RunConfig, base)
    mode_for(run)  # the mode's options: an unknown mode or option is refused here, before any network
    return run


def _option(text: str) -> tuple[str, int | float | bool | str]:
    """'key=value' with the value read as JSON when it parses (numbers, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--mode-option wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = build_run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"swarm-coordinator: bad run description: {e}") from None
    try:
        sinks = sink_config(args)
    except ValueError as e:
        raise SystemExit(f"swarm-coordinator: {e}") from None
    if args.tokenizer:  # kept with the run: a restart serves it again, swarm-export finds it
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.tokenizer, Path(args.state_dir) / TOKENIZER_FILE)
    cfg = CoordinatorConfig(
        state_dir=args.state_dir,
        dht=dht_options(args, args.initial_peers),
        evaluate=not args.no_eval,
        max_rounds=args.stop_after,
        status_host=args.status_host,
        status_port=args.status_port,
        save_every_rounds=args.save_every,
        init_from=args.init_from,
        sinks=sinks,
    )
    coordinator = Coordinator(cfg, run)

    def ready(c: Coordinator) -> None:
        print(f"run {c.run.run_id}: {c.run.mode}, preset {c.run.preset}", flush=True)
        print(f"volunteers join with:\n  {c.join_command()}", flush=True)
        if c.status_url:
            print(f"status page: {c.status_url}", flush=True)

    async def go() -> None:
        await coordinator.main(on_ready=ready)

    return run_node(go, coordinator.stop, lambda: None, setup=coordinator.start_dht)


if __name__ == "__main__":
    sys.exit(main())
