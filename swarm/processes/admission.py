"""Who the coordinator admits: the run's admission policy (`RunConfig.admission`) decided per peer.

The decision (`AdmissionGate.decide`) is a pure function of what the coordinator knows: the peer's
id (its DHT signing key), the invite proof and addresses of its signed `Capacity` announcement, the
clock, and what the gate admitted before. It returns the reason of a refusal. Files and the DHT stay
at the edges (`load_gate`, `save_uses`, `coordinator_refusal`).

Invite tokens. The coordinator keeps a 32-byte secret S in `<state_dir>/invite.key`, never in a
record. A token is a bearer secret, one per invitee:

    token    = id "." hex(HMAC-SHA256(S, "swarm-invite/1 " + id))     id: 16 random hex digits

It is bound to nothing its holder cannot choose (any identity may spend it). Spending it never
shows it: the peer publishes, in its signed Capacity record,

    proof    = id "." hex(HMAC-SHA256(token, "swarm-invite-proof/1 " + run_id + " " + peer_id))

and the coordinator recomputes the token from S and the id, then the proof for the record's signer.
Anyone reading the DHT learns the token id and a MAC for that one peer id, which admits no other
identity (the record is signed, and a proof for another peer id needs the token). A token admits at
most `invite_uses` identities; the coordinator records who spent which token in
`<state_dir>/invites.json`, so a restarted coordinator keeps counting, and an identity that spent a
token is admitted again whenever it returns. Replacing invite.key voids every token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import os
import re
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.net.records import EventLog, run_key
from swarm.run import AdmissionConfig, RunConfig

if TYPE_CHECKING:
    from swarm.net.records import Event
    from swarm.node import SwarmNode

INVITE_KEY_FILE = "invite.key"
INVITES_USED_FILE = "invites.json"
REFUSED_EVENT = "refused"  # kind of the coordinator's event that tells a peer why (text: "<peer id>: <reason>")
WINDOW_S = 3600.0  # per_prefix_per_hour counts admissions over the last hour
NO_ADDRESS = "peers that announce no address"  # the one bucket of peers without an IP address
_TOKEN = re.compile(r"^([0-9a-f]{16})\.([0-9a-f]{64})$")  # proofs have the same shape


@dataclass(frozen=True)
class Decision:
    reason: str | None = None  # None: admitted
    spent: str = ""  # the invite token id this admission spent a use of (to be saved)

    @property
    def admitted(self) -> bool:
        return self.reason is None


class AdmissionRefused(RuntimeError):
    """This peer is not admitted to the run; the message says why and what to do."""


# ----- invite tokens --------------------------------------------------------------------------


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def mint_token(secret: bytes, token_id: str | None = None) -> str:
    token_id = token_id or secrets.token_hex(8)
    return f"{token_id}.{_mac(secret, f'swarm-invite/1 {token_id}')}"


def check_token(token: str) -> str:
    """The token as given, or ValueError for anything that cannot be one (a typo, a cut-off paste)."""
    if not _TOKEN.match(token):
        raise ValueError("an invite token is 16 hex digits, a dot and 64 hex digits (from swarm-coordinator invite)")
    return token


def invite_proof(token: str, run_id: str, peer_id: str) -> str:
    """What a peer holding `token` publishes to be admitted as `peer_id`: useless to any other id."""
    token_id, _, _ = check_token(token).partition(".")
    return f"{token_id}.{_mac(token.encode(), f'swarm-invite-proof/1 {run_id} {peer_id}')}"


def verify_proof(secret: bytes, proof: str, run_id: str, peer_id: str) -> str | None:
    """The id of the token behind a valid proof for `peer_id`, or None."""
    match = _TOKEN.match(proof)
    if match is None or not secret:
        return None
    token = mint_token(secret, match.group(1))
    return match.group(1) if hmac.compare_digest(invite_proof(token, run_id, peer_id), proof) else None


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


# ----- network prefixes -----------------------------------------------------------------------


def network_prefixes(addrs: Iterable[str]) -> frozenset[str]:
    """The /24 (IPv4) or /48 (IPv6) networks of the IP addresses in these multiaddrs, from the most
    telling kind present: global, else private (a LAN run), else loopback (one machine). Relayed
    addresses (p2p-circuit) name the relay, not the peer, and are skipped; with no address left the
    peer falls in one shared bucket, so announcing nothing does not escape the limit."""
    found: dict[str, set[str]] = {"global": set(), "private": set(), "loopback": set()}
    for addr in addrs:
        parts = addr.split("/")
        if "p2p-circuit" in parts:
            continue
        for proto, value in itertools.pairwise(parts):
            if proto not in ("ip4", "ip6"):
                continue
            try:
                ip = ipaddress.ip_address(value.split("%")[0])
            except ValueError:
                continue
            if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
                continue
            kind = "loopback" if ip.is_loopback else "global" if ip.is_global else "private"
            found[kind].add(str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False)))
    for kind in ("global", "private", "loopback"):
        if found[kind]:
            return frozenset(found[kind])
    return frozenset({NO_ADDRESS})


@dataclass
class PrefixLimiter:
    """New identities admitted per network prefix over a sliding hour."""

    per_hour: int
    recent: dict[str, deque[float]] = field(default_factory=dict)  # prefix -> admission times, oldest first

    def full(self, prefixes: Iterable[str], now: float) -> str | None:
        """A prefix that has had its hour's admissions already, or None."""
        for prefix in sorted(prefixes):
            times = self.recent.get(prefix)
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
            if times is not None and not times:
                del self.recent[prefix]
            elif times is not None and len(times) >= self.per_hour:
                return prefix
        return None

    def charge(self, prefixes: Iterable[str], now: float) -> None:
        for prefix in prefixes:
            self.recent.setdefault(prefix, deque()).append(now)


