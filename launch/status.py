"""`swarm-status ADDRESS`: serve a run's status page from any peer's address, coordinator or not.

It starts a light DHT node in client mode (it stores nothing for others, publishes no heartbeat and
never counts as a peer), accepts the run description only if the coordinator signed it, then reads
everything else from the DHT, so the page keeps working while the coordinator is down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

from launch.common import run_node
from launch.join import coordinator_from_address
from swarm.net.dht import DHTOptions
from swarm.node import SwarmNode, fetch_run_description
from swarm.status import CollectorConfig, StatusService


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarm-status", description="Serve the status page of a Swarm run.")
    p.add_argument("address", nargs="+", help="multiaddr(s) of the coordinator or any peer, ending in /p2p/<id>")
    p.add_argument("--coordinator", help="coordinator peer id (default: the /p2p/ id of the first address)")
    p.add_argument("--host", default="127.0.0.1", help="interface for the web page (default %(default)s; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8080, help="TCP port of the web page (0 = any free port; default %(default)s)")
    p.add_argument("--dht-host", default="0.0.0.0", help="interface of the DHT client node (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the run description")
    p.add_argument("--backfill-rounds", type=int, default=200, help="closed rounds to read back on start")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    coordinator = args.coordinator or coordinator_from_address(args.address[0])
    options = DHTOptions(initial_peers=tuple(args.address), host_maddrs=(f"/ip4/{args.dht_host}/tcp/0",), client_mode=True)
    identity = os.path.join(tempfile.mkdtemp(prefix="swarm-status-"), "identity.key")
    node = SwarmNode(identity_path=identity, dht_options=options, name="status")
    service: StatusService | None = None

    def setup() -> None:
        # Only the DHT: an onlooker serves no payloads or state, so it needs no transfer server.
        try:
            node.start_dht()
        except Exception as e:  # hivemind reports an unreachable swarm in several ways
            raise SystemExit(f"swarm-status: cannot reach the swarm at {', '.join(args.address)}: {e}") from None

    async def go() -> None:
        nonlocal service
        try:
            node.run = await fetch_run_description(node.dht, coordinator, timeout_s=args.timeout)
        except TimeoutError as e:
            raise SystemExit(f"swarm-status: {e} (is the address right, and the coordinator id?)") from None
        collector = CollectorConfig(backfill_rounds=args.backfill_rounds)
        service = StatusService(node, host=args.host, port=args.port, collector=collector)
        try:
            await service.start()
        except OSError as e:
            raise SystemExit(f"swarm-status: cannot serve on {args.host}:{args.port}: {e}") from None
        print(f"run {node.run.run_id}: {node.run.mode}, preset {node.run.preset}", flush=True)
        print(f"status page: {service.url}", flush=True)
        await asyncio.Event().wait()  # serve until Ctrl+C

    async def stop() -> None:
        if service is not None:
            await service.stop()
        await node.stop(announce_leave=False)  # an onlooker has nothing to announce

    return run_node(go, stop, lambda: None, setup=setup)


if __name__ == "__main__":
    sys.exit(main())
