"""Admission policies (swarm/processes/admission.py): allow-list, invite tokens, the per-prefix rate
limit, the run field that carries them, the coordinator's role table enforcing them over the
simulated network, and join-swarm learning that it was refused (end to end, marked slow)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import stat
from pathlib import Path

import pytest

from swarm.net.records import Capacity, Event, Roster, run_key
from swarm.net.schema import MAX_RECORD_BYTES, SchemaError, decode_record, encode_record, from_plain, to_plain
from swarm.processes.admission import (
    INVITE_KEY_FILE,
    NO_ADDRESS,
    REFUSED_EVENT,
    WINDOW_S,
    AdmissionGate,
    Decision,
    check_token,
    invite_proof,
    load_gate,
    load_secret,
    mint_token,
    network_prefixes,
    refusal_before_joining,
    refusal_in,
    refusal_message,
    save_uses,
    verify_proof,
)
from swarm.run import MAX_ALLOW, AdmissionConfig, RunConfig

A, B, C = (
    "QmPeerAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "QmPeerBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "QmPeerCccccccccccccc",
)
SECRET = bytes(range(32))


def fake_id(i: int) -> str:
    """A distinct id as long as an RSA peer id (base58 has no '0')."""
    return "Qm" + f"{i:044d}".replace("0", "z")


def addr(ip: str) -> list[str]:
    return [f"/ip{6 if ':' in ip else 4}/{ip}/tcp/4001/p2p/{A}"]


# ----- the run field ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"policy": "closed"}, "admission policy must be one of"),
        ({"allow": [A]}, "allow list goes with the allow-list policy only"),
        ({"policy": "allow-list", "allow": ["not a peer id!"]}, "is not a peer id"),
        ({"policy": "allow-list", "allow": [A, A]}, "names a peer id twice"),
        ({"policy": "allow-list", "allow": [fake_id(i) for i in range(MAX_ALLOW + 1)]}, "at most"),
        ({"policy": "invite", "invite_uses": 0}, "invite_uses must be in"),
        ({"per_prefix_per_hour": -1}, "per_prefix_per_hour must be in"),
        ({"probation_rounds": -1}, "probation_rounds must be in"),
    ],
)
def test_bad_admission_settings_are_refused_with_the_reason(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionConfig(**fields)


def test_the_admission_section_round_trips_with_the_run_and_fits_a_record() -> None:
    run = RunConfig(admission=AdmissionConfig(policy="allow-list", allow=[A, B], per_prefix_per_hour=3, probation_rounds=5))
    assert from_plain(RunConfig, to_plain(run)) == run
    assert decode_record(RunConfig, encode_record(run)) == run
    saved = to_plain(RunConfig())
    del saved["admission"]  # a run.json written before admission policies
    assert from_plain(RunConfig, saved).admission == AdmissionConfig()
    with pytest.raises(SchemaError, match="RunConfig.admission.policy: .closed. is not one of"):
        from_plain(RunConfig, {**to_plain(run), "admission": {"policy": "closed"}})
    full = [fake_id(i) for i in range(MAX_ALLOW)]
    assert len(encode_record(RunConfig(admission=AdmissionConfig(policy="allow-list", allow=full)))) < MAX_RECORD_BYTES // 2
    assert not AdmissionConfig().can_refuse and AdmissionConfig(per_prefix_per_hour=1).can_refuse


# ----- the decisions ---------------------------------------------------------------------------


def decide(
    gate: AdmissionGate, peer: str, *, invite: str = "", ip: str = "203.0.113.7", now: float = 0.0, known: bool = False
) -> Decision:
    return gate.decide(peer, invite=invite, addrs=addr(ip), now=now, known=known)


def test_the_allow_list_admits_its_peers_only() -> None:
    gate = AdmissionGate(AdmissionConfig(policy="allow-list", allow=[A]), "run")
    assert decide(gate, A).admitted
    assert decide(gate, B).reason == "not on the run's allow-list"
    assert decide(AdmissionGate(AdmissionConfig(), "run"), B).admitted, "open admits anyone"


def test_an_invite_token_admits_its_holder_once_and_no_one_with_a_forged_proof() -> None:
    gate = AdmissionGate(AdmissionConfig(policy="invite"), "run", secret=SECRET)
    token = mint_token(SECRET)
    token_id = token.split(".")[0]
    assert check_token(token) == token and len(invite_proof(token, "run", A)) == len(token) == 81
    assert decide(gate, A, invite="").reason == "invite token missing or invalid"
    assert decide(gate, A, invite="garbage").reason == "invite token missing or invalid"
    # B copies A's published proof into its own (signed) record: the proof names A, not B.
    assert decide(gate, B, invite=invite_proof(token, "run", A)).reason == "invite token missing or invalid"
    assert decide(gate, A, invite=invite_proof(token, "another-run", A)).reason == "invite token missing or invalid"
    assert decide(gate, A, invite=invite_proof(mint_token(b"x" * 32), "run", A)).reason == "invite token missing or invalid"
    assert gate.uses == {}, "refusals spend nothing"

    first = decide(gate, A, invite=invite_proof(token, "run", A))
    assert first.admitted and first.spent == token_id and gate.uses == {token_id: [A]}
    again = decide(gate, A, invite=invite_proof(token, "run", A))
    assert again.admitted and again.spent == "", "the identity that spent it comes back freely"
    reused = decide(gate, B, invite=invite_proof(token, "run", B))
    assert reused.reason == f"invite token {token_id} was spent already (1 of 1 uses)"

    shared = AdmissionGate(AdmissionConfig(policy="invite", invite_uses=2), "run", secret=SECRET)
    assert [decide(shared, p, invite=invite_proof(token, "run", p)).admitted for p in (A, B, C)] == [True, True, False]


def test_a_token_is_checked_from_the_secret_alone() -> None:
    token = mint_token(SECRET, "0123456789abcdef")
    assert token == mint_token(SECRET, "0123456789abcdef") != mint_token(b"y" * 32, "0123456789abcdef")
    assert verify_proof(SECRET, invite_proof(token, "run", A), "run", A) == "0123456789abcdef"
    assert verify_proof(b"", invite_proof(token, "run", A), "run", A) is None
    for bad in ("", token[:-1], token.upper(), token.replace(".", ":")):
        with pytest.raises(ValueError, match="an invite token is"):
            check_token(bad)
    with pytest.raises(ValueError, match="needs the coordinator's invite secret"):
        AdmissionGate(AdmissionConfig(policy="invite"), "run")


def test_new_identities_per_prefix_are_limited_over_a_sliding_hour() -> None:
    gate = AdmissionGate(AdmissionConfig(per_prefix_per_hour=2), "run")
    assert decide(gate, "p1", ip="10.1.2.3", now=0).admitted
    assert decide(gate, "p2", ip="10.1.2.200", now=10).admitted
    assert decide(gate, "p3", ip="10.1.2.9", now=20).reason == "too many new identities from 10.1.2.0/24 this hour (limit 2)"
    assert decide(gate, "p4", ip="10.1.3.9", now=20).admitted, "the next /24 has its own budget"
    assert decide(gate, "p5", ip="10.1.2.9", now=20, known=True).admitted, "a peer holding our role is not new"
    assert decide(gate, "p3", ip="10.1.2.9", now=WINDOW_S).admitted, "the first admission has left the hour"
    assert not decide(gate, "p6", ip="10.1.2.9", now=WINDOW_S + 5).admitted

    six = AdmissionGate(AdmissionConfig(per_prefix_per_hour=1), "run")
    assert decide(six, "q1", ip="2001:db8:1:1::1").admitted
    assert decide(six, "q2", ip="2001:db8:1:ffff::2").reason == "too many new identities from 2001:db8:1::/48 this hour (limit 1)"
    assert decide(six, "q3", ip="2001:db8:2::1").admitted
    assert decide(six, "q4", ip="203.0.113.7").admitted and not decide(six, "q5", ip="203.0.113.99").admitted


def test_prefixes_come_from_the_most_telling_addresses_announced() -> None:
    circuit = "/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmMe"
    announced = ["/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.5/tcp/1", "/ip4/81.2.69.160/tcp/1", "/ip6/2a00:1450:4001:81c::1/tcp/1"]
    assert network_prefixes(announced) == {"81.2.69.0/24", "2a00:1450:4001::/48"}
    assert network_prefixes(announced[:2]) == {"192.168.1.0/24"}, "a LAN run"
    assert network_prefixes(announced[:1]) == {"127.0.0.0/24"}, "one machine"
    assert network_prefixes([circuit, "/dns4/example.org/tcp/1", "/ip4/0.0.0.0/tcp/1"]) == {NO_ADDRESS}
    gate = AdmissionGate(AdmissionConfig(per_prefix_per_hour=1), "run")
    assert gate.decide("x", invite="", addrs=[], now=0, known=False).admitted
    assert gate.decide("y", invite="", addrs=[circuit], now=0, known=False).reason == (
        f"too many new identities from {NO_ADDRESS} this hour (limit 1)"
    ), "announcing nothing does not escape the limit"


def test_the_invite_secret_and_spent_tokens_survive_a_restart(tmp_path: Path) -> None:
    secret = load_secret(tmp_path)
    assert load_secret(tmp_path) == secret and len(secret) == 32
    assert stat.S_IMODE((tmp_path / INVITE_KEY_FILE).stat().st_mode) == 0o600
    run = RunConfig(run_id="r", admission=AdmissionConfig(policy="invite"))
    token = mint_token(secret)
    gate = load_gate(run, tmp_path)
    assert decide(gate, A, invite=invite_proof(token, "r", A)).admitted
    save_uses(tmp_path, gate.uses)
    restarted = load_gate(run, tmp_path)
    assert not decide(restarted, B, invite=invite_proof(token, "r", B)).admitted
    assert decide(restarted, A, invite=invite_proof(token, "r", A)).admitted
    assert not (tmp_path / "open").exists() and load_gate(RunConfig(), tmp_path / "open").secret == b"", "open runs read no file"


# ----- the peer's side -------------------------------------------------------------------------


def test_a_peer_tells_from_the_run_alone_when_it_cannot_be_admitted() -> None:
    allow = AdmissionConfig(policy="allow-list", allow=[A])
    assert refusal_before_joining(allow, A, invited=False) is None
    message = refusal_before_joining(allow, B, invited=False)
    assert message is not None and B in message and "--identity" in message and f"--allow {B}" in message
    invite = AdmissionConfig(policy="invite")
    assert "--invite TOKEN" in str(refusal_before_joining(invite, A, invited=False))
    assert refusal_before_joining(invite, A, invited=True) is None
    assert refusal_before_joining(AdmissionConfig(), A, invited=False) is None


def test_a_peer_reads_its_own_latest_refusal_from_the_coordinators_events() -> None:
    events = [
        Event(10.0, REFUSED_EVENT, f"{A}: invite token missing or invalid"),
        Event(11.0, "role", f"{B[-8:]}: replica"),
        Event(12.0, REFUSED_EVENT, f"{B}: not on the run's allow-list"),
        Event(13.0, "reject", f"{A}: not a refusal"),
    ]
    assert refusal_in(events, A, since=0.0) == "invite token missing or invalid"
    assert refusal_in(events, A, since=10.5) is None, "a refusal of an earlier announcement"
    assert refusal_in(events, C, since=0.0) is None
    assert refusal_message(AdmissionConfig(policy="invite"), "invite token missing or invalid") == (
        "the coordinator did not admit this peer: invite token missing or invalid;"
        " ask the run's operator for a new invite token (swarm-coordinator invite)"
    )
    silent = refusal_message(AdmissionConfig(per_prefix_per_hour=4), None)
    assert "gave this peer no role" in silent and "at most 4 new identities" in silent
    assert refusal_message(AdmissionConfig(per_prefix_per_hour=4), "too many new identities from x").endswith(
        "try again in an hour"
    )


# ----- the coordinator's role table over the simulated network -----------------------------------


def test_the_role_keeper_gives_refused_peers_no_role_and_says_why_once(tmp_path: Path) -> None:
    from swarm.modes import mode_for
    from swarm.processes.roles import RoleKeeper
    from swarm.sim.clock import run_virtual
    from swarm.sim.network import Profile, SimNetwork
    from swarm.sim.node import SimNode

    async def main() -> tuple[RoleKeeper, list[str], Roster | None, list[Event]]:
        net = SimNetwork(asyncio.get_running_loop(), Profile.load("lan"), random.Random(0))  # type: ignore[arg-type]
        run = RunConfig(run_id="adm", heartbeat_interval_s=1.0, heartbeat_ttl_s=30.0)
        coordinator = SimNode(net, run, name="coordinator", index=0)
        run.coordinator = coordinator.peer_id
        run.admission = AdmissionConfig(policy="invite", per_prefix_per_hour=1)
        p1, p2, p3, p4 = peers = [SimNode(net, run, name=f"p{i}", index=i) for i in (1, 2, 3, 4)]
        token, other = mint_token(load_secret(tmp_path)), mint_token(load_secret(tmp_path))
        keeper = RoleKeeper(coordinator, mode_for(run), state_dir=str(tmp_path))

        async def announce(peer: SimNode, proof: str, ip: str) -> None:
            await peer.publish_heartbeat()
            cap = Capacity(peer.peer_id, peer.status.name, "cpu", 8.0, 1.0, addrs=[f"/ip4/{ip}/tcp/1"], invite=proof)
            await peer.dht.put(run_key(run.run_id, "peers"), cap, 3600.0)

        await announce(p1, invite_proof(token, run.run_id, p1.peer_id), "203.0.113.1")
        await announce(p2, invite_proof(token, run.run_id, p1.peer_id), "198.51.100.1")  # p1's proof, copied
        await asyncio.sleep(1.0)  # the records become visible
        await keeper.update()
        await announce(p3, invite_proof(token, run.run_id, p3.peer_id), "192.0.2.1")  # p1 spent it
        await announce(p4, invite_proof(other, run.run_id, p4.peer_id), "203.0.113.2")  # p1's /24, this hour
        await asyncio.sleep(1.0)
        for _ in range(3):
            await keeper.update()
        await asyncio.sleep(1.0)
        roster = await coordinator.dht.get_from(run_key(run.run_id, "roster"), Roster, coordinator.peer_id)
        return keeper, [p.peer_id for p in peers], roster.record if roster else None, list(coordinator.events)

    keeper, (p1, p2, p3, p4), roster, events = run_virtual(main)
    assert set(keeper.roles) == {p1} and roster is not None and [r.peer_id for r in roster.roles] == [p1]
    refused = [e.text.split(": ", 1) for e in events if e.kind == REFUSED_EVENT]
    assert len(refused) == 3, "each refusal is logged once"
    reasons = dict(refused)
    assert reasons[p2] == "invite token missing or invalid"
    assert reasons[p3] == f"invite token {next(iter(keeper.gate.uses))} was spent already (1 of 1 uses)"
    assert reasons[p4] == "too many new identities from 203.0.113.0/24 this hour (limit 1)"
    assert json.loads((tmp_path / "invites.json").read_text()) == keeper.gate.uses == {next(iter(keeper.gate.uses)): [p1]}


# ----- the command lines -----------------------------------------------------------------------


def test_coordinator_admission_flags_and_invite_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.coordinator import build_run, main, parse_args, prepared_run, update_saved_admission

    (tmp_path / "allow.txt").write_text(f"# the team\n{B}\n\n{A}  # again\n")
    args = parse_args(["--admission", "allow-list", "--allow", A, "--allow-file", str(tmp_path / "allow.txt")])
    assert build_run(args).admission == AdmissionConfig(policy="allow-list", allow=[A, B])
    args = parse_args(["--per-prefix-per-hour", "4", "--probation-rounds", "3"])
    assert build_run(args).admission == AdmissionConfig(per_prefix_per_hour=4, probation_rounds=3)
    with pytest.raises(ValueError, match="allow list goes with the allow-list policy only"):
        build_run(parse_args(["--allow", A]))

    # A restart with admission flags rewrites the saved run's admission, and nothing else.
    state = tmp_path / "state"
    state.mkdir()
    saved = RunConfig(run_id="kept", admission=AdmissionConfig(policy="allow-list", allow=[A]))
    (state / "run.json").write_text(json.dumps(to_plain(saved)))
    update_saved_admission(parse_args(["--state-dir", str(state), "--admission", "invite", "--invite-uses", "2"]))
    now = from_plain(RunConfig, json.loads((state / "run.json").read_text()))
    assert now.run_id == "kept" and now.admission == AdmissionConfig(policy="invite", invite_uses=2)
    capsys.readouterr()

    assert main(["invite", "--state-dir", str(state), "--count", "3"]) == 0
    tokens = capsys.readouterr().out.split()
    assert len(set(tokens)) == 3 and all(check_token(t) for t in tokens)
    secret = load_secret(state)
    assert all(verify_proof(secret, invite_proof(t, "kept", A), "kept", A) == t.split(".")[0] for t in tokens)
    (state / "invites.json").write_text("[1]")
    with pytest.raises(SystemExit, match="swarm-coordinator: admission: .*invites.json is not a map"):
        prepared_run(parse_args(["--state-dir", str(state)]))


def test_join_swarm_refuses_a_malformed_token_before_starting() -> None:
    from launch.join import main

    with pytest.raises(SystemExit, match="join-swarm: an invite token is"):
        main(["/ip4/127.0.0.1/tcp/1/p2p/QmCoordinator", "--invite", "not-a-token"])


@pytest.mark.slow
def test_join_swarm_says_why_it_was_refused_and_exits(tmp_path: Path) -> None:
    """An invite-only run over real processes: no token, a forged token and a spent token each end
    join-swarm with the reason and exit status 1; the invited peer gets its role."""
    from launch.cluster import LocalCluster, nano_run, wait_for

    with LocalCluster(tmp_path, nano_run(admission={"policy": "invite"})) as cluster:
        secret = load_secret(tmp_path / "coordinator")  # made by the coordinator at start
        token = mint_token(secret)
        guest = cluster.add_peer("guest", extra=["--invite", token, "--identity", str(tmp_path / "guest.key")])
        uninvited = cluster.add_peer("uninvited")
        forger = cluster.add_peer("forger", extra=["--invite", mint_token(b"z" * 32)])
        assert uninvited.wait(timeout=120) == 1 and forger.wait(timeout=120) == 1
        assert "join-swarm: this run admits only peers with an invite token" in cluster.log("uninvited")
        assert "join-swarm: the coordinator did not admit this peer: invite token missing or invalid" in cluster.log("forger")
        wait_for(lambda: re.search(r"\[role\] \S+: replica", cluster.log("coordinator")), 120, "the guest's role", cluster)
        assert guest.poll() is None
        second = cluster.add_peer("second", extra=["--invite", token])
        assert second.wait(timeout=120) == 1
        assert "was spent already (1 of 1 uses)" in cluster.log("second")
