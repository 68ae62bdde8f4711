"""A local cluster: a coordinator and peers as child processes on 127.0.0.1 (demo, benchmarks, tests).

Every child is started in its own process group and reaped on exit, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

_ADDRESS = re.compile(r"join-swarm (/ip4/\S+/p2p/\S+)")
_PEER_ID = re.compile(r"peer (\S+) listening on")
_STATUS = re.compile(r"status page: (http://\S+)")


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        run: dict,
        *,
        status_port: int | None = None,
        coordinator_args: tuple[str, ...] = (),
        start_timeout_s: float = 120,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_file = self.workdir / "run.json"
        self.run_file.write_text(json.dumps(run))
        self.metrics_dir = self.workdir / "metrics"
        self.status_port = status_port
        self.coordinator_args = list(coordinator_args)
        self.start_timeout_s = start_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()
        self.address = ""
        self.status_url = ""

    def __enter__(self) -> LocalCluster:
        try:
            self.start_coordinator(self.coordinator_args)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_peers(self) -> int:
        return sum(1 for name in self.procs if name != "coordinator")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        path = self.workdir / f"{name}.log"
        if path.exists():  # a restart: keep the earlier life's log beside the new one
            path.rename(self.workdir / f"{name}.{len(list(self.workdir.glob(name + '.*.log'))) + 1}.log")
        self.killed.discard(name)
        log = open(path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_coordinator(self, extra: list[str] = ()) -> None:
        args = [
            "-m",
            "launch.coordinator",
            "--state-dir",
            str(self.workdir / "coordinator"),
            "--run-file",
            str(self.run_file),
            "--host",
            "127.0.0.1",
        ]
        if self.status_port is not None:
            args += ["--status-port", str(self.status_port)]
        self._spawn("coordinator", args + list(extra))
        text = self.wait_for_log("coordinator", _ADDRESS)
        self.address = _ADDRESS.search(text).group(1)
        match = _STATUS.search(self.log("coordinator"))
        self.status_url = match.group(1) if match else ""

    def add_peer(
        self,
        name: str,
        *,
        threads: int = 1,
        max_rounds: int | None = None,
        extra: list[str] = (),
        program: list[str] = ("-m", "launch.join"),
    ) -> subprocess.Popen:
        """Start a join-swarm peer (or another program taking join-swarm's arguments)."""
        args = [
            *program,
            self.address,
            "--host",
            "127.0.0.1",
            "--name",
            name,
            "--threads",
            str(threads),
            "--out",
            str(self.metrics_dir),
        ]
        if max_rounds is not None:
            args += ["--max-rounds", str(max_rounds)]
        return self._spawn(name, args + list(extra))

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, pattern: re.Pattern, timeout_s: float | None = None) -> str:
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            text = self.log(name)
            if pattern.search(text):
                return text
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not print {pattern.pattern!r} in time:\n{self.log(name)[-3000:]}")

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
        return any(p.poll() not in (None, 0) for n, p in self.procs.items() if n not in self.killed)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.killed.add(name)
        os.killpg(self.procs[name].pid, sig)
        self.procs[name].wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
