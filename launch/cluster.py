"""A local cluster: a coordinator, peers and status servers as child processes on 127.0.0.1.

The one launcher of the demo, the benchmarks and every end-to-end test. Each child leads its own
process group, so `kill` and `close` end it together with the helpers it spawned (hivemind's DHT
process, p2pd daemons), as a crashed machine would; `close` reaps every group whatever happened,
and clusters a caller forgot to close are closed at interpreter exit. Inside `with`, SIGTERM (from
`timeout`, systemd, `docker stop`) unwinds the block as Ctrl+C does (see `SigtermUnwinds`), so the
children are reaped then too. Logs go to files (a full pipe would stall a child). Usage:

    with LocalCluster(tmp_path, nano_run()) as cluster:
        cluster.add_peer("alice")
        url = cluster.start_status()
        wait_for(lambda: cluster.rounds_completed(1) >= 2, 120, "2 rounds", cluster)
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # ../shared beside the checkout
T = TypeVar("T")

# A run that closes a round in about a second on one CPU thread per peer.
NANO_RUN: dict[str, Any] = {
    "preset": "nano",
    "data_source": str(DATA) if DATA.exists() else "stdlib",
    "inner_steps": 5,
    "batch_size": 4,
    "seq_len": 64,
    "round_timeout_s": 20.0,
    "heartbeat_interval_s": 1.0,
    "heartbeat_ttl_s": 4.0,
    "num_shards": 4,
    "warmup_steps": 5,
    "eval_batches": 2,
}

_ADDRESS = re.compile(r"join-swarm (/ip4/\S+/p2p/\S+)")
_PEER_ID = re.compile(r"peer (\S+) listening on")
_STATUS = re.compile(r"status page: (http://\S+)")
_LIVE: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl+C raises KeyboardInterrupt (see SigtermUnwinds): every `with` and
    `finally` on the way out runs, and code that handles Ctrl+C handles this too."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended


class SigtermUnwinds:
    """While inside (main thread only; elsewhere it does nothing): SIGTERM raises Terminated in the
    main thread, as Ctrl+C raises KeyboardInterrupt. Python's default SIGTERM ends the process at
    once, without unwinding, and leaves the children it started (in their own sessions) running.

    One SIGTERM raises, once: one arriving while `held()` (cleanup under way) is raised only when the
    context is left, so cleanup is not cut short, and those after the first are ignored (the process
    is on its way out). Leaving restores the handler found on entry: these nest (a LocalCluster in a
    Testbed, both in a command's main).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._raised = False
        self._pending = False
        self._holding = 0

    def __enter__(self) -> SigtermUnwinds:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._raised or self._holding:
            self._pending = True
            return
        self._raised = True
        raise Terminated("SIGTERM")

    @contextmanager
    def held(self) -> Iterator[None]:
        """SIGTERM does not interrupt this block (it is raised when the whole context is left)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # None: the handler on entry was not set from Python; the default is what it did
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        if self._pending and not self._raised and (not exc or exc[0] is None):
            self._raised = True
            raise Terminated("SIGTERM")

    def leave_after(self, cleanup: Callable[[], None], *exc: object) -> None:
        """Run `cleanup` with SIGTERM held, then leave (`exc`: what __exit__ would be given)."""
        try:
            with self.held():
                cleanup()
        finally:
            self.__exit__(*exc)


def _default_sigterm_in_child() -> None:
    """A child forked while SigtermUnwinds is in force (multiprocessing: hivemind's DHT process) gets
    the default SIGTERM back: the handler would unwind the parent's `with` blocks copied into it (a
    LocalCluster's close() killing the parent's children) or hold SIGTERM there for good."""
    if isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), SigtermUnwinds):
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # not this child's main thread (cannot happen after fork, but never fail a fork)
            pass


if hasattr(os, "register_at_fork"):  # not on Windows (nothing forks there)
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


def stopped(prog: str, interrupt: KeyboardInterrupt) -> int:
    """A command stopped by Ctrl+C or SIGTERM: one line on stderr, and the exit status (130 or 143)."""
    terminated = isinstance(interrupt, Terminated)
    print(f"\n{prog}: stopped by {'SIGTERM' if terminated else 'Ctrl+C'}", file=sys.stderr, flush=True)
    return Terminated.exit_code if terminated else 130


def nano_run(**overrides: Any) -> dict[str, Any]:
    """NANO_RUN with some fields changed."""
    return {**NANO_RUN, **overrides}


def wait_for(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str = "condition",
    cluster: LocalCluster | None = None,
    *,
    interval_s: float = 0.25,
) -> T:
    """Poll until predicate() is truthy and return its value.

    Exceptions count as 'not yet' (a server not listening yet) and the last one is reported at the
    end, except RuntimeError: a child died, waiting longer cannot help. With a cluster, a child of
    it exiting with an error ends the wait at once; either failure message carries its logs.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except RuntimeError:
            raise
        except Exception as e:
            last_error = e
        if cluster is not None and cluster.failed():
            raise RuntimeError(f"a swarm process died while waiting for {what}:\n{cluster.logs_tail()}")
        if time.monotonic() > deadline:
            because = f" (last error: {last_error!r})" if last_error else ""
            logs = f":\n{cluster.logs_tail()}" if cluster is not None else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{because}{logs}")
        time.sleep(interval_s)


def get_json(url: str, timeout_s: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


_Closed = TypeVar("_Closed", bound="ClosedOnSigterm")


class ClosedOnSigterm:
    """A `with` resource (local cluster, testbed) that SIGTERM unwinds as Ctrl+C does: `open()` runs
    on entry, `close()` on the way out, never cut short by a SIGTERM arriving meanwhile."""

    _sigterm: SigtermUnwinds | None = None

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Closed) -> _Closed:
        self._sigterm = SigtermUnwinds().__enter__()
        try:
            self.open()
        except BaseException as e:
            self._leave(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._leave(*exc)

    def _leave(self, *exc: object) -> None:
        """close(), not cut short by SIGTERM (one arriving meanwhile is raised after), and the old handler back."""
        sigterm, self._sigterm = self._sigterm, None
        if sigterm is None:
            self.close()
        else:
            sigterm.leave_after(self.close, *exc)


class LocalCluster(ClosedOnSigterm):
    def __init__(
        self,
        workdir: Path,
        run: dict,
        *,
        status_port: int | None = None,
        coordinator_args: Sequence[str] = (),
        start_timeout_s: float = 120,
        coordinator_host: str = "127.0.0.1",
        coordinator_prefix: Sequence[str] = (),
    ):
        """`run`: RunConfig fields (written to workdir/run.json); `status_port`: serve the coordinator's
        status page there (0 = any free port); `coordinator_args`: extra swarm-coordinator flags;
        `coordinator_host`, `coordinator_prefix`: where it listens and what its command line starts
        with (a testbed host's address and `ip netns exec NAME`, see launch/testbed.py)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_file = self.workdir / "run.json"
        self.run_file.write_text(json.dumps(run))
        self.metrics_dir = self.workdir / "metrics"
        self.status_port = status_port
        self.coordinator_args = list(coordinator_args)
        self.start_timeout_s = start_timeout_s
        self.coordinator_host = coordinator_host
        self.coordinator_prefix = list(coordinator_prefix)
        self.procs: dict[str, subprocess.Popen] = {}  # the latest life of each named child
        self.killed: set[str] = set()
        self._all: list[subprocess.Popen] = []  # every life of every child, all reaped by close()
        self._onlookers: set[str] = set()  # status servers, not peers
        self.address = ""
        self.status_url = ""
        _LIVE.add(self)

    def open(self) -> None:
        """Start the coordinator (on entering the `with`)."""
        self.start_coordinator(self.coordinator_args)

    @property
    def num_peers(self) -> int:
        return sum(1 for name in self.procs if name != "coordinator" and name not in self._onlookers)

    def _log_path(self, name: str, life: int | None = None) -> Path:
        """workdir/<name>.log (<name>.<life>.log for an earlier life); odd names (a hostile peer's
        markup) are made safe for the file system and kept apart by a hash."""
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
        if stem != name:
            stem += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        return self.workdir / (f"{stem}.log" if life is None else f"{stem}.{life}.log")

    def _spawn(self, name: str, args: list[str], prefix: Sequence[str] = ()) -> subprocess.Popen:
        path = self._log_path(name)
        if path.exists():  # a restart: keep the earlier life's log beside the new one
            life = 1
            while self._log_path(name, life).exists():
                life += 1
            path.rename(self._log_path(name, life))
        self.killed.discard(name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                [*prefix, sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs[name] = proc
        self._all.append(proc)
        return proc

    def start_coordinator(self, extra: Sequence[str] = ()) -> None:
        """Start (or restart, keeping its state directory) the coordinator; waits for its address."""
        args = ["-m", "launch.coordinator", "--state-dir", str(self.workdir / "coordinator")]
        args += ["--run-file", str(self.run_file), "--host", self.coordinator_host]
        if self.status_port is not None:
            args += ["--status-port", str(self.status_port)]
        self._spawn("coordinator", args + list(extra), self.coordinator_prefix)
        self.address = _ADDRESS.findall(self.wait_for_log("coordinator", _ADDRESS))[-1]
        match = _STATUS.search(self.log("coordinator"))
        self.status_url = match.group(1) if match else ""

    def add_peer(
        self,
        name: str,
        *,
        threads: int = 1,
        max_rounds: int | None = None,
        device: str | None = None,
        extra: Sequence[str] = (),
        program: Sequence[str] = ("-m", "launch.join"),
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        address: str | None = None,
    ) -> subprocess.Popen:
        """Start a join-swarm peer (or another program taking join-swarm's arguments), listening on
        `host`, its command line after `prefix` (a testbed host's), joining through `address` (default:
        the coordinator's; another peer's address then needs `--coordinator` in `extra`)."""
        args = [*program, address or self.address, "--host", host, "--name", name, "--threads", str(threads)]
        args += ["--out", str(self.metrics_dir)]
        if max_rounds is not None:
            args += ["--max-rounds", str(max_rounds)]
        if device is not None:
            args += ["--device", device]
        return self._spawn(name, args + list(extra), prefix)

    def start_status(self, address: str | None = None, *, name: str = "status", coordinator: str | None = None) -> str:
        """Start `swarm-status` on a free port, joined through `address` (default: the coordinator's);
        `coordinator` is the coordinator's peer id when `address` is another peer's. Returns the page URL."""
        args = ["-m", "launch.status", address or self.address, "--port", "0", "--dht-host", "127.0.0.1"]
        if coordinator:
            args += ["--coordinator", coordinator]
        self._onlookers.add(name)
        self._spawn(name, args)
        return _STATUS.findall(self.wait_for_log(name, _STATUS))[-1]

    def log(self, name: str) -> str:
        """What the named child (its latest life) printed so far."""
        path = self._log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, chars: int = 2500) -> str:
        """The end of every child's log, for failure messages."""
        return "\n".join(f"--- {name}\n{self.log(name)[-chars:]}" for name in self.procs)

    def wait_for_log(self, name: str, pattern: re.Pattern, timeout_s: float | None = None) -> str:
        """Wait until the named child's log matches; returns the log. Raises if the child exits first."""

        def matched() -> str | None:
            text = self.log(name)
            if pattern.search(text):
                return text
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{text[-3000:]}")
            return None

        try:
            return wait_for(matched, timeout_s or self.start_timeout_s, f"{name} to print {pattern.pattern!r}", interval_s=0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}:\n{self.log(name)[-3000:]}") from None

    def metrics_by_round(self) -> dict[int, list[dict]]:
        """Every peer's per-round metrics rows, grouped by round."""
        by_round: dict[int, list[dict]] = defaultdict(list)
        for path in sorted(self.metrics_dir.glob("peer-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                by_round[row["round"]].append({**row, "peer": path.stem})
        return by_round

    def peer_id(self, name: str) -> str:
        match = _PEER_ID.search(self.log(name))
        return match.group(1) if match else ""

    @property
    def peer_names(self) -> dict[str, str]:
        """Metrics file stem ('peer-<last 8 of id>') -> the name the peer was started with."""
        names = {}
        for name in self.procs:
            pid = self.peer_id(name)
            if pid:
                names[f"peer-{pid[-8:]}"] = name
        return names

    def rounds_completed(self, num_peers: int) -> int:
        """1 + the last round that at least num_peers peers have finished (0 if none)."""
        done = [r for r, rows in self.metrics_by_round().items() if len(rows) >= num_peers]
        return max(done) + 1 if done else 0

    def first_contribution(self, name: str, *, included: bool = False) -> int | None:
        """The first round in which the named peer sent a payload (that the round applied)."""
        stem = f"peer-{self.peer_id(name)[-8:]}"
        rounds = [
            r
            for r, rows in self.metrics_by_round().items()
            for row in rows
            if row["peer"] == stem and row["payload_bytes"] and (row.get("included") or not included)
        ]
        return min(rounds) if rounds else None

    def failed(self) -> bool:
        """Whether a child that was not killed on purpose exited with an error."""
        return any(p.poll() not in (None, 0) for n, p in self.procs.items() if n not in self.killed)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the child's whole process group (default SIGKILL: a crash, no goodbye) and wait for it."""
        self.killed.add(name)
        _signal_group(self.procs[name], sig)
        self.procs[name].wait(timeout=30)

    def close(self, grace_s: float = 15.0) -> None:
        """Ask every child to leave (SIGINT, as Ctrl+C), then SIGKILL whatever is left of each group."""
        for proc in self._all:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for proc in self._all:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self._all:
            _signal_group(proc, signal.SIGKILL)  # also ends helpers (p2pd) that a clean exit left behind
            proc.wait(timeout=30)
        self._all.clear()  # reaped: a second close must not signal their (maybe reused) ids
        _LIVE.discard(self)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _close_forgotten() -> None:
    for cluster in list(_LIVE):
        cluster.close(grace_s=5.0)
