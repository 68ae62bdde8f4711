"""Swarm: the peer runtime (DHT records, exchange, codecs, training modes, status)."""

__version__ = "0.1.0"
