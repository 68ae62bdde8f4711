"""Shared plumbing of the entry points: network flags, the event loop, and Ctrl+C handling."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from launch.cluster import SigtermUnwinds, Terminated
from swarm.train.sinks import SinkConfig

if TYPE_CHECKING:  # swarm-train uses the metrics flags and must not pay for importing hivemind
    from swarm.net.dht import DHTOptions


def add_network_args(parser: argparse.ArgumentParser, *, default_host: str = "0.0.0.0") -> None:
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=default_host, help="IP address to listen on (default %(default)s)")
    net.add_argument("--port", type=int, default=0, help="TCP port to listen on (0 = any free port)")
    net.add_argument(
        "--announce",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="public address to announce, e.g. /ip4/203.0.113.5/tcp/31337 (repeatable; for port forwarding/NAT)",
    )
    net.add_argument(
        "--client-mode",
        action="store_true",
        help="behind NAT without port forwarding: make outgoing connections only (reached through relays)",
    )
    net.add_argument(
        "--reachability",
        choices=("auto", "public", "private"),
        default="auto",
        help="auto (default): ask the swarm to dial back and become a relayed client if it cannot; "
        "public: skip the check; private: the same as --client-mode",
    )


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    """--tensorboard / --wandb / --wandb-offline: the same three flags on every process that trains."""
    group = parser.add_argument_group("metrics (optional: pip install -e '.[metrics]')")
    group.add_argument(
        "--tensorboard", metavar="DIR", help="also write the per-round figures as TensorBoard event files under DIR"
    )
    group.add_argument("--wandb", metavar="PROJECT", help="also log the per-round figures to this Weights & Biases project")
    group.add_argument(
        "--wandb-offline",
        action="store_true",
        help="keep the W&B run on disk only (upload later with `wandb sync`); automatic when W&B is unreachable",
    )


def sink_config(args: argparse.Namespace) -> SinkConfig:
    """The metrics flags as a SinkConfig; raises MetricsUnavailable for a backend not installed."""
    if args.wandb_offline and not args.wandb:
        raise ValueError("--wandb-offline needs --wandb PROJECT")
    return SinkConfig(tensorboard_dir=args.tensorboard, wandb_project=args.wandb, wandb_offline=args.wandb_offline)


def dht_options(args: argparse.Namespace, initial_peers: list[str]) -> DHTOptions:
    from swarm.net.dht import DHTOptions

    return DHTOptions(
        initial_peers=tuple(initial_peers),
        host_maddrs=(f"/ip4/{args.host}/tcp/{args.port}",),
        announce_maddrs=tuple(args.announce),
        use_auto_relay=bool(args.client_mode),
        client_mode=bool(args.client_mode),
        reachability="private" if args.client_mode else getattr(args, "reachability", "auto"),
    )


def run_node(
    main: Callable[[], Awaitable[None]],
    on_stop: Callable[[], Awaitable[None]],
    request_stop: Callable[[], None],
    *,
    setup: Callable[[], None] | None = None,
) -> int:
    """Run `main` on uvloop; first Ctrl+C/SIGTERM leaves cleanly, a second exits at once.

    `setup` runs first, in the main thread, before the loop: start the DHT process there, so it
    does not inherit the loop's handlers (it would then ignore SIGTERM). SIGTERM is held while it
    runs (a forked DHT process gets the default back, see launch/cluster.py): one arriving then
    makes the node leave as soon as setup is done, rather than end it with its DHT process and p2pd
    left running.
    """
    terminated = False
    if setup is not None:
        try:
            with SigtermUnwinds() as sigterm, sigterm.held():
                setup()
        except Terminated:
            terminated = True
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # Windows has no uvloop
        runner = asyncio.run

    async def amain() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main())
        presses = 0

        def handle(signum: int) -> None:
            nonlocal presses
            presses += 1
            if presses > 1:
                os._exit(130)
            print("\nleaving the swarm (press Ctrl+C again to exit at once)...", file=sys.stderr)
            request_stop()
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, handle, sig)
            except NotImplementedError:
                pass
        if terminated:  # during setup: main never starts, on_stop stops what setup started
            handle(signal.SIGTERM)
        code = 0
        try:
            await task
        except asyncio.CancelledError:
            code = 0
        except Exception:
            code = 1
            raise
        finally:
            await on_stop()
        return code

    return runner(amain())
