"""Who trains what in the pipeline mode: full replicas, pipeline groups of weak peers, spares.

The rule (the coordinator runs it every second; pure and deterministic, so a restarted coordinator
reproduces the table from the role records it signed before):
  * a peer whose announced memory (``join-swarm --memory-gb`` overrides the measured one) is below
    the threshold is weak; every other peer is a full replica on its own data shard;
  * an existing group keeps its live members in their stages and its layer cuts; a stage whose peer
    left is filled by the oldest spare weak peer, which takes that stage's layers (the others keep
    their parts: no download, no lost round); groups that cannot be filled are dissolved and their
    members become spares when those and the spares can form a whole group now; otherwise they
    wait as they are for a newcomer to fill them (their contributions are dropped by the leader
    meanwhile, see ``incomplete_groups``, and their stages sit the rounds out);
  * spares, oldest first, form new groups of S stages; the rest wait as spares (they train nothing);
  * a group's layers are split so that each stage takes time in proportion to its speed: each stage
    gets at least one layer, and each further layer goes to the stage that would finish it soonest
    (announced tokens/s of a whole-model step, so the time of a layer is ~ 1/speed);
  * a group reads one data shard (every stage reads the same batches, so no token ids travel).
"""

from __future__ import annotations

from collections.abc import Sequence

from swarm.net.records import Capacity, Role


def balance_layers(n_layers: int, speeds: Sequence[float]) -> list[int]:
    """Cut points of ``n_layers`` into ``len(speeds)`` contiguous stages, balanced by speed."""
    if not 1 <= len(speeds) <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {len(speeds)} stages")
    speed = [max(float(s), 1e-9) for s in speeds]
    counts = [1] * len(speed)
    for _ in range(n_layers - len(speed)):
        best = min(range(len(speed)), key=lambda i: ((counts[i] + 1) / speed[i], i))
        counts[best] += 1
    cuts, total = [], 0
    for c in counts[:-1]:
        total += c
        cuts.append(total)
    return cuts


def stage_layers(role: Role, n_layers: int) -> tuple[int, int]:
    """[start, end) of the blocks a stage role holds."""
    if role.stage is None:
        raise ValueError("not a stage role")
    edges = [0, *role.layer_cuts, n_layers]
    return edges[role.stage], edges[role.stage + 1]


def plan_roles(
    live: list[str],
    current: dict[str, Role],
    shards: dict[str, int],
    capacities: dict[str, Capacity],
    *,
    stages: int,
    n_layers: int,
    weak_below_gb: float,
    now: float,
) -> dict[str, Role]:
    """Roles for the live peers (oldest first); unchanged roles are returned as the same objects."""
    weak = [p for p in live if p in capacities and capacities[p].memory_gb < weak_below_gb]
    roles: dict[str, Role] = {}
    for peer in live:
        if peer not in weak:
            old = current.get(peer)
            keep = old is not None and old.kind == "replica"
            roles[peer] = old if keep and old else Role(peer_id=peer, kind="replica", data_shard=shards[peer], assigned_at=now)
    groups = _existing_groups(weak, current)
    grouped = {p for members in groups.values() for p in members if p}
    spares = [p for p in weak if p not in grouped]
    unfilled = []
    for gid in sorted(groups):
        members = groups[gid]
        for i, member in enumerate(members):
            if member is None and spares:
                members[i] = spares.pop(0)
        if any(p is None for p in members):
            unfilled.append(gid)
    survivors = [p for gid in unfilled for p in groups[gid] if p]
    waiting: dict[int, list[str]] = {}
    if len(spares) + len(survivors) >= stages:  # a whole group can be formed now: dissolve them
        spares = sorted(spares + survivors, key=weak.index)
    else:  # nothing better to do with them: they wait, keeping their roles, for newcomers to fill them
        waiting = {gid: [p for p in groups[gid] if p] for gid in unfilled}
    for gid in unfilled:
        del groups[gid]
    next_gid = max([*groups, *(r.replica_group for r in current.values() if r.replica_group is not None)], default=-1) + 1
    while len(spares) >= stages:
        groups[next_gid], spares = list(spares[:stages]), spares[stages:]
        next_gid += 1
    for peers in waiting.values():
        for peer in peers:
            roles[peer] = current[peer]
    for gid, members in groups.items():
        full = [p for p in members if p]
        before = [current[p] for p in full if p in current and current[p].replica_group == gid]
        shard = before[0].data_shard if before else shards[full[0]]
        kept = before[0].layer_cuts if before and len(before[0].group_peers) == len(full) else None
        cuts = kept or balance_layers(n_layers, [capacities[p].tokens_per_s for p in full])
        for i, peer in enumerate(full):
            role = Role(
                peer_id=peer,
                kind="stage",
                data_shard=shard,
                stage=i,
                replica_group=gid,
                group_peers=full,
                layer_cuts=cuts,
                assigned_at=now,
            )
            roles[peer] = _same_or(current.get(peer), role)
    for peer in spares:
        role = Role(peer_id=peer, kind="observer", data_shard=shards[peer], assigned_at=now)
        roles[peer] = _same_or(current.get(peer), role)
    return {p: roles[p] for p in live}


def _existing_groups(weak: list[str], current: dict[str, Role]) -> dict[int, list[str | None]]:
    """Groups in the current table: stage index -> live weak member, or None where it left."""
    groups: dict[int, list[str | None]] = {}
    for role in current.values():
        if role.kind != "stage" or role.replica_group is None or role.stage is None:
            continue
        members = groups.setdefault(role.replica_group, [None] * len(role.group_peers))
        if role.peer_id in weak and role.stage < len(members):
            members[role.stage] = role.peer_id
    return groups


def _same_or(old: Role | None, new: Role) -> Role:
    """The old record when only the assignment time differs (roles change only when forced)."""
    if old is not None and _key(old) == _key(new):
        return old
    return new


def _key(role: Role) -> tuple:
    return (role.kind, role.data_shard, role.stage, role.replica_group, tuple(role.group_peers), tuple(role.layer_cuts))


def incomplete_groups(roles: dict[str, Role]) -> dict[str, str]:
    """Contributors (peer -> reason) whose pipeline group is not all in this round: a part of a
    replica's update is never applied, so every stage of such a group sits the round out."""
    out = {}
    for peer, role in roles.items():
        if role.kind != "stage":
            continue
        missing = [p for p in role.group_peers if p not in roles or roles[p].replica_group != role.replica_group]
        if missing:
            out[peer] = f"pipeline group {role.replica_group} is incomplete this round (stage peer {missing[0][-8:]} missing)"
    return out