# ----- the decision ---------------------------------------------------------------------------


class AdmissionGate:
    """The coordinator's admission decisions under one run's policy (no I/O: see load_gate)."""

    def __init__(self, cfg: AdmissionConfig, run_id: str, *, secret: bytes = b"", uses: dict[str, list[str]] | None = None):
        """secret: the invite key (invite policy); uses: token id -> the peer ids that spent it."""
        if cfg.policy == "invite" and not secret:
            raise ValueError("the invite policy needs the coordinator's invite secret")
        self.cfg, self.run_id, self.secret = cfg, run_id, secret
        self.allow = frozenset(cfg.allow)
        self.uses: dict[str, list[str]] = uses if uses is not None else {}
        self.limiter = PrefixLimiter(cfg.per_prefix_per_hour)

    def decide(self, peer: str, *, invite: str, addrs: Iterable[str], now: float, known: bool) -> Decision:
        """Admit `peer` or say why not. `known`: it holds a role we signed before (a restart): not a
        new identity, so it does not count against the prefix limit. Admitting records what it spends."""
        if self.cfg.policy == "allow-list" and peer not in self.allow:
            return Decision("not on the run's allow-list")
        spent = ""
        if self.cfg.policy == "invite":
            token_id = verify_proof(self.secret, invite, self.run_id, peer)
            if token_id is None:
                return Decision("invite token missing or invalid")
            holders = self.uses.get(token_id, [])
            if peer not in holders:
                if len(holders) >= self.cfg.invite_uses:
                    return Decision(f"invite token {token_id} was spent already ({len(holders)} of {self.cfg.invite_uses} uses)")
                spent = token_id
        if self.cfg.per_prefix_per_hour and not known:
            prefixes = network_prefixes(addrs)
            full = self.limiter.full(prefixes, now)
            if full is not None:
                return Decision(f"too many new identities from {full} this hour (limit {self.cfg.per_prefix_per_hour})")
            self.limiter.charge(prefixes, now)
        if spent:
            self.uses.setdefault(spent, []).append(peer)
        return Decision(spent=spent)


def load_gate(run: RunConfig, state_dir: str | Path) -> AdmissionGate:
    """The gate of a coordinator whose invite key and spent tokens live in `state_dir`."""
    if run.admission.policy != "invite":
        return AdmissionGate(run.admission, run.run_id)
    path = Path(state_dir) / INVITES_USED_FILE
    uses = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(uses, dict) or not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in uses.values()):
        raise ValueError(f"{path} is not a map of token ids to peer ids")
    return AdmissionGate(run.admission, run.run_id, secret=load_secret(state_dir), uses=uses)


def save_uses(state_dir: str | Path, uses: dict[str, list[str]]) -> None:
    path = Path(state_dir) / INVITES_USED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(uses, indent=1, sort_keys=True))
    tmp.replace(path)  # never half a file: a token must not come back unspent after a crash


def load_secret(state_dir: str | Path) -> bytes:
    """The coordinator's invite secret, made (readable by its owner only) the first time."""
    path = Path(state_dir) / INVITE_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{INVITE_KEY_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_secret().hex() + "\n")
        try:  # whole or not at all, and the first one made wins (a coordinator starting, an invite command)
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = bytes.fromhex(path.read_text().strip())
    if len(secret) < 16:
        raise ValueError(f"{path} does not hold an invite secret")
    return secret


# ----- the peer's side ------------------------------------------------------------------------


def refusal_before_joining(cfg: AdmissionConfig, peer_id: str, *, invited: bool) -> str | None:
    """What a joining peer can tell from the public run description alone, before it announces itself."""
    if cfg.policy == "allow-list" and peer_id not in cfg.allow:
        return (
            f"this run admits only the peers on its allow-list, and this peer ({peer_id}) is not on it: "
            f"send this id to the run's operator (swarm-coordinator --allow {peer_id}) "
            "and join again with the same --identity FILE (without it, every start is a new id)"
        )
    if cfg.policy == "invite" and not invited:
        return "this run admits only peers with an invite token: join with --invite TOKEN (the operator makes them with swarm-coordinator invite)"
    return None


def refusal_in(events: list[Event], peer_id: str, since: float) -> str | None:
    """The reason of the coordinator's latest refusal of `peer_id` logged at `since` or later."""
    prefix = f"{peer_id}: "
    for event in reversed(events):
        if event.kind == REFUSED_EVENT and event.text.startswith(prefix) and event.time >= since:
            return event.text[len(prefix) :]
    return None


async def coordinator_refusal(node: SwarmNode, since: float) -> str | None:
    """Why the coordinator refused this node, if its signed event log says so."""
    item = await node.dht.get_from(run_key(node.run.run_id, "events"), EventLog, node.run.coordinator)
    return refusal_in(item.record.events, node.peer_id, since) if item is not None else None


def refusal_message(cfg: AdmissionConfig, reason: str | None) -> str:
    """What join-swarm says when the coordinator refused it (reason: the coordinator's, if known)."""
    if reason is None:
        limit = f", at most {cfg.per_prefix_per_hour} new identities per network an hour" if cfg.per_prefix_per_hour else ""
        reason = f"the coordinator is live but gave this peer no role (admission policy: {cfg.policy}{limit})"
    if reason.startswith("too many new identities"):
        hint = "try again in an hour"
    elif cfg.policy == "allow-list":
        hint = "ask the run's operator to add this peer id"
    elif cfg.policy == "invite":
        hint = "ask the run's operator for a new invite token (swarm-coordinator invite)"
    else:
        hint = "try again later"
    return f"the coordinator did not admit this peer: {reason}; {hint}"
