"""The status page in a real headless Chromium against a live local swarm (coordinator + 2 peers).

One peer is named with markup and script; the page must show that text literally and run nothing.
Screenshots land in test-artifacts/ (gitignored). Skipped only when Chromium or Playwright is absent.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest

from launch.cluster import NANO_RUN, REPO, LocalCluster, get_json, wait_for
from swarm.status.server import ServerConfig, StatusServer

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
try:
    from playwright.sync_api import Dialog, Locator, Page, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="the playwright Python package is not installed"),
]
HOSTILE = "<img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TTL = NANO_RUN["heartbeat_ttl_s"]
POLL_LATENCY_S = 1.0 + 1.5 + 2.5  # last beat up to 1 s before the kill + page poll + slack for a loaded 2-core machine
ARTIFACTS = REPO / "test-artifacts"


class Swarm(NamedTuple):
    cluster: LocalCluster
    url: str


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with LocalCluster(tmp_path_factory.mktemp("status-browser"), NANO_RUN) as cluster:
        cluster.add_peer("alice", device="cpu")
        cluster.add_peer(HOSTILE, device="cpu")
        url = cluster.start_status()
        wait_for(lambda: get_json(url + "api/summary")["live_peers"] == 2, 120, "both peers live", cluster)
        yield Swarm(cluster, url)


@pytest.fixture(scope="module")
def browser(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.on("request", lambda r: requests.append(r.url))
        p = context.new_page()
        p.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        p.on("pageerror", lambda e: problems.append(str(e)))

        def on_dialog(d: Dialog) -> None:
            problems.append(f"dialog: {d.message}")
            d.dismiss()

        p.on("dialog", on_dialog)
        p.goto(swarm.url)
        yield SimpleNamespace(page=p, requests=requests, problems=problems)
        context.close()


def row(page: Page, peer_id: str) -> Locator:
    return page.locator(f'#peers tbody tr[data-peer-id="{peer_id}"]')


def row_is_live(page: Page, peer_id: str) -> bool:
    return row(page, peer_id).get_attribute("data-state") == "live"


def peer_ids(url: str) -> dict[str, str]:
    """Name -> peer id of every live peer (the coordinator included)."""
    return {p["name"]: p["peer_id"] for p in get_json(url + "api/peers") if p["state"] == "live"}


def test_a_row_per_live_peer_and_the_round_advances(swarm: Swarm, browser: SimpleNamespace) -> None:
    page = browser.page
    ids = peer_ids(swarm.url)
    assert {"coordinator", "alice", HOSTILE} <= set(ids)
    for name, peer_id in ids.items():
        wait_for(partial(row_is_live, page, peer_id), 20, f"a live row for {name}")
    first = wait_for(
        lambda: page.text_content("#round").strip().isdigit() and int(page.text_content("#round")), 30, what="a round number"
    )
    wait_for(lambda: int(page.text_content("#round")) >= first + 2, 60, what="the round counter to advance")
    wait_for(lambda: page.locator("#plot-loss svg polyline").count() >= 2, 30, what="the loss plot")
    assert page.locator("#plot-bytes svg polyline").count() == 2 and page.locator("#plot-peers svg").count() == 1
    assert page.locator("#events li").count() > 0
    own = swarm.url.rstrip("/")
    assert all(u.startswith(own) or u.startswith("data:") for u in browser.requests), "the page loaded something from elsewhere"
    # Every redraw came over the push stream: the round advanced on the page without a single poll.
    assert own + "/api/stream" in browser.requests
    assert not any(u.startswith(own + "/api/all") for u in browser.requests), "the page polled instead of using the stream"
    assert (page.text_content("#conn-text") or "").startswith("live ·")
    assert not browser.problems, browser.problems


def test_hostile_peer_name_shows_literally_and_runs_nothing(swarm: Swarm, browser: SimpleNamespace) -> None:
    page = browser.page
    peer_id = peer_ids(swarm.url)[HOSTILE]
    wait_for(lambda: row(page, peer_id).count() == 1, 20, what="the hostile peer's row")
    assert row(page, peer_id).locator(".name").text_content() == HOSTILE
    wait_for(
        lambda: any(HOSTILE in t for t in page.locator("#events .text").all_text_contents()),
        20,
        what="the hostile name in the event log",
    )
    page.wait_for_timeout(2000)  # a few redraws with the hostile text in place
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0 and page.locator("body script").count() == 0
    assert not any(u.endswith("/x") for u in browser.requests), "the injected <img> was fetched"
    assert not browser.problems, browser.problems
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-hostile-name.png"), full_page=True)


def test_killed_peer_is_marked_stale_within_its_heartbeat_timeout(swarm: Swarm, browser: SimpleNamespace) -> None:
    # A peer of its own to kill, so the shared swarm stays as the other tests expect it.
    page = browser.page
    swarm.cluster.add_peer("carol", device="cpu")
    peer_id = wait_for(lambda: peer_ids(swarm.url).get("carol"), 120, "carol live in the API", swarm.cluster)
    wait_for(lambda: row_is_live(page, peer_id), 20, "carol live on the page")
    swarm.cluster.kill("carol")
    killed = time.monotonic()
    try:
        wait_for(
            lambda: row(page, peer_id).get_attribute("data-state", timeout=1000) == "stale",
            TTL + POLL_LATENCY_S,
            "carol marked stale",
            interval_s=0.1,
        )
    except TimeoutError:
        api_row = next((p for p in get_json(swarm.url + "api/peers") if p["peer_id"] == peer_id), None)
        page_says = (row(page, peer_id).get_attribute("data-state", timeout=1000), page.text_content("#conn-text"))
        raise AssertionError(f"not stale after {time.monotonic() - killed:.1f}s: API {api_row}, page {page_says}") from None
    elapsed = time.monotonic() - killed
    assert elapsed <= TTL + POLL_LATENCY_S
    assert float((row(page, peer_id).locator(".age").text_content() or "").split()[0]) > TTL
    assert row(page, peer_id).locator(".state .badge").text_content() == "stale"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    print(f"killed peer marked stale {elapsed:.1f}s after SIGKILL (heartbeat TTL {TTL}s)")


@contextmanager
def server_in_thread(snapshot: dict, **cfg: object) -> Iterator[str]:
    """A status server on its own event loop in a thread, serving a fixed snapshot; yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = StatusServer(lambda: snapshot, ServerConfig(port=0, **cfg))  # type: ignore[arg-type]
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield server.url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_page_polls_while_the_stream_is_refused(swarm: Swarm, browser: SimpleNamespace) -> None:
    snapshot = get_json(swarm.url + "api/all")
    before = len(browser.requests), len(browser.problems)
    with server_in_thread(snapshot, max_streams=0) as url:  # every /api/stream answered 503
        page = browser.page.context.new_page()
        try:
            page.goto(url)
            wait_for(lambda: page.text_content("#round") == str(snapshot["summary"]["round"]), 60, what="the round, polled")
            polls = "performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/api/all')).length"
            wait_for(lambda: page.evaluate(polls) >= 3, 60, what="repeated polls")
            assert url + "api/stream" in browser.requests[before[0] :]
            assert "polling" in (page.text_content("#conn-text") or "")
            assert page.locator("#peers tbody tr").count() == len(snapshot["peers"])
        finally:
            page.close()
    # The refused stream is expected here; keep it out of what the other tests check.
    unexpected = [p for p in browser.problems[before[1] :] if "event-stream" not in p and "503" not in p]
    del browser.problems[before[1] :]
    browser.requests[:] = [u for u in browser.requests if not u.startswith(url)]
    assert not unexpected, unexpected


