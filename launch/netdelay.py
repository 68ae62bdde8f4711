"""Packet delay without sch_netem: hold each outgoing packet for a fixed time in user space.

Some kernels (VM guests among them) ship without tc's netem. There the testbed sends a host's
outgoing packets to an NFQUEUE (iptables-legacy, `--queue-bypass`: if this process dies packets
flow undelayed) and this program, run inside the host's namespace, gives each packet its ACCEPT
verdict `delay` after it arrived. Only packet metadata crosses to user space (copy mode META), and
verdicts go out in arrival order, so the link keeps its order, as a wire does.

    ip netns exec NS python -m launch.netdelay QUEUE_NUM DELAY_MS

Raw netfilter-queue netlink (linux/netfilter/nfnetlink_queue.h), no library needed.
"""

from __future__ import annotations

import collections
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
QUEUE_PACKETS = 65536  # packets held at once (the kernel's default, 1024, drops at 100 ms x 100 Mbit/s)
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian queue number)
_ATTR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, family: int = socket.AF_UNSPEC) -> bytes:
    body = _NFGEN.pack(family, 0, socket.htons(queue)) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, NLM_F_REQUEST, 0, 0) + body


def _packet_ids(data: bytes) -> list[int]:
    """The packet ids of every queued-packet message in one netlink read."""
    ids, offset = [], 0
    while offset + _NLMSG.size <= len(data):
        length, msg_type, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        if msg_type & 0xFF == NFQNL_MSG_PACKET and msg_type >> 8 == NFNL_SUBSYS_QUEUE:
            pos, end = offset + _NLMSG.size + _NFGEN.size, offset + length
            while pos + _ATTR.size <= end:
                alen, akind = _ATTR.unpack_from(data, pos)
                if alen < _ATTR.size:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, pos + _ATTR.size)[0])
                    break
                pos += (alen + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def run(queue: int, delay_s: float) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root): above rmem_max
    sock.bind((0, 0))
    bind = _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, bind, socket.AF_INET))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_META))))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_PACKETS))))
    print("ready", flush=True)
    held: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        # wait for packets until the oldest held one is due (at least 0.1 ms: 0 would not block)
        sock.settimeout(max(1e-4, held[0][0] - time.monotonic()) if held else None)
        try:
            data = sock.recv(1 << 16)
            due = time.monotonic() + delay_s
            held.extend((due, pid) for pid in _packet_ids(data))
        except (TimeoutError, BlockingIOError):
            pass
        except OSError as e:  # ENOBUFS: the kernel dropped queue messages; those packets are lost, like a full line
            if e.errno != 105:
                raise
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, pid = held.popleft()
            sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m launch.netdelay QUEUE_NUM DELAY_MS")
    run(int(sys.argv[1]), float(sys.argv[2]) / 1000)
