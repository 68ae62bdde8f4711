"""A simulated internet on one machine: each host in its own Linux network namespace, shaped links.

Topology (all names start with `sw<tag>-`, so `cleanup(tag)` finds whatever a crashed run left):

    hub namespace: bridge "br0" ── veth ── public host  10.77.0.N   (eth0, shaped)
                                 └─ veth ── router      10.77.0.M   (wan0) ── masquerade ── home host 192.168.K.2
                                                                    (lan0 192.168.K.1)             (eth0, shaped)

A public host is reachable by every other host. A NAT'd host sits in a home namespace behind its own
router namespace doing source NAT (nftables `masquerade` on the router's public side, no port
forwarding): it reaches every public host, and nothing can connect in. Hole punching needs a
libp2p with DCUtR; hivemind's p2pd has no switch for it, so there is no hole-punching topology.

A link's `rate` is applied both ways (the host's egress and, on the hub side, its ingress); its
`delay` and `loss` on the host's egress only, so two hosts with 50 ms links see about 100 ms of
round-trip time, like two home lines 50 ms from an exchange point. Shaping is tc netem where the
kernel has it. Without sch_netem (some VM kernels) the rate is a token bucket (tc tbf), loss an
nftables random drop, and delay a user-space hold of each outgoing packet (launch/netdelay.py over
an iptables NFQUEUE, one small process per delayed host, killed with the testbed).

Needs root (CAP_NET_ADMIN), iproute2, nftables for NAT'd hosts and, without netem, iptables for
delays; `unavailable()` says why not.
Processes run inside a host with `host.prefix + [command...]` (`ip netns exec NAME`), which
LocalCluster takes as a command prefix. Inside `with`, SIGTERM unwinds the block as Ctrl+C does, so
the namespaces and delayers go then too (the next start would sweep them otherwise). Usage:

    with Testbed("t1") as bed:
        a = bed.add_public("a", Link.parse("20mbit:50ms"))
        b = bed.add_nat("b", Link.parse("20mbit:50ms"))
        subprocess.run(b.prefix + ["ping", "-c1", a.ip])
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from launch.cluster import ClosedOnSigterm

PUBLIC_NET = "10.77"  # 10.77.0.0/16: the "internet" between hosts and routers
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|us)$")
_LIVE: weakref.WeakSet[Testbed] = weakref.WeakSet()


class TestbedError(RuntimeError):
    """A namespace, link or rule could not be set up."""


@dataclass(frozen=True)
class Link:
    """A host's access link: `rate` like "20mbit", one-way `delay` like "50ms", `loss_pct` in percent."""

    rate: str
    delay: str = "0ms"
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if not _RATE.match(self.rate):
            raise ValueError(f"link rate {self.rate!r}: expected a number and bit/kbit/mbit/gbit, e.g. 20mbit")
        if not _TIME.match(self.delay):
            raise ValueError(f"link delay {self.delay!r}: expected a number and ms/s/us, e.g. 50ms")
        if not 0 <= self.loss_pct < 100:
            raise ValueError(f"link loss must be in [0, 100) percent, got {self.loss_pct}")

    @classmethod
    def parse(cls, text: str) -> Link:
        """'RATE:DELAY[:LOSS]', e.g. '20mbit:50ms' or '10mbit:80ms:0.5%'."""
        parts = text.strip().split(":")
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"link {text!r}: expected RATE[:DELAY[:LOSS]], e.g. 20mbit:50ms")
        loss = float(parts[2].rstrip("%")) if len(parts) > 2 else 0.0
        return cls(parts[0], parts[1] if len(parts) > 1 else "0ms", loss)

    @property
    def rate_bits_s(self) -> float:
        match = _RATE.match(self.rate)
        assert match
        return float(match.group(1)) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match.group(2)]

    @property
    def delay_s(self) -> float:
        match = _TIME.match(self.delay)
        assert match
        return float(match.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[match.group(2)]

    def netem(self, *, egress: bool) -> list[str]:
        """tc netem arguments: rate both ways, delay and loss on the host's egress."""
        args = ["netem", "rate", self.rate]
        if egress:
            args += ["delay", self.delay]
            if self.loss_pct:
                args += ["loss", f"{self.loss_pct}%"]
        # netem's default queue (1000 packets) drops bursts at low rates with long delays; a queue of
        # several bandwidth-delay products keeps TCP's behaviour that of a real line.
        return [*args, "limit", "10000"]

    def tbf(self) -> list[str]:
        """tc tbf arguments for the rate alone: a bucket of 10 ms of traffic (at least 3 full-size
        packets, so a line is never slower than its rate) and a queue of up to 200 ms."""
        burst = max(4500, int(self.rate_bits_s / 8 * 0.01))
        return ["tbf", "rate", self.rate, "burst", str(burst), "latency", "200ms"]


@dataclass
class Host:
    name: str
    netns: str
    ip: str  # the address this host listens on (its own; behind NAT a private one)
    public_ip: str  # the address the others see it connect from
    nat: bool
    link: Link | None

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(self.prefix + list(cmd), check=check)

    def interface_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes received) on this host's link so far, as the kernel counts them."""
        out = self.run("cat", "/sys/class/net/eth0/statistics/tx_bytes", "/sys/class/net/eth0/statistics/rx_bytes")
        sent, received = out.stdout.split()
        return int(sent), int(received)


