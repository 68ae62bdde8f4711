"""A whole run with a BPE tokenizer, as a user would do it: the coordinator names the file, a volunteer
with nothing but the join address gets it from the swarm and trains, a volunteer with another
tokenizer is refused naming both hashes, and the finished run exports as a transformers model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from swarm.data.tokenizer import train_bpe

pytestmark = pytest.mark.slow
pytest.importorskip("tokenizers")

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jugs of liquor".split()


def _corpus() -> str:
    lines = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 12)) + f" {i}.\n" for i in range(3000)]
    return "".join(lines)


def test_bpe_run_from_coordinator_to_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _corpus()
    (tmp_path / "corpus.txt").write_text(text)
    tok = train_bpe(iter(text.splitlines(keepends=True)), vocab_size=512)
    (tmp_path / "tok.json").write_text(tok.to_json())
    other = train_bpe(iter(text.upper().splitlines(keepends=True)), vocab_size=512)
    (tmp_path / "other.json").write_text(other.to_json())
    run = nano_run(data_source=str(tmp_path / "corpus.txt"), max_rounds=4)

    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "coordinator-cache"))
    with LocalCluster(tmp_path / "cluster", run, coordinator_args=["--tokenizer", str(tmp_path / "tok.json")]) as cluster:
        monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "peer-cache"))
        cluster.add_peer("p0", max_rounds=2)
        bad = cluster.add_peer("bad", extra=["--tokenizer", str(tmp_path / "other.json")])
        wait_for(lambda: bad.poll() is not None, 240, "the peer with another tokenizer to leave")
        assert bad.returncode != 0
        cluster.killed.add("bad")  # its exit was the point: the cluster's other waits should not count it as a crash
        assert f"tokenizer mismatch: the run uses sha256 {tok.sha256}, this peer has sha256 {other.sha256}" in cluster.log("bad")
        wait_for(lambda: cluster.rounds_completed(1) >= 1, 240, "a round trained with the BPE tokenizer", cluster)
        assert f"tokenizer {tok.sha256[:12]}: bpe, {tok.vocab_size} ids" in cluster.log("p0")
    fetched = (tmp_path / "peer-cache" / tok.sha256 / "tokenizer.json").read_bytes()
    assert hashlib.sha256(fetched).hexdigest() == tok.sha256  # came through the swarm, verified

    transformers = pytest.importorskip("transformers")
    from launch.export import main as export

    out = tmp_path / "hf"
    assert export([str(tmp_path / "cluster" / "coordinator"), str(out), "--check"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("the lazy dog").input_ids == tok.encode("the lazy dog").tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = hf_tok("the quick", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=ids.new_ones(ids.shape))
    assert hf_tok.decode(generated[0]).startswith("the quick") and generated.shape[1] == ids.shape[1] + 8
