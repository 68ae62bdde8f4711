"""SIGTERM stops every long-running command as Ctrl+C does: state saved where the command saves it,
and every process it started (peers, hivemind's DHT processes, p2pd daemons) gone.

`timeout`, systemd and `docker stop` send SIGTERM, whose default ends a Python process at once,
without unwinding: swarm-demo used to leave its whole swarm running that way. The slow cases run
the console scripts themselves, wait for a line that proves each is up, record every descendant,
SIGTERM the command alone, and check that none of the descendants outlived it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from launch.cluster import NANO_RUN, REPO, SigtermUnwinds, Terminated, nano_run, wait_for
from launch.testbed import cleanup, unavailable

BIN = Path(sys.executable).parent  # the virtualenv's bin/: the console scripts live beside python
START_S = 120  # a command to print that it is up (two loaded cores, torch imports, DHT bootstrap)
STOP_S = 60  # the command to exit after SIGTERM
GONE_S = 10  # its descendants to be gone after it exited (a killed process takes a moment to die)


# ----- processes --------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[1]), fields[0], int(fields[19])  # stat fields 4, 3 and 22


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of `pid`: pid -> start time (which tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: dict[int, int] = {}
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            stat = _stat(child)
            if child not in found and stat is not None and stat[1] != "Z":
                found[child] = stat[2]
                stack.append(child)
    return found


def alive(pid: int, started: int) -> bool:
    """Whether that process still runs: a zombie is dead, a pid now another process's is gone."""
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z" and stat[2] == started


def _describe(pids: dict[int, int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = "?"
        lines.append(f"  {pid}: {cmdline[:200]}")
    return "\n".join(lines)


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT back to its default, as a terminal starts a command. A
    suite launched in the background of a non-interactive shell (`cmd &`) has SIGINT ignored, every
    process inherits that, and Python then never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """A console script as a subprocess (its own session, so only what we send reaches it), its
    output collected line by line by a thread."""

    def __init__(self, name: str, *args: object, cwd: Path):
        self.name = name
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [str(BIN / name), *map(str, args)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_as_from_a_terminal,
        )
        self.lines: list[str] = []
        self.family: dict[int, int] = {}  # descendants recorded before SIGTERM
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str, timeout_s: float = START_S) -> re.Match[str]:
        """The first output line matching `pattern`, waiting for it; fails if the command exits first."""
        regex = re.compile(pattern)

        def matched() -> re.Match[str] | None:
            for line in list(self.lines):
                if found := regex.search(line):
                    return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before printing {pattern!r}")
            return None

        try:
            return wait_for(matched, timeout_s, f"{self.name} to print {pattern!r}", interval_s=0.2)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}; its output:\n{self.output[-4000:]}") from None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Record the descendants, signal the command alone, wait for it to exit and for every
        recorded descendant to be gone; returns the exit status."""
        self.family = descendants(self.proc.pid)
        assert self.family, f"{self.name} started no process: nothing to check"
        os.kill(self.proc.pid, sig)
        what = signal.Signals(sig).name
        try:
            code = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs {STOP_S}s after {what}; its output:\n{self.output[-4000:]}") from None
        deadline = time.monotonic() + GONE_S
        while (left := {p: s for p, s in self.family.items() if alive(p, s)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, (
            f"{self.name} exited ({code}) after {what} and left {len(left)} of its {len(self.family)} processes:\n"
            f"{_describe(left)}\nits output:\n{self.output[-4000:]}"
        )
        return code

    def reap(self) -> None:
        """SIGKILL the command and whatever of its family is left (a failing test leaves nothing)."""
        family = dict(self.family)
        if self.proc.returncode is None:  # not waited for: its pid, so its group's id, is still its own
            family.update(descendants(self.proc.pid))
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # also what it left behind in its own group
            except (ProcessLookupError, PermissionError):
                pass
        for pid, started in family.items():
            if alive(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)


@pytest.fixture
def commands() -> Iterator[list[Command]]:
    """Commands a test starts (append them): reaped at the end whatever happened."""
    started: list[Command] = []
    try:
        yield started
    finally:
        for command in started:
            command.reap()


def _saved_state(directory: Path) -> dict:
    """The meta.json of a state saved there (swarm/state.py's save_state)."""
    meta = directory / "meta.json"
    assert meta.is_file(), f"no state saved in {directory}"
    return json.loads(meta.read_text())


# ----- the mechanism, without a swarm -----------------------------------------------------------


def _handler() -> Callable[[int, FrameType | None], Any]:
    """The SIGTERM handler now installed (called directly: no real signal hits the test process)."""
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler), f"SIGTERM handler {handler!r}"
    return handler


