"""The read-only HTTP server of the status page and its JSON API, on aiohttp.

The page may be exposed to other machines (`--status-host 0.0.0.0`), so request parsing is left
to a maintained server. What is ours is the policy: GET and HEAD only, a fixed set of routes, strict
security headers on every answer, JSON without NaN, and bounds on what a client can hold open.

Live updates are pushed over server-sent events (`/api/stream`): one `snapshot` event with the
whole `/api/all` document after every DHT poll of the collector (`notify`), and a `ping` event
when nothing changed for a while, so proxies keep the stream open and the page can tell a quiet
swarm from a dead stream. The page falls back to polling `/api/all` whenever the stream is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from swarm.log import get_logger

logger = get_logger(__name__)


class _NoClientJunk(logging.Filter):
    """Malformed requests are the client's problem: answered with 400, not logged with a traceback
    each (anyone who can reach an exposed page could fill the log with them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


http_logger = logging.getLogger(__name__ + ".http")
http_logger.addFilter(_NoClientJunk())

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Server": "swarm-status",  # not aiohttp's name and version
}
READ_ONLY = ("GET", "HEAD")
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
STREAM_ROUTE = "/api/stream"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless the operator asks for more
    port: int = 0  # 0 = any free port
    max_head_bytes: int = 16 * 1024  # longest request line or header field
    read_timeout_s: float = 10.0  # a connection must have sent its request by then
    max_streams: int = 64  # live-push streams open at once; more are refused with 503
    stream_keepalive_s: float = 15.0  # ping on an idle stream (the page gives up on a stream silent for 40 s)
    shutdown_timeout_s: float = 2.0  # how long stop() lets responses in flight finish

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_head_bytes < 1024 or not self.read_timeout_s > 0:
            raise ValueError("max_head_bytes must be >= 1024 and read_timeout_s positive")
        if self.max_streams < 0 or not self.stream_keepalive_s > 0 or self.shutdown_timeout_s < 0:
            raise ValueError("max_streams must be >= 0, stream_keepalive_s positive and shutdown_timeout_s >= 0")


class StatusServer:
    """Serves the page and `snapshot()` (a JSON-ready dict with summary/peers/history/events).

    Call `notify()` when the snapshot changed: every open stream then sends the new one.
    """

    def __init__(self, snapshot: Callable[[], dict], cfg: ServerConfig | None = None):
        self.snapshot = snapshot
        self.cfg = cfg or ServerConfig()
        self.files = {route: (_read_static(name), ctype) for route, (name, ctype) in STATIC_FILES.items()}
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()  # replaced after each notify: every waiter wakes once
        self._closing = asyncio.Event()
        self.streams = 0  # open live-push streams
        self._version = 0  # bumped by notify(); streams share one encoding per version
        self._encoded: tuple[int, bytes] | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._read_only], client_max_size=1024)
        for route in self.files:
            app.router.add_get(route, self._static)
        for route in ("/api", "/api/all", *API_SECTIONS):
            app.router.add_get(route, self._api)
        app.router.add_get(STREAM_ROUTE, self._stream)
        app.on_response_prepare.append(_secure)
        return app

    async def start(self) -> None:
        self._closing.clear()
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            logger=http_logger,
            shutdown_timeout=self.cfg.shutdown_timeout_s,
            keepalive_timeout=self.cfg.read_timeout_s,
            max_line_size=self.cfg.max_head_bytes,
            max_field_size=self.cfg.max_head_bytes,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]  # the bound port (cfg.port may be 0)
        logger.info("status page on %s", self.url)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.cfg.host, self.cfg.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        self._closing.set()  # open streams end now rather than at the shutdown timeout
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def notify(self) -> None:
        """The snapshot changed: wake every open stream."""
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # ----- handlers ------------------------------------------------------------------------------

    @web.middleware
    async def _read_only(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method not in READ_ONLY:
            response = _error(405, "this API is read-only: GET and HEAD only")
            response.headers["Allow"] = ", ".join(READ_ONLY)
            return response
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405 bodies are text; ours are JSON
            return _error(exc.status, "no such page" if exc.status == 404 else exc.reason)

    async def _static(self, request: web.Request) -> web.Response:
        body, ctype = self.files[_route(request)]
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _api(self, request: web.Request) -> web.Response:
        snap = self._snapshot()
        if snap is None:
            return _error(500, "snapshot failed")
        path = _route(request)
        if path == "/api":
            routes = ["/api/all", *API_SECTIONS, STREAM_ROUTE]
            return _json(200, {"routes": routes, "api_version": snap.get("api_version")})
        section = API_SECTIONS.get(path)
        return _json(200, snap if section is None else snap[section])

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if self.streams >= self.cfg.max_streams:
            return _error(503, "too many live streams open; poll /api/all instead")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        self.streams += 1
        try:
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            await response.write(b"retry: 2000\n\n")  # the browser's reconnect delay
            changed = True
            while not self._closing.is_set():
                data = self._stream_data() if changed else None
                if data is not None:
                    await response.write(b"event: snapshot\ndata: " + data + b"\n\n")
                elif not changed:  # lets the page tell a quiet swarm from a dead stream
                    await response.write(b"event: ping\ndata: idle\n\n")
                changed = await self._wait_change()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the server is stopping
        finally:
            self.streams -= 1
        return response

    async def _wait_change(self) -> bool:
        """True once notify() is called, False after the keepalive interval or when stopping."""
        changed = asyncio.ensure_future(self._changed.wait())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait(
                {changed, closing}, timeout=self.cfg.stream_keepalive_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            changed.cancel()
            closing.cancel()
        return changed in done

    def _stream_data(self) -> bytes | None:
        """The snapshot as JSON, encoded once per notify() however many streams are open."""
        if self._encoded is None or self._encoded[0] != self._version:
            snap = self._snapshot()
            if snap is None:
                return None
            self._encoded = (self._version, _dumps(snap))
        return self._encoded[1]

    def _snapshot(self) -> dict | None:
        try:
            return self.snapshot()
        except Exception:
            logger.exception("status snapshot failed")
            return None


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included, carries the security headers and closes its connection."""
    response.headers.update(SECURITY_HEADERS)
    if response.content_type != "text/event-stream" or request.method == "HEAD":
        response.force_close()  # one request per connection, as before: nothing lingers between polls


def _route(request: web.Request) -> str:
    """The route that matched (not the raw path, whatever encoding the client chose)."""
    return request.match_info.route.resource.canonical  # type: ignore[union-attr]


def _read_static(name: str) -> bytes:
    return resources.files("swarm.status").joinpath("static").joinpath(name).read_bytes()


def _dumps(value: object) -> bytes:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # a non-finite number slipped through: null it rather than emit invalid JSON
        return json.dumps(_finite(value), allow_nan=False, separators=(",", ":")).encode()


def _json(status: int, value: object) -> web.Response:
    return web.Response(status=status, body=_dumps(value), headers={"Content-Type": "application/json"})


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message, "status": status})
