"""The status page as one object: a DHT collector plus the HTTP server, on the node's event loop."""

from __future__ import annotations

import asyncio

from swarm.log import get_logger
from swarm.node import SwarmNode
from swarm.status.collector import CollectorConfig, StatusCollector
from swarm.status.server import ServerConfig, StatusServer

logger = get_logger(__name__)


class StatusService:
    """Serve the status page of the run `node` belongs to.

    Any started SwarmNode that knows its run works: the coordinator passes itself, `swarm-status`
    passes a light observer node. Arguments:
      node: a started node with `node.run` set (it reads the DHT through `node.dht`).
      host: interface to bind; loopback by default, pass "0.0.0.0" to let other machines in.
      port: TCP port; 0 picks a free one (read it back from `url`).
      collector: polling and retention settings (defaults: poll each second, 200 rounds back).
    """

    def __init__(self, node: SwarmNode, *, host: str = "127.0.0.1", port: int = 0, collector: CollectorConfig | None = None):
        self.node = node
        self.collector = StatusCollector(node, collector)
        self.server = StatusServer(self.collector.snapshot, ServerConfig(host=host, port=port))
        self.collector.on_poll.append(self.server.notify)  # each poll is pushed to the open pages
        self._task: asyncio.Task | None = None

    async def start(self, *, wait_first_poll: bool = False) -> None:
        """Start polling and serving; with wait_first_poll, return after the first DHT poll."""
        # Spawned through the node, so node.stop() cancels polling before it shuts the DHT down
        # even if nobody calls our stop().
        self._task = self.node.spawn(self.collector.run_forever())
        await self.server.start()
        if wait_first_poll:
            await self.collector.ready.wait()

    @property
    def url(self) -> str:
        """http://host:port/ of the page (valid after start)."""
        return self.server.url

    async def stop(self) -> None:
        await self.server.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