def test_sigterm_unwinds_raises_once_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with SigtermUnwinds():
        outer_handler = _handler()
        assert outer_handler is not before
        with SigtermUnwinds():
            inner_handler = _handler()
            assert inner_handler is not outer_handler
            with pytest.raises(Terminated):
                inner_handler(signal.SIGTERM, None)
            inner_handler(signal.SIGTERM, None)  # a second SIGTERM: the process is on its way out already
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # nested: the outer one is back
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)  # whatever handles Ctrl+C handles it


def test_a_sigterm_during_cleanup_waits_for_its_end() -> None:
    before = signal.getsignal(signal.SIGTERM)
    order = []

    def cleanup() -> None:
        _handler()(signal.SIGTERM, None)  # held: no exception here
        order.append("cleanup finished")

    guard = SigtermUnwinds().__enter__()
    with pytest.raises(Terminated):
        guard.leave_after(cleanup, None, None, None)  # as LocalCluster.__exit__ does after a clean block
        order.append("went on")
    assert order == ["cleanup finished"]
    assert signal.getsignal(signal.SIGTERM) is before

    guard = SigtermUnwinds().__enter__()
    with pytest.raises(ValueError):  # the block failed: its exception goes on, the SIGTERM is not raised over it
        try:
            raise ValueError("the block failed")
        except ValueError as e:
            guard.leave_after(cleanup, type(e), e, e.__traceback__)
            raise
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_it_changes_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def enter() -> None:
        with SigtermUnwinds():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before


# A LocalCluster as a command runs it: its "coordinator" and peer are sleepers that each leave a
# grandchild in their process group (as a peer leaves its DHT process and p2pd). Given a link, it
# sits inside a testbed as `swarm-bench swarm --link` or `scale --link` puts it: each process in its
# own network namespace.
FAKE_CLUSTER = """
import re, sys, time
from launch.cluster import LocalCluster, stopped
from launch.testbed import placement

SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print('sleeping', flush=True); time.sleep(600)"

class Fake(LocalCluster):
    def start_coordinator(self, extra=()):
        self._spawn("coordinator", ["-c", SLEEPER], self.coordinator_prefix)
        self.wait_for_log("coordinator", re.compile("sleeping"))

try:
    link = sys.argv[2] if len(sys.argv) > 2 else None
    with placement(link, 1, tag="sigtrm") as place, Fake(sys.argv[1], {}, **place.coordinator) as cluster:
        cluster.add_peer("peer", program=["-c", SLEEPER], **place.peer(0))
        cluster.wait_for_log("peer", re.compile("sleeping"))
        print("up", flush=True)
        time.sleep(600)
except KeyboardInterrupt as e:
    sys.exit(stopped("fake", e))
"""


def _fake_cluster(tmp_path: Path, commands: list[Command], *link: str) -> Command:
    script = tmp_path / "fake_cluster.py"
    script.write_text(FAKE_CLUSTER)
    command = Command("python", script, tmp_path / "work", *link, cwd=REPO)
    commands.append(command)
    command.wait_line("^up$", 60)
    assert len(descendants(command.proc.pid)) == 4  # two children, two grandchildren
    return command


@pytest.mark.parametrize(
    ("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl+C")], ids=("sigterm", "ctrl-c")
)
def test_a_local_cluster_reaps_its_process_groups(
    tmp_path: Path, commands: list[Command], sig: signal.Signals, code: int, name: str
) -> None:
    command = _fake_cluster(tmp_path, commands)
    assert command.stop(sig) == code
    assert command.lines[-1].strip() == f"fake: stopped by {name}"


@pytest.mark.skipif(unavailable() is not None, reason=f"no network namespaces here: {unavailable()}")
def test_a_testbed_and_its_cluster_are_torn_down_on_sigterm(tmp_path: Path, commands: list[Command]) -> None:
    try:
        command = _fake_cluster(tmp_path, commands, "10mbit")  # a rate only: no delay (that may need iptables)
        assert "swsigtrm-coord" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert command.stop() == 143
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "swsigtrm-" not in listed, f"namespaces left: {listed}"
    finally:
        cleanup("sigtrm")


