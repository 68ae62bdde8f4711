"""A small read-only HTTP/1.1 server on asyncio for the status page and its JSON API.

Hand-written rather than a framework: it serves a handful of fixed routes with GET/HEAD only, so a
hundred lines cover it and volunteers install nothing more. Each connection carries one request
(Connection: close); request heads are bounded in size and time, bodies are never read.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from swarm.log import get_logger

logger = get_logger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC_FILES = {  # route -> (file in swarm/status/static, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
API_SECTIONS = {
    "/api/summary": "summary",
    "/api/peers": "peers",
    "/api/history": "history",
    "/api/events": "events",
    "/api/roles": "roles",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless the operator asks for more
    port: int = 0  # 0 = any free port
    max_head_bytes: int = 16 * 1024
    read_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_head_bytes < 1024 or not self.read_timeout_s > 0:
            raise ValueError("max_head_bytes must be >= 1024 and read_timeout_s positive")


class StatusServer:
    """Serves the page and `snapshot()` (a JSON-ready dict with summary/peers/history/events)."""

    def __init__(self, snapshot: Callable[[], dict], cfg: ServerConfig | None = None):
        self.snapshot = snapshot
        self.cfg = cfg or ServerConfig()
        self.files = {route: (_read_static(name), ctype) for route, (name, ctype) in STATIC_FILES.items()}
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.cfg.host, self.cfg.port, limit=self.cfg.max_head_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("status page on %s", self.url)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.cfg.host, self.cfg.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, headers, body, method = await self._respond(reader)
            head = [f"HTTP/1.1 {status} {REASONS[status]}", *(f"{k}: {v}" for k, v in headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, str]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.cfg.read_timeout_s)
        except asyncio.LimitOverrunError:
            return (*_error(431, "request head too large"), "GET")
        except asyncio.TimeoutError:
            return (*_error(408, "request head too slow"), "GET")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return (*_error(400, "malformed request line"), "GET")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            await self._discard_body(reader, head)
            status, headers, body = _error(405, "this API is read-only: GET and HEAD only")
            headers["Allow"] = "GET, HEAD"
            return status, headers, body, method
        return (*self._route(urlsplit(target).path), method)

    async def _discard_body(self, reader: asyncio.StreamReader, head: bytes) -> None:
        """Read a small unwanted body, so closing the socket does not reset it before our 405 arrives."""
        match = re.search(rb"\r\ncontent-length:\s*(\d{1,7})\r\n", head, re.IGNORECASE)
        if match and int(match.group(1)) <= 1 << 20:
            try:
                await asyncio.wait_for(reader.readexactly(int(match.group(1))), self.cfg.read_timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass

    def _route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if path in self.files:
            body, ctype = self.files[path]
            return 200, _headers(ctype, len(body)), body
        section = API_SECTIONS.get(path)
        if section is None and path not in ("/api/all", "/api"):
            return _error(404, "no such page")
        try:
            snap = self.snapshot()
        except Exception:
            logger.exception("status snapshot failed")
            return _error(500, "snapshot failed")
        if path == "/api":
            snap = {"routes": ["/api/all", *API_SECTIONS], "api_version": snap.get("api_version")}
        return _json(200, snap if section is None else snap[section])


def _read_static(name: str) -> bytes:
    return resources.files("swarm.status").joinpath("static").joinpath(name).read_bytes()


def _headers(content_type: str, length: int) -> dict[str, str]:
    return {"Content-Type": content_type, "Content-Length": str(length), "Connection": "close", **SECURITY_HEADERS}


def _json(status: int, value: object) -> tuple[int, dict[str, str], bytes]:
    try:
        body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # a non-finite number slipped through: null it rather than emit invalid JSON
        body = json.dumps(_finite(value), allow_nan=False, separators=(",", ":")).encode()
    return status, _headers("application/json", len(body)), body


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _error(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    return _json(status, {"error": message, "status": status})
