"""A run's tokenizer travels through the swarm: served by the coordinator, fetched and verified by a
peer, refused when a peer brings another one; corpora are tokenised with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from swarm.data.tokenizer import (
    BPETokenizer,
    TokenizerError,
    obtain_run_tokenizer,
    run_tokenizer_path,
    train_bpe,
    vocab_overrides,
)
from swarm.net.dht import DHTOptions
from swarm.node import SwarmNode
from swarm.run import RunConfig

pytest.importorskip("tokenizers")

LOCAL = ("/ip4/127.0.0.1/tcp/0",)
TEXTS = [f"while count < {i}:\n    count += step_{i % 7}\n" for i in range(300)]


def _node(tmp_path: Path, name: str, run: RunConfig, initial: tuple[str, ...] = ()) -> SwarmNode:
    node = SwarmNode(
        identity_path=str(tmp_path / f"{name}.key"), dht_options=DHTOptions(initial_peers=initial, host_maddrs=LOCAL), name=name
    )
    node.start_dht()
    node.run = run
    return node


def _tokenizer(tmp_path: Path, name: str, texts: list[str]) -> tuple[Path, BPETokenizer]:
    tok = train_bpe(iter(texts), vocab_size=300)
    path = tmp_path / name
    path.write_text(tok.to_json())
    return path, tok


def test_peer_fetches_the_run_tokenizer_and_refuses_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from swarm.modes.replica import data_config, load_corpus

    path, tok = _tokenizer(tmp_path, "tokenizer.json", TEXTS)
    other_path, other = _tokenizer(tmp_path, "other.json", [t.upper() for t in TEXTS])
    run = RunConfig(
        run_id="tok-test",
        tokenizer_sha256=tok.sha256,
        tokenizer_bytes=path.stat().st_size,
        model_overrides=vocab_overrides(tok, {}),
    )
    coordinator = _node(tmp_path, "coordinator", run)
    nodes = [coordinator]
    try:
        peer = _node(tmp_path, "peer", run, tuple(coordinator.dht.visible_maddrs()))
        nodes.append(peer)

        async def go() -> None:
            for node in nodes:
                await node.start_network()
            run.coordinator = coordinator.peer_id
            served = await obtain_run_tokenizer(run, coordinator.files, local=path, cache_dir=tmp_path / "coord-cache")
            assert served.sha256 == tok.sha256 and coordinator.files.serves(tok.sha256)

            # A peer that brings another tokenizer is refused, naming both hashes, and fetches nothing.
            with pytest.raises(TokenizerError, match=rf"run uses sha256 {tok.sha256}, this peer has sha256 {other.sha256}"):
                await obtain_run_tokenizer(run, peer.files, local=other_path, cache_dir=tmp_path / "peer-cache")
            assert peer.traffic.received < 1000

            # A corrupted cached copy is not trusted: the file comes again from the coordinator, verified.
            cached = run_tokenizer_path(tok.sha256, tmp_path / "peer-cache")
            cached.parent.mkdir(parents=True)
            cached.write_text(other_path.read_text())
            fetched = await obtain_run_tokenizer(run, peer.files, cache_dir=tmp_path / "peer-cache")
            assert fetched.sha256 == tok.sha256 and cached.read_bytes() == path.read_bytes()
            assert peer.traffic.received >= path.stat().st_size and peer.files.serves(tok.sha256)
            for node in nodes:
                await node.stop(announce_leave=False)

        asyncio.run(go())
    finally:
        for node in nodes:
            if node._dht is not None and node._dht.dht.is_alive():
                node._dht.shutdown()

    # The peer's corpus is tokenised with the fetched file (found in its cache through the run).
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "peer-cache"))
    (tmp_path / "corpus.txt").write_text("".join(TEXTS[:40]))
    corpus = load_corpus(data_config(RunConfig(**{**run.__dict__, "data_source": str(tmp_path / "corpus.txt")})))
    assert corpus.train_tokens.max() < tok.vocab_size
    first = tok.encode(TEXTS[0]).tolist()
    assert corpus.train_tokens[: len(first)].tolist() == first


def test_run_description_needs_a_size_with_a_hash() -> None:
    with pytest.raises(ValueError, match="tokenizer_bytes must be in"):
        RunConfig(tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match="tokenizer_bytes must be in"):
        RunConfig(tokenizer_bytes=10)
