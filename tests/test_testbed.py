"""The shaped-link testbed: a link measures at its set rate, NAT lets connections out and none in,
and namespaces go away with the testbed (also after a crash: the next start sweeps them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from launch.testbed import Link, Testbed, cleanup, nat_unavailable, unavailable

# A receiver that counts bytes for a while and prints the rate it saw; a sender that writes as fast
# as the link lets it. Both run inside testbed namespaces (`ip netns exec`).
RECEIVER = """
import socket, sys, time
srv = socket.socket(); srv.bind(("0.0.0.0", 5201)); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept(); total = 0; start = None; end = time.monotonic() + 60
while time.monotonic() < end:
    data = conn.recv(1 << 16)
    if not data:
        break
    if start is None:
        start = time.monotonic()  # from the first byte: connection set-up is not the link's rate
    else:
        total += len(data)
print(total * 8 / (time.monotonic() - start), flush=True)
"""
SENDER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5201), timeout=10); chunk = b"x" * (1 << 16)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.sendall(chunk)
s.close()
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as e:
    print("failed", type(e).__name__)
"""
LISTEN = """
import socket, time
srv = socket.socket(); srv.bind(("0.0.0.0", 5202)); srv.listen(8); print("ready", flush=True); time.sleep(60)
"""

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no network namespaces here: {unavailable()}")


def _start(prefix: list[str], code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _measure_bits_s(bed: Testbed, src: str, dst: str, seconds: float) -> float:
    receiver = _start(bed.hosts[dst].prefix, RECEIVER)
    try:
        sender = subprocess.run(
            [*bed.hosts[src].prefix, sys.executable, "-c", SENDER, bed.hosts[dst].ip, str(seconds)], timeout=60, check=True
        )
        assert sender.returncode == 0
        out, _ = receiver.communicate(timeout=60)
        return float(out.strip())
    finally:
        receiver.kill()
        receiver.wait()


def _connect(bed: Testbed, src: str, ip: str, port: int) -> str:
    cmd = [*bed.hosts[src].prefix, sys.executable, "-c", CONNECT, ip, str(port), "3"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()


def test_link_parse() -> None:
    assert Link.parse("20mbit:50ms") == Link("20mbit", "50ms", 0.0)
    assert Link.parse("10mbit:80ms:0.5%").loss_pct == 0.5
    assert Link.parse("20mbit").rate_bits_s == 20e6
    assert Link.parse("1gbit:1s").delay_s == 1.0
    for bad in ("fast", "20mbit:soon", "20mbit:5ms:100", "1:2:3:4"):
        with pytest.raises(ValueError):
            Link.parse(bad)


def test_shaped_link_measures_its_rate() -> None:
    """A 20 Mbit/s link carries 20 Mbit/s (within 20%) one way and the other; an unshaped one more."""
    with Testbed("tlink") as bed:
        bed.add_public("a", Link.parse("20mbit:0ms"))
        bed.add_public("b", Link.parse("20mbit:0ms"))
        bed.add_public("c")
        for src, dst in (("a", "b"), ("b", "a"), ("c", "a")):  # c->a: only a's ingress shapes it
            rate = _measure_bits_s(bed, src, dst, 3.0)
            assert abs(rate - 20e6) <= 0.2 * 20e6, f"{src}->{dst}: {rate / 1e6:.1f} Mbit/s on a 20 Mbit/s link"
        slow = bed.hosts["a"].link
        assert slow is not None and slow.rate_bits_s == 20e6


RTT = """
import socket, statistics, sys, time
times = []
for _ in range(7):
    t = time.monotonic(); socket.create_connection((sys.argv[1], 5202), timeout=10).close(); times.append(time.monotonic() - t)
print(statistics.median(times))
"""


def test_delay_holds_outgoing_packets() -> None:
    """A TCP handshake from a host with a 60 ms link to an unshaped one takes 60 ms (its SYN waits)."""
    with Testbed("tdelay") as bed:
        if not bed.netem and not (shutil.which("iptables-legacy") or shutil.which("iptables")):
            pytest.skip("no sch_netem and no iptables for the user-space delay (launch/setup.sh installs it)")
        bed.add_public("a", Link.parse("1gbit:60ms"))
        far = bed.add_public("b")
        server = _start(far.prefix, LISTEN)
        try:
            out = bed.hosts["a"].run(sys.executable, "-c", RTT, far.ip).stdout
        finally:
            server.kill()
            server.wait()
        assert 0.055 <= float(out) <= 0.3, f"handshake took {float(out) * 1000:.0f} ms on a 60 ms link"


def test_nat_lets_connections_out_and_none_in() -> None:
    if nat_unavailable():
        pytest.skip(f"no NAT here: {nat_unavailable()}")
    with Testbed("tnat") as bed:
        pub = bed.add_public("pub")
        home = bed.add_nat("home")
        assert home.ip != home.public_ip
        server = _start(pub.prefix, LISTEN)
        try:
            assert _connect(bed, "home", pub.ip, 5202) == "connected"
        finally:
            server.kill()
            server.wait()
        server = _start(home.prefix, LISTEN)
        try:
            for ip in (home.ip, home.public_ip):  # neither its own address nor the router's lets anyone in
                assert _connect(bed, "pub", ip, 5202).startswith("failed"), ip
        finally:
            server.kill()
            server.wait()


def test_cleanup_sweeps_leftovers() -> None:
    bed = Testbed("tgone")
    bed.start()
    bed.add_public("x")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "swtgone-x" in names and "swtgone-hub" in names
    # as after a crash: a new testbed with the same tag starts clean
    again = Testbed("tgone")
    again.start()
    try:
        again.add_public("x")
    finally:
        again.close()
    bed.close()
    time.sleep(0.1)
    assert "swtgone-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cleanup("tgone") == 0
