"""The local-cluster launcher without a swarm: wait_for, log files, and reaping whole process groups."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, wait_for

# Leaves a sleeping grandchild in its process group (as a cleanly exited peer can leave p2pd),
# prints its pid, then exits with the code given as its last argument.
ORPHANING = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("grandchild", child.pid, flush=True)
sys.exit(int(sys.argv[-1]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet collected by init
        return f.read().split(") ")[1][0] != "Z"


def _start_orphaning(cluster: LocalCluster, tmp_path: Path, name: str, code: int) -> int:
    script = tmp_path / "orphaning.py"
    script.write_text(ORPHANING)
    cluster.add_peer(name, program=[str(script)], extra=[str(code)])
    pattern = re.compile(r"grandchild (\d+)")
    return int(pattern.findall(cluster.wait_for_log(name, pattern, timeout_s=30))[0])


def test_wait_for_returns_the_value_and_treats_exceptions_as_not_yet() -> None:
    calls = iter([ValueError("not listening"), None, 0, 42])

    def poll() -> int | None:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_for(poll, 5, "a value", interval_s=0.01) == 42


def test_wait_for_reports_what_and_the_last_error_on_timeout() -> None:
    def never() -> None:
        raise KeyError("missing")

    with pytest.raises(TimeoutError, match=r"waiting for the thing \(last error: KeyError\('missing'\)\)"):
        wait_for(never, 0.2, "the thing", interval_s=0.05)


def test_wait_for_stops_at_once_on_runtime_error() -> None:
    started = time.monotonic()

    def died() -> None:
        raise RuntimeError("child exited")

    with pytest.raises(RuntimeError, match="child exited"):
        wait_for(died, 30, "anything")
    assert time.monotonic() - started < 5


def test_close_reaps_the_whole_group_even_after_a_clean_exit(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, {})
    try:
        grandchild = _start_orphaning(cluster, tmp_path, "clean", 0)
        assert cluster.procs["clean"].wait(timeout=30) == 0 and not cluster.failed()
        assert _alive(grandchild)
    finally:
        cluster.close(grace_s=2)
    wait_for(lambda: not _alive(grandchild), 10, "the grandchild to be gone")


def test_kill_ends_the_group_and_failed_ignores_it(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, {})  # not entered: no coordinator, only the launcher's plumbing
    try:
        grandchild = _start_orphaning(cluster, tmp_path, "victim", 3)
        cluster.procs["victim"].wait(timeout=30)
        assert cluster.failed()  # exited with 3
        cluster.kill("victim")
        assert not cluster.failed()
        wait_for(lambda: not _alive(grandchild), 10, "the grandchild to be gone")
    finally:
        cluster.close()


def test_odd_names_get_safe_distinct_log_files(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, {})
    try:
        for name in ("<img src=x>", "<img src=y>"):
            cluster.add_peer(name, program=["-c", f"print({name!r})"])
            cluster.procs[name].wait(timeout=30)
        assert cluster.log("<img src=x>").strip() == "<img src=x>"
        assert cluster.log("<img src=y>").strip() == "<img src=y>"
        assert all(re.fullmatch(r"[\w.-]+\.log", p.name) for p in tmp_path.glob("*.log"))
    finally:
        cluster.close()


def test_a_restart_keeps_the_earlier_log(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, {})
    try:
        for life in ("first", "second"):
            cluster.add_peer("p", program=["-c", f"print({life!r})"])
            cluster.procs["p"].wait(timeout=30)
        assert cluster.log("p").strip() == "second"
        assert (tmp_path / "p.1.log").read_text().strip() == "first"
    finally:
        cluster.close()