def test_recent_rounds_show_the_modes_own_figures(swarm: Swarm, browser: SimpleNamespace) -> None:
    """A mode's per-round figures (SPSA: scalars and their bytes) appear as extra columns, by name."""
    snapshot = wait_for(lambda: (s := get_json(swarm.url + "api/all"))["history"]["rounds"] and s, 60, what="a closed round")
    for r in snapshot["history"]["rounds"]:
        r["extra"] = {"scalars": 24, "scalar_bytes": 24}
    before = len(browser.problems)
    with server_in_thread(snapshot) as url:
        page = browser.page.context.new_page()
        try:
            page.goto(url)
            wait_for(lambda: page.locator("#rounds tbody tr").count() > 0, 60, what="the rounds table")
            assert page.locator("#rounds thead th").all_text_contents()[-2:] == ["scalar bytes", "scalars"]
            first = page.locator("#rounds tbody tr").first
            assert first.get_attribute("data-round") == str(snapshot["history"]["rounds"][-1]["round"])
            assert first.locator('td[data-key="scalars"]').text_content() == "24"
            assert first.locator('td[data-key="scalar_bytes"]').text_content() == "24 B"
        finally:
            page.close()
    # Keep this page's traffic out of what the other tests check of the main page's.
    problems = browser.problems[before:]
    del browser.problems[before:]
    browser.requests[:] = [u for u in browser.requests if not u.startswith(url)]
    assert not problems, problems
