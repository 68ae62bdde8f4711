"""Serving and downloading the global state, so a joiner (or a diverged peer) catches up.

A joiner asks a donor for the state index (round, state hash, per-tensor sha256), checks that the
hash is the one most live peers report for that round, then splits the tensors across every donor
holding the same round and hash and fetches from all of them at once, so many joiners don't choke
one peer. Every tensor is checked against the index and the whole against the state hash.
Wire layout: docs/wire-format.md, "State transfer".
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from swarm.log import get_logger
from swarm.net.records import Heartbeat
from swarm.net.transfer import Traffic, TransferError, fetch
from swarm.state import (
    MOMENTUM_PREFIX,
    GlobalState,
    PartialStateError,
    StateError,
    StateIndex,
    TensorInfo,
    all_tensors,
    build_index,
    parse_index,
    split_chunk,
)

if TYPE_CHECKING:
    from hivemind.p2p import P2P

    from swarm.net.transfer import TransferServer
    from swarm.node import SwarmNode
    from swarm.round.agreement import RoundAgreement

logger = get_logger(__name__)
RELOAD_DEADLINE_S = 600.0  # a diverged node that cannot get the agreed state in this long stops
MAX_STATE_READERS = 4  # state answers in flight at once (each until its last byte); the rest wait their turn


def pick_donors(beats: list[Heartbeat], exclude: str) -> tuple[int, str, list[str]] | None:
    """(round, hash, donors) of the state the most live peers hold (the newest among equals).

    Votes come first: one peer announcing a far-future round with its own hash must not decide
    what every joiner downloads.
    """
    holders = [b for b in beats if b.param_hash and b.round >= 0 and b.peer_id != exclude and b.phase != "joining"]
    if not holders:
        return None
    votes = Counter((b.round, b.param_hash) for b in holders)
    (round_no, state_hash), _ = max(votes.items(), key=lambda kv: (kv[1], kv[0][0]))
    donors = [b.peer_id for b in holders if (b.round, b.param_hash) == (round_no, state_hash)]
    reachable = {b.peer_id for b in holders if b.reachable}  # a NAT'd donor only if nobody else has it
    donors = [d for d in donors if d in reachable] or donors
    return round_no, state_hash, donors


async def download_state(
    p2p: P2P,
    donors: list[str],
    *,
    expected_hash: str,
    traffic: Traffic,
    timeout_s: float = 120.0,
    max_bytes: int = 2**34,
    names: Collection[str] | None = None,
) -> GlobalState:
    """Fetch the state with the given hash from several donors in parallel; verify everything.

    `names`: only these parameters (and their momentum), for a node that holds part of θ; the
    result is a partial state (`GlobalState.part`) that knows the other tensors' leaves, so its hash
    is the agreed one. Donors may hold parts: each tensor is asked of the donors whose index says
    they hold it.

    `timeout_s` is each part's fixed allowance; its body then has as long as it takes at the rate
    floor (swarm/net/transfer.py), so a big state downloads over a slow link, while a donor that
    stalls or trickles is dropped for the next one."""
    indexes = await asyncio.gather(*(_index_of(p2p, donor, expected_hash, traffic) for donor in donors))
    holding = {donor: index for donor, index in zip(donors, indexes) if index is not None}
    if not holding:
        raise StateError("no donor offered the agreed state")
    # Every index hashes to the agreed root, so all list the same leaves; the shapes are not in the
    # root, and a donor could list false ones (every honest chunk would then fail its leaf check):
    # take the listing most donors agree on.
    listing = {d: tuple((t.name, t.shape) for t in i.tensors) for d, i in holding.items()}
    agreed = Counter(listing.values()).most_common(1)[0][0]
    holding = {d: i for d, i in holding.items() if listing[d] == agreed}
    index = next(iter(holding.values()))
    wanted = [t for t in index.tensors if names is None or _param_name(t.name) in names]
    if names is not None and (unknown := set(names) - {_param_name(t.name) for t in index.tensors}):
        raise StateError(f"the agreed state has no tensor {sorted(unknown)[0]!r}")
    holders = {t.name: [d for d, i in holding.items() if i.held(t.name)] for t in wanted}
    if unheld := [n for n, h in holders.items() if not h]:
        raise StateError(f"no donor holds {len(unheld)} of the tensors asked for, e.g. {unheld[0]!r}")
    jobs = _assign(wanted, holders)
    fetches = [asyncio.ensure_future(_fetch_part(p2p, order, part, index, traffic, timeout_s, max_bytes)) for order, part in jobs]
    try:
        results = await asyncio.gather(*fetches)
    finally:  # one part failed (or we were cancelled): the others' transfers stop using the link now
        for task in fetches:
            task.cancel()
    tensors: dict[str, torch.Tensor] = {}
    for chunk in results:
        tensors.update(chunk)
    params = {n: t for n, t in sorted(tensors.items()) if not n.startswith(MOMENTUM_PREFIX)}
    momentum = {n[len(MOMENTUM_PREFIX) :]: t for n, t in sorted(tensors.items()) if n.startswith(MOMENTUM_PREFIX)}
    state = GlobalState(round=index.round, params=params, momentum=momentum, partial=names is not None)
    if names is not None:
        try:
            state.adopt(index.round, index.leaves())
        except ValueError as e:
            raise StateError(f"downloaded part does not match the agreed state: {e}") from None
    if state.hash != expected_hash:
        raise StateError("downloaded state does not match the agreed hash")
    return state


def _param_name(name: str) -> str:
    return name[len(MOMENTUM_PREFIX) :] if name.startswith(MOMENTUM_PREFIX) else name


async def _index_of(p2p: P2P, donor: str, expected_hash: str, traffic: Traffic) -> StateIndex | None:
    try:
        raw = await fetch(p2p, donor, {"kind": "state-index"}, max_bytes=2**24, timeout_s=30, traffic=traffic)
        index = parse_index(raw) if raw is not None else None
    except (TransferError, StateError) as e:
        logger.info("state index from %s failed: %s", donor[-8:], e)
        return None
    return index if index is not None and index.hash == expected_hash else None


def _assign(wanted: list[TensorInfo], holders: dict[str, list[str]]) -> list[tuple[list[str], list[TensorInfo]]]:
    """Jobs of (donors to try in order, tensors): the tensors that the same donors hold are cut into
    one contiguous run per donor of about equal bytes (a donor serves a contiguous run straight from
    its snapshot, without copying); each run falls back to the others holding it."""
    groups: dict[tuple[str, ...], list[TensorInfo]] = {}
    for info in wanted:
        groups.setdefault(tuple(holders[info.name]), []).append(info)
    jobs = []
    for donors, infos in groups.items():
        for i, part in enumerate(_split_work(infos, len(donors))):
            jobs.append((list(donors[i:] + donors[:i]), part))
    return jobs


def _split_work(infos: list[TensorInfo], num_donors: int) -> list[list[TensorInfo]]:
    """Cut the index into one contiguous run of tensors per donor, of about equal bytes."""
    sizes = [i.nbytes for i in infos]
    target = sum(sizes) / max(1, num_donors)
    parts: list[list[TensorInfo]] = [[]]
    filled = 0
    for info, size in zip(infos, sizes):
        if parts[-1] and filled + size / 2 > target * len(parts) and len(parts) < num_donors:
            parts.append([])
        parts[-1].append(info)
        filled += size
    return [p for p in parts if p]


async def _fetch_part(
    p2p: P2P,
    order: list[str],
    part: list[TensorInfo],
    index: StateIndex,
    traffic: Traffic,
    timeout_s: float,
    max_bytes: int,
) -> dict[str, torch.Tensor]:
    """Fetch one part from the first donor in `order` that delivers it whole and correct."""
    request = {"kind": "state", "round": index.round, "names": [i.name for i in part]}
    expected = sum(i.nbytes for i in part)  # a bigger answer is refused unread
    for donor in order:
        try:
            raw = await fetch(p2p, donor, request, max_bytes=min(max_bytes, expected), timeout_s=timeout_s, traffic=traffic)
            if raw is not None:
                return split_chunk(raw, part)
        except Exception as e:  # a hostile or broken donor: try the next one
            logger.info("state part from %s failed: %s", donor[-8:], e)
    raise StateError(f"no donor could provide {len(part)} tensors of round {index.round}")


class StateSnapshot:
    """The state of one round as read-only bytes, one buffer per tensor, built once per round (of a
    partial holder: the tensors it holds, with the index of them all).

    Requests are answered from it without the round lock and without copying: an answer is the
    list of the asked tensors' buffers, sent one after the other. A slow reader's stream keeps only
    those buffers alive, not the whole snapshot, once a later round's replaces it (one buffer for
    the whole state pinned all of it for as long as the reader took: a round's state per slow stream).
    """

    def __init__(self, state: GlobalState) -> None:
        self.round, self.hash = state.round, state.hash
        tensors = all_tensors(state)
        self.names = list(tensors)
        self.position = {n: i for i, n in enumerate(self.names)}
        self.pieces = [memoryview(tensors[n].contiguous().numpy().tobytes()) for n in self.names]
        self.index = build_index(state)

    def chunk(self, names: list[str]) -> list[memoryview] | None:
        if not names or any(n not in self.position for n in names):
            return None
        return [self.pieces[self.position[n]] for n in names]


def serve_state(server: TransferServer, agreement: RoundAgreement) -> None:
    """Answer 'state-index' and 'state' requests from a snapshot of the node's current global state.

    The snapshot is taken under the round lock (never half-updated) once per round, then served
    without it. The previous round's snapshot is kept until the next one replaces it: a joiner
    asks every donor for its parts at once, and a part asked just before a round closes used to
    reach a donor that had moved on (the apply holds the lock), failing the whole download, over a
    slow link every time a round closed during it. A request for an older round is answered 'not
    found' and the joiner retries. At most MAX_STATE_READERS answers are in flight at a time, each
    until its last byte has left (the server holds the turn: `TransferServer.register`).
    """
    latest: list[StateSnapshot] = []  # the current round's snapshot, then the previous one's

    def kept(round_no: object) -> StateSnapshot | None:
        return next((s for s in latest if s.round == round_no), None)

    async def snapshot(round_no: object = None) -> StateSnapshot | None:
        """The current round's snapshot, or with `round_no` that round's while we keep it."""
        if latest and isinstance(round_no, int) and round_no < latest[0].round:  # older: kept or gone, no lock needed
            return kept(round_no)
        async with agreement.lock:
            state = agreement.state
            try:
                if not latest or (latest[0].round, latest[0].hash) != (state.round, state.hash):
                    latest[:] = [await asyncio.to_thread(StateSnapshot, state), *latest[:1]]
            except PartialStateError:  # a part between its outer step and the agreed index: nothing to serve
                return None
            return latest[0] if round_no is None else kept(round_no)

    async def index(request: dict) -> bytes | None:
        snap = await snapshot()
        return snap.index if snap is not None else None

    async def chunk(request: dict) -> list[memoryview] | None:
        names = request.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            return None  # duplicates would let one small request make us send a huge body
        snap = await snapshot(request.get("round"))
        return snap.chunk(names) if snap is not None and request.get("round") == snap.round else None

    server.register("state-index", index, streams=MAX_STATE_READERS)
    server.register("state", chunk, streams=MAX_STATE_READERS)


async def reload_state(
    node: SwarmNode, deadline_s: float = RELOAD_DEADLINE_S, *, names: Collection[str] | None = None
) -> GlobalState:
    """After divergence: the agreed state from the swarm (never θ(0), which would fork the run), or
    the part of it named. StateError if it cannot be had within deadline_s: the node then stops with
    that message rather than wait for ever."""
    node.status.phase = "joining"
    state = await catch_up(node, patience_s=deadline_s, deadline_s=deadline_s, names=names)
    if state is None:
        raise StateError(f"could not download the swarm's agreed state within {deadline_s:.0f}s")
    return state


async def catch_up(
    node: SwarmNode,
    *,
    patience_s: float,
    retry_s: float = 1.0,
    deadline_s: float = float("inf"),
    names: Collection[str] | None = None,
) -> GlobalState | None:
    """Download the newest agreed state from live members (`names`: only that part); None if for
    patience_s nobody holds one, or if deadline_s passes.

    Once some member holds state, keeps trying until the deadline (donors may move on mid-download)
    rather than falling back to θ(0), which would fork the run. So while the run's coordinator is
    live: it always serves a state once it has one (a restarted coordinator loads its saved state
    first, and a joiner that gave up then would start a run of its own at round 0).
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + patience_s
    hard_stop = loop.time() + deadline_s
    seen_holders = False
    while loop.time() < hard_stop:
        beats = await node.member_peers()
        coordinator_live = any(b.peer_id == node.run.coordinator != node.peer_id for b in beats)
        if not (seen_holders or coordinator_live or loop.time() < give_up_at):
            break
        choice = pick_donors(beats, exclude=node.peer_id)
        if choice is not None:
            seen_holders = True
            round_no, state_hash, donors = choice
            try:
                state = await download_state(node.server.p2p, donors, expected_hash=state_hash, traffic=node.traffic, names=names)
                what = "the state" if names is None else f"{len(state.params)} tensors of the state"
                logger.info("downloaded %s of round %d from %d donor(s)", what, round_no, len(donors))
                return state
            except Exception as e:  # whatever a donor sent, we retry rather than crash
                logger.warning("state download failed (%s); retrying", e)
        await asyncio.sleep(retry_s)
    return None
