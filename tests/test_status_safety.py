"""The status server is read-only, loopback by default, strict about requests, and the page is inert to peer text."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
from importlib import resources
from typing import Any

import pytest

from launch.status import parse_args
from swarm.status import StatusService
from swarm.status.server import CSP, ServerConfig, StatusServer

HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script>"
SNAPSHOT = {
    "api_version": 1,
    "generated_at": 1.0,
    "summary": {"run_id": "run-x", "eval_loss": math.nan},
    "peers": [{"name": HOSTILE, "loss": math.inf}],
    "history": {"rounds": [], "peers_over_time": []},
    "events": [{"text": HOSTILE}],
}
ROUTES = [
    "/",
    "/static/app.js",
    "/static/style.css",
    "/api",
    "/api/all",
    "/api/summary",
    "/api/peers",
    "/api/history",
    "/api/events",
]


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def serve_and(requests: list[bytes], **cfg: Any) -> tuple[list[tuple[int, dict[str, str], bytes]], StatusServer]:
    """Start a server on a free loopback port, send each raw request, return the responses."""

    async def go():
        server = StatusServer(lambda: SNAPSHOT, ServerConfig(port=0, **cfg))
        await server.start()
        try:
            assert server.port is not None
            return [await _request(server.port, r) for r in requests], server
        finally:
            await server.stop()

    return asyncio.run(go())


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def test_every_route_answers_get_with_security_headers():
    responses, _ = serve_and([get(r) for r in ROUTES])
    for route, (status, headers, body) in zip(ROUTES, responses):
        assert status == 200, route
        assert headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP.split("script-src")[1].split(";")[0]
        assert headers["x-content-type-options"] == "nosniff"
        assert int(headers["content-length"]) == len(body)
        if route.startswith("/api"):
            assert headers["content-type"] == "application/json"
            json.loads(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"])
def test_write_methods_are_refused_with_405(method: str) -> None:
    body = b'{"x": 1}'
    raw = f"{method} /api/peers HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    ((status, headers, _),) = serve_and([raw])[0]
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_head_sends_headers_only():
    ((status, headers, body),) = serve_and([get("/api/all", "HEAD")])[0]
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_bad_requests_are_rejected():
    responses, _ = serve_and(
        [
            get("/nope"),
            get("/../../etc/passwd"),
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n",
        ]
    )
    assert [r[0] for r in responses] == [404, 404, 400, 400]  # aiohttp refuses an oversized head with 400


def test_nonfinite_numbers_become_null_json():
    ((_, _, body),) = serve_and([get("/api/all")])[0]
    data = json.loads(body)  # strict JSON: no NaN/Infinity tokens
    assert data["summary"]["eval_loss"] is None and data["peers"][0]["loss"] is None
    assert data["peers"][0]["name"] == HOSTILE  # data stays verbatim; the page escapes it


def test_binds_loopback_by_default():
    _, server = serve_and([])
    assert server.cfg.host == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    assert inspect.signature(StatusService).parameters["host"].default == "127.0.0.1"
    assert parse_args(["/ip4/127.0.0.1/tcp/1/p2p/QmX"]).host == "127.0.0.1"
    assert StatusServer(dict, ServerConfig(host="0.0.0.0", port=80)).cfg.host == "0.0.0.0"  # only when asked


def static(name: str) -> str:
    return resources.files("swarm.status").joinpath("static").joinpath(name).read_text()


def test_page_code_never_parses_markup():
    app = static("app.js")
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setAttribute("on',
        "http://",
        "https://",
    ):
        if sink == "http://":
            app = app.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, not a URL to load
        assert sink not in app, f"app.js uses {sink}"


def test_page_loads_only_its_own_files():
    html = static("index.html")
    assert not re.search(r"<script(?![^>]*\ssrc=\"/static/app\.js\")", html), "inline or foreign script"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "a resource from elsewhere"
    assert "@import" not in static("style.css") and "url(" not in static("style.css")