# A testbed alone, with a process in a host's namespace: a SIGTERM outside any LocalCluster (while
# a benchmark sets its testbed up, or between two swarms) tears it down too.
TESTBED = """
import subprocess, sys, time
from launch.cluster import stopped
from launch.testbed import Testbed

try:
    with Testbed("sigtrm") as bed:
        host = bed.add_public("a")
        subprocess.Popen(host.prefix + ["sleep", "600"])
        print("up", flush=True)
        time.sleep(600)
except KeyboardInterrupt as e:
    sys.exit(stopped("testbed", e))
"""


@pytest.mark.skipif(unavailable() is not None, reason=f"no network namespaces here: {unavailable()}")
def test_a_testbed_alone_is_torn_down_on_sigterm(tmp_path: Path, commands: list[Command]) -> None:
    script = tmp_path / "testbed.py"
    script.write_text(TESTBED)
    command = Command("python", script, cwd=REPO)
    commands.append(command)
    try:
        command.wait_line("^up$", 60)
        assert command.stop() == 143
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "swsigtrm-" not in listed, f"namespaces left: {listed}"
    finally:
        cleanup("sigtrm")


# ----- the commands -----------------------------------------------------------------------------

DATA = NANO_RUN["data_source"]
TINY = ("--inner-steps", "2", "--batch-size", "2", "--seq-len", "32", "--data", DATA)


def _wait_log(path: Path, pattern: str, timeout_s: float = START_S) -> None:
    """Wait until a log file the command wrote matches (its children's logs: the command prints
    nothing for them)."""
    wait_for(lambda: path.is_file() and re.search(pattern, path.read_text(errors="replace")), timeout_s, f"{pattern!r} in {path}")


@pytest.mark.slow
def test_swarm_demo_stops_its_whole_swarm_on_sigterm(tmp_path: Path, commands: list[Command]) -> None:
    work = tmp_path / "demo"
    demo = Command("swarm-demo", "--peers", "2", "--rounds", "50", "--workdir", work, *TINY, cwd=tmp_path)
    commands.append(demo)
    demo.wait_line(r"^round\s+loss")  # printed once the coordinator is up and every peer started
    for peer in ("peer-0", "peer-1"):  # up with their DHT process and p2pd
        _wait_log(work / f"{peer}.log", r"peer \S+ listening on")
    _wait_log(work / "coordinator.log", r"\[start\] coordinator of run")  # it holds a state to save
    assert len(descendants(demo.proc.pid)) >= 3 * 3  # coordinator and peers, each with a DHT process and p2pd
    assert demo.stop() == 143
    assert demo.lines[-1].strip() == "swarm-demo: stopped by SIGTERM"
    assert "Traceback" not in demo.output
    _saved_state(work / "coordinator" / "state")  # the coordinator left as on Ctrl+C: state saved


@pytest.mark.slow
def test_swarm_bench_stops_its_local_swarm_on_sigterm(tmp_path: Path, commands: list[Command]) -> None:
    # `swarm-bench swarm`, one mode, one setting: the cheapest benchmark that starts a LocalCluster
    work = tmp_path / "bench"
    args = ("--modes", "sparseloco", "--overlap", "off", "--replicas", "2", "--rounds", "50", "--workdir", work, *TINY)
    bench = Command("swarm-bench", "swarm", *args, cwd=tmp_path)
    commands.append(bench)
    bench.wait_line(r"^sparseloco: loopback")  # printed once its cluster's coordinator is up
    swarm = work / "sparseloco-in-step"
    for peer in ("sparseloco-0", "sparseloco-1"):
        _wait_log(swarm / f"{peer}.log", r"peer \S+ listening on")
    _wait_log(swarm / "coordinator.log", r"\[start\] coordinator of run")
    assert bench.stop() == 143
    assert bench.lines[-1].strip() == "swarm-bench: stopped by SIGTERM"
    assert "Traceback" not in bench.output
    _saved_state(swarm / "coordinator" / "state")


