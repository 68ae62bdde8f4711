"""A local swarm for end-to-end tests: coordinator, peers and status servers as real processes.

Every process listens on 127.0.0.1 with OS-chosen ports and runs in its own session, so `reap` and
`kill_hard` can end it together with the helpers it spawned (hivemind's DHT process and p2pd
daemons), as a crashed machine would. Logs go to files (a full pipe would stall a child); read them
with `log_text`. Usage:

    coord, address = start_coordinator(tmp_path)
    peers = [start_peer(address, "alice", tmp_path), start_peer(address, "bob", tmp_path)]
    try: ... wait_for(lambda: ..., timeout=60) ...
    finally: reap([coord, *peers])
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt")  # ../shared beside the checkout
T = TypeVar("T")

# A run that closes a round in about a second on one CPU thread per peer.
NANO_RUN = {
    "preset": "nano",
    "data_source": DATA if os.path.exists(DATA) else "stdlib",
    "inner_steps": 5,
    "batch_size": 4,
    "seq_len": 64,
    "round_timeout_s": 20,
    "heartbeat_interval_s": 1.0,
    "heartbeat_ttl_s": 4.0,
    "num_shards": 4,
    "warmup_steps": 5,
    "eval_batches": 2,
}


def _spawn(module: str, args: Sequence[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_LOG_LEVEL": os.environ.get("SWARM_LOG_LEVEL", "INFO")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def log_text(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def _search_log(proc: subprocess.Popen, pattern: str) -> str | None:
    match = re.search(pattern, log_text(proc))
    if match:
        return match.group(1)
    if proc.poll() is not None:
        raise RuntimeError(f"process exited with {proc.returncode} before printing {pattern!r}:\n{log_text(proc)[-3000:]}")
    return None


def wait_for(predicate: Callable[[], T], timeout: float, *, interval: float = 0.25, what: str = "condition") -> T:
    """Poll until predicate() is truthy and return it; exceptions count as 'not yet' until the end."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except RuntimeError:
            raise  # a child died: waiting longer cannot help
        except Exception as e:  # e.g. the server is not listening yet
            last_error = e
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
            )
        time.sleep(interval)


def start_coordinator(
    tmp_path: Path, run_overrides: dict | None = None, *, extra_args: Sequence[str] = (), timeout: float = 90
) -> tuple[subprocess.Popen, str]:
    """Start `swarm-coordinator` on a nano run; returns the process and the address peers join."""
    folder = Path(tmp_path) / "coordinator"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({**NANO_RUN, **(run_overrides or {})}))
    args = ["--state-dir", str(folder / "state"), "--run-file", str(folder / "run.json"), "--host", "127.0.0.1", *extra_args]
    proc = _spawn("launch.coordinator", args, folder / "log.txt")
    try:
        address = wait_for(
            lambda: _search_log(proc, r"join-swarm (/ip4/127\.0\.0\.1/\S+/p2p/\w+)"), timeout, what="coordinator address"
        )
    except BaseException:
        reap([proc])
        raise
    return proc, address


def start_peer(
    address: str, name: str, tmp_path: Path, *, max_rounds: int | None = None, extra_args: Sequence[str] = ()
) -> subprocess.Popen:
    """Start `join-swarm` (one CPU thread); the log lands in tmp_path/peer-<n>.txt."""
    args = [address, "--host", "127.0.0.1", "--threads", "1", "--device", "cpu", "--name", name, *extra_args]
    if max_rounds is not None:
        args += ["--max-rounds", str(max_rounds)]
    index = len(list(Path(tmp_path).glob("peer-*.txt")))
    return _spawn("launch.join", args, Path(tmp_path) / f"peer-{index}.txt")


def start_status(
    address: str, tmp_path: Path, *, coordinator: str | None = None, timeout: float = 90
) -> tuple[subprocess.Popen, str]:
    """Start `swarm-status` on a free port; returns the process and the page URL."""
    args = [address, "--port", "0", "--dht-host", "127.0.0.1"]
    if coordinator:
        args += ["--coordinator", coordinator]
    index = len(list(Path(tmp_path).glob("status-*.txt")))
    proc = _spawn("launch.status", args, Path(tmp_path) / f"status-{index}.txt")
    try:
        url = wait_for(lambda: _search_log(proc, r"status page: (http://\S+)"), timeout, what="status page URL")
    except BaseException:
        reap([proc])
        raise
    return proc, url


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it spawned: a crash, no goodbye."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait(timeout=30)


def reap(procs: Sequence[subprocess.Popen], grace_s: float = 5.0) -> None:
    """Ask every process to leave (SIGTERM), then SIGKILL whatever is left of each group."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)  # also ends helpers (p2pd) a clean exit left behind
        proc.wait(timeout=30)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