@dataclass
class Placement:
    """Where a LocalCluster's processes run: keyword arguments for LocalCluster (`coordinator`) and
    for each add_peer call (`peers`), and the testbed hosts behind them (empty on loopback)."""

    coordinator: dict = field(default_factory=dict)
    peers: list[dict] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)
    note: str = "loopback, unlimited"

    def peer(self, i: int) -> dict:
        return self.peers[i] if i < len(self.peers) else {}


@contextmanager
def placement(
    link: str | None, num_peers: int, *, nat_peers: int = 0, tag: str = "bench", shaped_peers: Sequence[int] | None = None
) -> Iterator[Placement]:
    """Every process on loopback (link None), or each in its own testbed host with this link
    ('RATE:DELAY[:LOSS]'), the coordinator included; the last `nat_peers` peers behind NAT.
    `shaped_peers`: only these peers behind the link, the coordinator and the others unshaped."""
    if link is None and not nat_peers:
        yield Placement()
        return
    shaped = Link.parse(link) if link else None
    why = nat_unavailable() if nat_peers else unavailable()
    if why:
        raise TestbedError(f"a shaped or NAT'd swarm needs network namespaces: {why}")
    with Testbed(tag) as bed:
        coord = bed.add_public("coord", shaped if shaped_peers is None else None)
        place = Placement(coordinator={"coordinator_host": coord.ip, "coordinator_prefix": coord.prefix}, hosts={"coord": coord})
        for i in range(num_peers):
            nat = i >= num_peers - nat_peers
            behind = shaped if shaped_peers is None or i in shaped_peers else None
            host = (bed.add_nat if nat else bed.add_public)(f"{'n' if nat else 'p'}{i}", behind)
            place.hosts[host.name] = host
            place.peers.append({"host": host.ip, "prefix": host.prefix})
        place.note = f"every process behind its own {link} link" if link else "unshaped namespaces"
        if link and shaped_peers is not None:
            place.note = f"peers {', '.join(map(str, shaped_peers))} behind their own {link} link, the others unshaped"
        if shaped and shaped.delay_s and not bed.netem:
            place.note += " (no sch_netem here: rate by tbf, delay by launch/netdelay.py)"
        if nat_peers:
            place.note += f", {nat_peers} of {num_peers} peers behind NAT"
        yield place


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None if they can): not root, no `ip`/`tc`, or refused."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2: bash launch/setup.sh does it)"
    probe = f"swprobe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


def nat_unavailable() -> str | None:
    """Why NAT'd hosts cannot be made here (None if they can)."""
    return unavailable() or (None if shutil.which("nft") else "`nft` not found (install nftables: launch/setup.sh does it)")


