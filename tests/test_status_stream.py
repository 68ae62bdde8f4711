"""Live push: /api/stream sends a new snapshot on every notify(), over one connection, with no polling."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from swarm.status.server import CSP, ServerConfig, StatusServer

TIMEOUT = aiohttp.ClientTimeout(total=30)


class Source:
    """A snapshot that changes when told to, and counts how often the server asked for it."""

    def __init__(self) -> None:
        self.version = 0
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"api_version": 1, "generated_at": float(self.version), "summary": {"round": self.version}}


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(field, value) of each SSE line: ('event', 'snapshot'), ('data', '{...}'), ('retry', '2000')."""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line:
            name, _, value = line.partition(":")
            yield name, value.strip()


async def next_snapshot(lines: AsyncIterator[tuple[str, str]]) -> dict[str, Any]:
    async for name, value in lines:
        if name == "data":
            return json.loads(value)
    raise AssertionError("the stream ended")


def serve(test: Callable[[StatusServer, Source, aiohttp.ClientSession], Awaitable[None]], **cfg: Any) -> None:
    async def go() -> None:
        source = Source()
        server = StatusServer(source, ServerConfig(port=0, **cfg))
        await server.start()
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                await test(server, source, session)
        finally:
            await server.stop()

    asyncio.run(go())


def test_each_notify_pushes_a_new_snapshot_on_the_same_connection() -> None:
    async def test(server: StatusServer, source: Source, session: aiohttp.ClientSession) -> None:
        async with session.get(server.url + "api/stream") as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            assert response.headers["Content-Security-Policy"] == CSP and response.headers["Cache-Control"] == "no-store"
            lines = events(response)
            assert (await next_snapshot(lines))["summary"]["round"] == 0  # the current state right away
            for version in (1, 2, 3):
                source.version = version
                sent = time.monotonic()
                server.notify()
                snap = await asyncio.wait_for(next_snapshot(lines), 10)
                assert snap["summary"]["round"] == version and snap["generated_at"] == version
                assert time.monotonic() - sent < 5  # pushed at once, not at the 60 s keepalive
            assert source.calls == 4  # one snapshot per change: nothing polls behind the stream

    serve(test, stream_keepalive_s=60.0)


def test_streams_share_one_encoding_per_change() -> None:
    async def test(server: StatusServer, source: Source, session: aiohttp.ClientSession) -> None:
        async with session.get(server.url + "api/stream") as a, session.get(server.url + "api/stream") as b:
            first_a, first_b = events(a), events(b)
            await next_snapshot(first_a)
            await next_snapshot(first_b)
            source.version = 7
            server.notify()
            assert (await next_snapshot(first_a))["generated_at"] == (await next_snapshot(first_b))["generated_at"] == 7
            assert server.streams == 2 and source.calls == 2

    serve(test, stream_keepalive_s=60.0)


def test_an_idle_stream_sends_pings() -> None:
    async def test(server: StatusServer, source: Source, session: aiohttp.ClientSession) -> None:
        async with session.get(server.url + "api/stream") as response:
            lines = events(response)
            await next_snapshot(lines)
            assert [await anext(lines) for _ in range(4)] == [("event", "ping"), ("data", "idle")] * 2
            assert source.calls == 1  # a ping is no snapshot

    serve(test, stream_keepalive_s=0.2)


def test_streams_beyond_the_cap_are_refused() -> None:
    async def test(server: StatusServer, source: Source, session: aiohttp.ClientSession) -> None:
        async with session.get(server.url + "api/stream") as first:
            await next_snapshot(events(first))
            async with session.get(server.url + "api/stream") as second:
                assert second.status == 503 and second.headers["Content-Security-Policy"] == CSP
                assert "poll /api/all" in (await second.json())["error"]
        async with session.get(server.url + "api/all") as fallback:  # what the page does meanwhile
            assert fallback.status == 200 and (await fallback.json())["api_version"] == 1

    serve(test, max_streams=1)


def test_stop_ends_open_streams_promptly() -> None:
    async def go() -> None:
        server = StatusServer(Source(), ServerConfig(port=0, stream_keepalive_s=60.0, shutdown_timeout_s=30.0))
        await server.start()
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(server.url + "api/stream") as response:
            lines = events(response)
            await next_snapshot(lines)
            started = time.monotonic()
            await server.stop()
            assert time.monotonic() - started < 10  # not the 30 s shutdown timeout
            assert [x async for x in lines] == []  # the stream ended
            assert server.streams == 0

    asyncio.run(go())


def test_head_on_the_stream_answers_headers_and_closes() -> None:
    async def test(server: StatusServer, source: Source, session: aiohttp.ClientSession) -> None:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"HEAD /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)  # the server closes: no stream behind a HEAD
        writer.close()
        head = data.decode("latin-1").lower()
        assert head.startswith("http/1.1 200") and "content-type: text/event-stream" in head and head.endswith("\r\n\r\n")
        assert source.calls == 0 and server.streams == 0

    serve(test)
