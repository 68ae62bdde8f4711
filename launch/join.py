"""`join-swarm ADDRESS`: contribute this machine's GPU (or CPU) to a run."""

from __future__ import annotations

import argparse
import os
import tempfile

from launch.common import add_metrics_args, add_network_args, dht_options, run_node, sink_config
from swarm.processes.admission import AdmissionRefused
from swarm.processes.volunteer import Peer, PeerConfig
from swarm.train.sinks import SinkConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="join-swarm", description="Join a Swarm training run as a volunteer peer.")
    p.add_argument("address", nargs="+", help="multiaddr(s) printed by the coordinator or any peer, ending in /p2p/<id>")
    p.add_argument("--coordinator", help="coordinator peer id (default: the /p2p/ id of the first address)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--name", default=None, help="name shown on the status page (default: host name)")
    p.add_argument("--identity", default=None, help="identity key file (created if missing; default: a fresh one)")
    p.add_argument("--out", default=None, help="directory for per-round metrics (JSONL)")
    p.add_argument("--max-rounds", type=int, default=None, help="leave after this many rounds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--save-dir", default=None, help="keep a copy of the run's agreed state here (safetensors + JSON)")
    p.add_argument("--save-every", type=int, default=10, help="rounds between copies with --save-dir (default %(default)s)")
    p.add_argument(
        "--start-from",
        default=None,
        help="start from this saved state (or the run's --init-from checkpoint) and replay the rounds since",
    )
    p.add_argument("--tokenizer", default=None, help="a local copy of the run's tokenizer.json (default: fetched from the swarm)")
    p.add_argument("--memory-gb", type=float, default=None, help="announce this memory, not the measured (e.g. to be a stage)")
    p.add_argument("--invite", default="", metavar="TOKEN", help="the invite token of an invite-only run (from its operator)")
    add_network_args(p)
    add_metrics_args(p)
    return p.parse_args(argv)


def coordinator_from_address(address: str) -> str:
    if "/p2p/" not in address:
        raise SystemExit(f"join-swarm: address {address!r} has no /p2p/<peer id> part; pass --coordinator")
    return address.rsplit("/p2p/", 1)[1].strip("/")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sinks = sink_config(args)
    except ValueError as e:
        raise SystemExit(f"join-swarm: {e}") from None
    identity = args.identity or os.path.join(tempfile.mkdtemp(prefix="swarm-peer-"), "identity.key")
    try:
        cfg = peer_config(args, identity, sinks)
    except ValueError as e:
        raise SystemExit(f"join-swarm: {e}") from None
    peer = Peer(cfg)
    try:
        return run_node(peer.main, peer.stop, peer.stopping.set, setup=peer.start_dht)
    except AdmissionRefused as e:
        raise SystemExit(f"join-swarm: {e}") from None


def peer_config(args: argparse.Namespace, identity: str, sinks: SinkConfig) -> PeerConfig:
    return PeerConfig(
        coordinator=args.coordinator or coordinator_from_address(args.address[0]),
        identity_path=identity,
        dht=dht_options(args, args.address),
        name=args.name or os.uname().nodename,
        device=args.device,
        out_dir=args.out,
        max_rounds=args.max_rounds,
        threads=args.threads,
        save_dir=args.save_dir,
        save_every_rounds=args.save_every,
        start_from=args.start_from,
        tokenizer=args.tokenizer,
        memory_gb=args.memory_gb,
        sinks=sinks,
        invite=args.invite.strip(),
    )


if __name__ == "__main__":
    raise SystemExit(main())