def cleanup(tag: str) -> int:
    """Delete every namespace of the testbed `tag` (their veths go with them); returns how many.

    Safe to call any time, also when nothing exists: a crashed run's leftovers go the next time
    a testbed with the same tag starts."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.split() and line.split()[0].startswith(f"sw{tag}-")]
    for name in names:
        # processes a crashed run left inside (packet delayers, peers): the namespace would outlive
        # its name while they hold it
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return len(names)


class Testbed(ClosedOnSigterm):
    __test__ = False  # not a pytest test class despite its name

    def __init__(self, tag: str):
        """`tag`: a short name (letters and digits, at most 6) that keeps concurrent testbeds apart."""
        if not re.fullmatch(r"[a-z0-9]{1,6}", tag):
            raise ValueError(f"testbed tag {tag!r}: 1-6 lower-case letters or digits")
        self.tag = tag
        self.hub = f"sw{tag}-hub"
        self.hosts: dict[str, Host] = {}
        self._next_ip = 2
        self._next_home = 1
        self._started = False
        self._netem: bool | None = None
        self._delayers: list[subprocess.Popen] = []

    def open(self) -> None:
        self.start()

    def start(self) -> None:
        cleanup(self.tag)  # whatever a crashed earlier run left behind
        _LIVE.add(self)
        self._started = True
        self._netns(self.hub)
        self._in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.hub, "ip", "link", "set", "br0", "up")
        if not self.netem:  # bridged packets pass iptables, where launch/netdelay.py delays them
            self._in(self.hub, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1")

    def close(self) -> None:
        for proc in self._delayers:
            proc.kill()
            proc.wait()
        self._delayers.clear()
        if self._started:
            cleanup(self.tag)
            self._started = False
        _LIVE.discard(self)

    def add_public(self, name: str, link: Link | None = None) -> Host:
        """A host with a public address on the bridge, its link shaped as given (None: unshaped)."""
        ns = self._host_netns(name)
        ip = self._take_ip()
        self._plug(ns, "eth0", ip, link)
        self._in(ns, "ip", "route", "add", "default", "dev", "eth0")
        host = Host(name, ns, ip, ip, False, link)
        self.hosts[name] = host
        return host

    def add_nat(self, name: str, link: Link | None = None) -> Host:
        """A host in a home network behind its own NAT router: it dials out, nobody dials in."""
        if shutil.which("nft") is None:
            raise TestbedError("NAT'd hosts need nftables (`nft`); bash launch/setup.sh installs it")
        home = self._host_netns(name)
        router = f"sw{self.tag}-r{self._next_home}"
        subnet = f"192.168.{self._next_home}"
        self._next_home += 1
        wan_ip = self._take_ip()
        self._netns(router)
        self._plug(router, "wan0", wan_ip, None)
        self._in(router, "ip", "route", "add", "default", "dev", "wan0")
        self._in(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # the home side: a veth pair router(lan0) <-> home(eth0), shaped at the home end
        self._in(router, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", home)
        self._in(router, "ip", "addr", "add", f"{subnet}.1/24", "dev", "lan0")
        self._in(router, "ip", "link", "set", "lan0", "up")
        self._in(home, "ip", "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        self._in(home, "ip", "link", "set", "eth0", "up")
        self._in(home, "ip", "route", "add", "default", "via", f"{subnet}.1")
        if link is not None:
            self._shape(home, "eth0", link, egress=True)
            self._shape(router, "lan0", link, egress=False)
            self._delay(router, ["-i", "lan0"], link)
        rules = (
            "table ip nat {\n"
            '  chain outbound { type nat hook postrouting priority 100; oifname "wan0" masquerade; }\n'
            "}\n"
            "table ip filter {\n"
            "  chain inbound { type filter hook forward priority 0; policy drop;\n"
            '    iifname "lan0" accept\n'
            "    ct state established,related accept\n"
            "  }\n"
            "}\n"
        )
        _run(["ip", "netns", "exec", router, "nft", "-f", "-"], input_text=rules)
        host = Host(name, home, f"{subnet}.2", wan_ip, True, link)
        self.hosts[name] = host
        return host

    # plumbing
    def _host_netns(self, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_]{1,12}", name) or name in self.hosts:
            raise ValueError(f"host name {name!r}: 1-12 letters, digits or _, unique in the testbed")
        ns = f"sw{self.tag}-{name}"
        self._netns(ns)
        return ns

    def _take_ip(self) -> str:
        n = self._next_ip
        self._next_ip += 1
        if n > 250 * 250:
            raise TestbedError("testbed is full")
        return f"{PUBLIC_NET}.{n // 250}.{n % 250}"

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._in(name, "ip", "link", "set", "lo", "up")

    def _plug(self, ns: str, dev: str, ip: str, link: Link | None) -> None:
        """A veth pair from `ns` (named dev, holding ip/16) to the hub's bridge, shaped both ways."""
        hub_end = f"v{self._next_ip}-{dev}"[:15]
        self._in(self.hub, "ip", "link", "add", hub_end, "type", "veth", "peer", "name", dev, "netns", ns)
        self._in(self.hub, "ip", "link", "set", hub_end, "master", "br0")
        self._in(self.hub, "ip", "link", "set", hub_end, "up")
        self._in(ns, "ip", "addr", "add", f"{ip}/16", "dev", dev)
        self._in(ns, "ip", "link", "set", dev, "up")
        if link is not None:
            self._shape(ns, dev, link, egress=True)
            self._shape(self.hub, hub_end, link, egress=False)
            self._delay(self.hub, ["-m", "physdev", "--physdev-in", hub_end], link)

    @property
    def netem(self) -> bool:
        """Whether the kernel has sch_netem (else: tbf, nftables loss and user-space delay)."""
        if self._netem is None:
            self._netem = _probe_netem(self.hub)
        return self._netem

    def _shape(self, ns: str, dev: str, link: Link, *, egress: bool) -> None:
        if self.netem:
            self._in(ns, "tc", "qdisc", "replace", "dev", dev, "root", *link.netem(egress=egress))
            return
        self._in(ns, "tc", "qdisc", "replace", "dev", dev, "root", *link.tbf())
        if egress and link.loss_pct:
            if shutil.which("nft") is None:
                raise TestbedError("packet loss without sch_netem needs nftables (`nft`)")
            per_10k = round(link.loss_pct * 100)
            rules = (
                "table inet shape {\n"
                f'  chain out {{ type filter hook postrouting priority 0; oifname "{dev}" numgen random mod 10000 < {per_10k} drop; }}\n'
                "}\n"
            )
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=rules)

    def _delay(self, ns: str, match: list[str], link: Link | None) -> None:
        """Without netem: hold a host's outgoing packets for its link's delay where they are forwarded
        (`match` picks them in namespace `ns`, the hub or the host's router). Not in the host's own
        namespace: there the held packets would still count against TCP's small-queue budget, and a
        socket would send a few packets per delay instead of filling the line."""
        if link is None or link.delay_s <= 0 or self.netem:
            return
        iptables = shutil.which("iptables-legacy") or shutil.which("iptables")
        if iptables is None:
            raise TestbedError("link delays without sch_netem need iptables (bash launch/setup.sh installs it)")
        queue = str(len(self._delayers))
        rule = ["-t", "mangle", "-A", "FORWARD", *match, "-j", "NFQUEUE", "--queue-num", queue, "--queue-bypass"]
        self._in(ns, iptables, *rule)
        netdelay = str(Path(__file__).with_name("netdelay.py"))
        cmd = ["ip", "netns", "exec", ns, sys.executable, netdelay, queue, str(link.delay_s * 1000)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self._delayers.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise TestbedError(f"the packet delayer in {ns} did not start")

    def _in(self, ns: str, *cmd: str) -> None:
        _run(["ip", "netns", "exec", ns, *cmd])


def _probe_netem(ns: str) -> bool:
    made = _run(["ip", "netns", "exec", ns, "ip", "link", "add", "probe0", "type", "dummy"], check=False)
    if made.returncode != 0:
        return False
    try:
        return (
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "probe0", "root", "netem"], check=False).returncode == 0
        )
    finally:
        _run(["ip", "netns", "exec", ns, "ip", "link", "del", "probe0"], check=False)


def _run(cmd: list[str], *, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, input=input_text)
    if check and result.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@atexit.register
def _close_forgotten() -> None:
    for bed in list(_LIVE):
        bed.close()
