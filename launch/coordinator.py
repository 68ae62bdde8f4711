"""`swarm-coordinator`: start (or restart) a run and print the line volunteers need;
`swarm-coordinator invite`: mint invite tokens for an invite-only run."""

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
from swarm.processes.admission import load_gate, load_secret, mint_token
from swarm.processes.coordinator import Coordinator, CoordinatorConfig
from swarm.run import SHARDS_SOURCE, RunConfig

RUN_FILE = "run.json"  # the run description a coordinator keeps in its state dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="swarm-coordinator",
        description="Start a Swarm run and coordinate it.",
        epilog="swarm-coordinator invite --state-dir DIR --count N: print N invite tokens for an invite-only run",
    )
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
    run.add_argument(
        "--aggregate-from",
        type=int,
        help="rounds of N or more contributions, or in a swarm of N or more members, also carry their aggregate, which every node fetches and applies"
        " instead of the N payloads (about 4 payloads' bytes; 0 = never, the default; docs/performance.md)",
    )
    run.add_argument("--max-rounds", type=int, help="schedule horizon in rounds (0 = open-ended)")
    run.add_argument("--seed", type=int)
    admit = p.add_argument_group("admission (docs/running.md; on a restart these replace the saved run's)")
    admit.add_argument("--admission", choices=["open", "allow-list", "invite"], help="who may join (default open)")
    admit.add_argument("--allow", action="append", default=[], metavar="PEER_ID", help="admit this peer id (allow-list)")
    admit.add_argument(
        "--allow-file", metavar="FILE", help="admit the peer ids in this file, one a line, '#' comments (allow-list)"
    )
    admit.add_argument("--invite-uses", type=int, metavar="N", help="identities one invite token admits (default 1)")
    admit.add_argument(
        "--per-prefix-per-hour", type=int, metavar="N", help="new identities per hour from one /24 or /48 (0 = no limit)"
    )
    admit.add_argument(
        "--probation-rounds", type=int, metavar="N", help="rounds of useful work before a newcomer counts (default 2)"
    )
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
        "aggregate_from": args.aggregate_from,
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
    base["admission"] = admission(args, base.get("admission", {}))
    run = from_plain(RunConfig, base)
    mode_for(run)  # the mode's options: an unknown mode or option is refused here, before any network
    return run


def admission(args: argparse.Namespace, saved: dict) -> dict:
    """The run's admission section: the admission flags over `saved` (a run file's or a saved run's)."""
    allow = list(args.allow)
    if args.allow_file:
        lines = (line.split("#", 1)[0].strip() for line in Path(args.allow_file).read_text().splitlines())
        allow += [line for line in lines if line]
    flags = {
        "policy": args.admission,
        "invite_uses": args.invite_uses,
        "per_prefix_per_hour": args.per_prefix_per_hour,
        "probation_rounds": args.probation_rounds,
    }
    merged = {**saved, **{k: v for k, v in flags.items() if v is not None}}
    if allow:
        merged["allow"] = list(dict.fromkeys(allow))  # each once, in the order given
    elif args.admission is not None and args.admission != "allow-list":
        merged.pop("allow", None)  # the list belonged to the policy being replaced
    return merged


def admission_flags_given(args: argparse.Namespace) -> bool:
    return bool(args.allow or args.allow_file) or any(
        v is not None for v in (args.admission, args.invite_uses, args.per_prefix_per_hour, args.probation_rounds)
    )


def update_saved_admission(args: argparse.Namespace) -> None:
    """A restart with admission flags: they replace the admission of the saved run, the one part of
    a run that may change under way (it changes who may join, not what is trained)."""
    path = Path(args.state_dir) / RUN_FILE
    if not path.exists() or not admission_flags_given(args):
        return
    saved = json.loads(path.read_text())
    saved["admission"] = admission(args, saved.get("admission", {}))
    run = from_plain(RunConfig, saved)
    path.write_text(json.dumps(to_plain(run), indent=1))
    print(f"run {run.run_id}: admission is now {to_plain(run.admission)}", flush=True)


def invite_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="swarm-coordinator invite", description="Print invite tokens for an invite-only run.")
    p.add_argument("--state-dir", default="runs/coordinator", help="the coordinator's state dir (its invite.key is made there)")
    p.add_argument("--count", type=int, default=1, metavar="N", help="how many tokens (one per invitee; default %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.count <= 10_000:
        raise SystemExit("swarm-coordinator invite: --count must be in [1, 10000]")
    saved = Path(args.state_dir) / RUN_FILE
    policy = json.loads(saved.read_text()).get("admission", {}).get("policy", "open") if saved.exists() else "invite"
    if policy != "invite":
        print(
            f"note: this run admits by policy {policy!r}; tokens count once it restarts with --admission invite", file=sys.stderr
        )
    secret = load_secret(args.state_dir)
    for _ in range(args.count):
        print(mint_token(secret))
    return 0


def _option(text: str) -> tuple[str, int | float | bool | str]:
    """'key=value' with the value read as JSON when it parses (numbers, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--mode-option wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def prepared_run(args: argparse.Namespace) -> RunConfig:
    """The run the flags describe (a restart resumes its saved one instead, with the admission flags
    applied to it) and its invite key made; a problem with either stops the command here."""
    try:
        run = build_run(args)
        update_saved_admission(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"swarm-coordinator: bad run description: {e}") from None
    saved = Path(args.state_dir) / RUN_FILE
    try:  # now, not in the coordinator's role loop, where a failure would go unseen
        load_gate(from_plain(RunConfig, json.loads(saved.read_text())) if saved.exists() else run, args.state_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"swarm-coordinator: admission: {e}") from None
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["invite"]:
        return invite_main(argv[1:])
    args = parse_args(argv)
    run = prepared_run(args)
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
