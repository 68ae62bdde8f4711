"""The status web page of a run: a DHT collector, a read-only HTTP server and the page itself."""

from swarm.status.collector import API_VERSION, CollectorConfig, StatusCollector
from swarm.status.server import ServerConfig, StatusServer
from swarm.status.service import StatusService

__all__ = ["API_VERSION", "CollectorConfig", "ServerConfig", "StatusCollector", "StatusServer", "StatusService"]
