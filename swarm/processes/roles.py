"""The coordinator's role table: who is live, which role the mode gives each, and the signed records.

Every second the table is brought up to date: peers that announced themselves and heartbeat are
live; the mode assigns roles to them, oldest first (`TrainingMode.assign_roles`); changed roles are
signed and stored per peer (`role/<peer>`), and the whole table as the run's `Roster`. A peer that
stops heartbeating drops out (its work is reassigned) and gets its old data shard back if it
returns. A restarted coordinator adopts the role records it signed before.

A newcomer is admitted only if the run's admission policy lets it in (swarm/processes/admission.py);
a refused peer gets no role, stays out of the roster, and the coordinator logs why once per
announcement (the event the peer reads to learn it, `admission.REFUSED_EVENT`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swarm.net.records import Capacity, Role, Roster, role_key, run_key
from swarm.processes.admission import REFUSED_EVENT, load_gate, save_uses
from swarm.round.world import monotonic

if TYPE_CHECKING:
    from swarm.modes.base import TrainingMode
    from swarm.node import SwarmNode

ROLE_TTL_S = 24 * 3600.0  # roles must outlive a coordinator outage
ROSTER_REFRESH_S = 600.0


class RoleKeeper:
    def __init__(self, node: SwarmNode, mode: TrainingMode, *, state_dir: str | None = None) -> None:
        """state_dir: where the invite secret and spent tokens live (default: beside the node's
        identity key, which is the coordinator's state dir); read only under the invite policy."""
        self.node, self.mode = node, mode
        self.roles: dict[str, Role] = {}
        self.shards: dict[str, int] = {}  # admitted peers; never reused: a returning peer reads the same data
        self.since: dict[str, float] = {}
        self.capacities: dict[str, Capacity] = {}  # the live peers' announcements
        self.refused: dict[str, Capacity] = {}  # live peers refused, with the announcement that was refused
        self.state_dir = Path(state_dir if state_dir is not None else Path(node.identity_path).parent)
        self.gate = load_gate(node.run, self.state_dir)
        self._published: dict[str, Role] | None = None
        self._published_at = 0.0

    @property
    def run_id(self) -> str:
        return self.node.run.run_id

    async def live(self) -> set[str]:
        """Peers that announced their capacity and whose heartbeat is fresh (the coordinator aside)."""
        capacities = {
            c.signer: c.record
            for c in await self.node.dht.get_all(run_key(self.run_id, "peers"), Capacity)
            if c.record.peer_id == c.signer
        }
        self.mode.note_capacities(capacities)  # modes that assign roles by capacity (pipeline) read them
        self.capacities = capacities
        announced = set(capacities)
        return {b.peer_id for b in await self.node.live_peers()} & announced - {self.node.peer_id}

    async def update(self) -> None:
        live = await self.live()
        for peer in sorted(live - set(self.shards)):  # in a fixed order: admissions may compete (limits, tokens)
            await self._admit(peer)
        for peer in set(self.refused) - live:
            del self.refused[peer]  # gone: asked again when it comes back
        order = sorted(live & set(self.shards), key=lambda p: (self.since[p], p))
        current = {p: self.roles[p] for p in order if p in self.roles}
        new = self.mode.assign_roles(order, current, {p: self.shards[p] for p in order}, self.node.wall_time())
        for peer, role in new.items():
            if self.roles.get(peer) != role and await self.node.dht.put(role_key(self.run_id, peer), role, ROLE_TTL_S):
                self.roles[peer] = role
                self.node.log_event("role", f"{peer[-8:]}: {self.mode.describe_role(role)}")
        for peer in set(self.roles) - live:
            del self.roles[peer]  # gone: its work is someone else's now; a return starts afresh
        await self._publish_roster()

    async def _admit(self, peer: str) -> None:
        capacity = self.capacities[peer]
        if self.refused.get(peer) == capacity:
            return  # refused already, and it announced nothing new since
        existing = await self.node.dht.get_from(role_key(self.run_id, peer), Role, self.node.peer_id)
        decision = self.gate.decide(
            peer, invite=capacity.invite, addrs=capacity.addrs, now=self.node.wall_time(), known=existing is not None
        )
        if decision.reason is not None:
            self.refused[peer] = capacity
            self.node.log_event(REFUSED_EVENT, f"{peer}: {decision.reason}")
            return
        self.refused.pop(peer, None)
        if decision.spent:
            save_uses(self.state_dir, self.gate.uses)
        if existing is not None:  # signed by us before a restart: keep it
            self.roles[peer], self.shards[peer] = existing.record, existing.record.data_shard
            self.since[peer] = existing.record.assigned_at
            return
        used = set(self.shards.values())
        self.shards[peer] = next(s for s in range(len(used) + 1) if s not in used) % self.node.run.num_shards
        self.since[peer] = self.node.wall_time()

    async def _publish_roster(self) -> None:
        if self.roles == self._published and monotonic() - self._published_at < ROSTER_REFRESH_S:
            return
        roster = Roster(roles=[self.roles[p] for p in sorted(self.roles)], updated_at=self.node.wall_time())
        if await self.node.dht.put(run_key(self.run_id, "roster"), roster, ROLE_TTL_S):
            self._published, self._published_at = dict(self.roles), monotonic()