class SharedCoordinator:
    """One swarm-coordinator for the coordinator, join-swarm and swarm-status cases; started again
    (in a fresh state dir) if the coordinator case ran first and stopped it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.command: Command | None = None
        self.started: list[Command] = []
        self.state_dir = directory
        self.address = ""

    def get(self) -> Command:
        if self.command is None or self.command.proc.poll() is not None:
            self.state_dir = self.directory / f"coordinator-{len(self.started) + 1}"
            run_file = self.directory / "run.json"
            run_file.write_text(json.dumps(nano_run()))
            self.command = Command(
                "swarm-coordinator",
                *("--state-dir", self.state_dir, "--run-file", run_file, "--host", "127.0.0.1", "--port", "0"),
                *("--save-every", "0", "--no-eval"),  # saved on exit only: the saved state proves the exit saved it
                cwd=self.directory,
            )
            self.started.append(self.command)
            self.address = self.command.wait_line(r"join-swarm (/ip4/\S+/p2p/\S+)").group(1)
        return self.command

    def reap(self) -> None:
        for command in self.started:
            command.reap()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCoordinator]:
    coordinator = SharedCoordinator(tmp_path_factory.mktemp("shared-coordinator"))
    try:
        yield coordinator
    finally:
        coordinator.reap()


@pytest.mark.slow
def test_join_swarm_leaves_on_sigterm(tmp_path: Path, commands: list[Command], shared: SharedCoordinator) -> None:
    shared.get()
    saved = tmp_path / "peer-state"
    peer = Command(
        "join-swarm",
        *(shared.address, "--host", "127.0.0.1", "--port", "0", "--name", "sigterm", "--threads", "1"),
        *("--save-dir", saved, "--save-every", "100000", "--out", tmp_path / "metrics"),  # saved on exit only
        cwd=tmp_path,
    )
    commands.append(peer)
    peer.wait_line(r"\[join\] sigterm joined at round")  # it holds the run's state
    assert peer.stop() == 0  # it left cleanly, as on Ctrl+C
    assert "leaving the swarm" in peer.output
    _saved_state(saved)


@pytest.mark.slow
def test_swarm_status_stops_on_sigterm(tmp_path: Path, commands: list[Command], shared: SharedCoordinator) -> None:
    shared.get()
    status = Command("swarm-status", shared.address, "--port", "0", "--dht-host", "127.0.0.1", cwd=tmp_path)
    commands.append(status)
    status.wait_line(r"status page: http://")
    assert status.stop() == 0
    assert "leaving the swarm" in status.output


@pytest.mark.slow
def test_swarm_coordinator_saves_and_stops_on_sigterm(shared: SharedCoordinator) -> None:
    coordinator = shared.get()  # last in this file: the join and status cases used it before
    coordinator.wait_line(r"\[start\] coordinator of run")  # it holds a state to save
    assert coordinator.stop() == 0
    assert "leaving the swarm" in coordinator.output
    _saved_state(shared.state_dir / "state")


@pytest.mark.slow
def test_a_node_stopped_while_its_dht_starts_leaves_nothing(tmp_path: Path, commands: list[Command]) -> None:
    """SIGTERM before the event loop runs (while `setup` starts the DHT process and p2pd): held
    until they are up, then the node leaves as on Ctrl+C. Python's default would end the command
    there and leave both running."""
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(nano_run()))
    args = ("--state-dir", tmp_path / "coordinator", "--run-file", run_file, "--host", "127.0.0.1", "--port", "0", "--no-eval")
    coordinator = Command("swarm-coordinator", *args, cwd=tmp_path)
    commands.append(coordinator)

    def p2pd_started() -> bool:
        for pid in descendants(coordinator.proc.pid):
            try:
                if b"p2pd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        if coordinator.proc.poll() is not None:
            raise RuntimeError(f"swarm-coordinator exited with {coordinator.proc.returncode}:\n{coordinator.output}")
        return False

    wait_for(p2pd_started, START_S, "the coordinator's p2pd", interval_s=0.02)  # the DHT is starting
    assert coordinator.stop() == 0
    assert "leaving the swarm" in coordinator.output


def test_the_console_scripts_are_installed() -> None:
    """The slow cases run the installed entry points: they exist where this interpreter is."""
    for name in ("swarm-demo", "swarm-bench", "swarm-coordinator", "join-swarm", "swarm-status"):
        assert (BIN / name).is_file(), f"{name} not in {BIN}: pip install -e ."
