"""BPE tokenizers: training, loading, hashing, the run's tokenizer check, corpora and model vocab."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from swarm.data import DataConfig, load_corpus
from swarm.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    TokenizerError,
    load_tokenizer,
    train_bpe,
    vocab_overrides,
)

pytest.importorskip("tokenizers")

TEXTS = [f"for item in range({i}):\n    total += item * {i}  # naïve café\n" for i in range(300)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(iter(TEXTS), vocab_size=320)


def test_training_gives_specials_first_and_round_trips(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size == 320
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    for text in ["", "for item in range(3):\n", "naïve café — 日本語 🚀 unseen \x00 bytes"]:
        ids = bpe.encode(text)
        assert ids.dtype == np.uint16
        assert bpe.decode(ids) == text  # byte-level: nothing is ever unknown
    common = "    total += item * 7\n"
    assert len(bpe.encode(common)) < len(common) / 2  # merges learnt from the corpus compress it
    assert bpe.decode([bpe.bos_id, *bpe.encode("ab").tolist(), bpe.eos_id]) == "ab"  # specials decode to nothing


def test_file_round_trip_and_hash_is_of_the_file_bytes(tmp_path: Path, bpe: BPETokenizer) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json())
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == bpe.sha256
    assert loaded.encode(TEXTS[5]).tolist() == bpe.encode(TEXTS[5]).tolist()
    assert load_tokenizer(path, expected_sha256=bpe.sha256).sha256 == bpe.sha256
    assert isinstance(load_tokenizer(None, expected_sha256=""), ByteTokenizer)


def test_a_different_tokenizer_is_refused_naming_both_hashes(tmp_path: Path, bpe: BPETokenizer) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json())
    other = "ab" * 32
    with pytest.raises(TokenizerError, match=rf"run uses sha256 {other}, this peer has sha256 {bpe.sha256}"):
        load_tokenizer(path, expected_sha256=other)
    with pytest.raises(TokenizerError, match=rf"run uses sha256 {bpe.sha256}, this peer has the byte tokenizer"):
        load_tokenizer(None, expected_sha256=bpe.sha256)
    with pytest.raises(TokenizerError, match=rf"run uses the byte tokenizer, this peer has sha256 {bpe.sha256}"):
        load_tokenizer(path, expected_sha256="")


def test_bad_files_are_clear_errors(tmp_path: Path, bpe: BPETokenizer) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="not a tokenizers tokenizer.json"):
        BPETokenizer(b"\x80\x04pickle?")
    with pytest.raises(TokenizerError, match="not a tokenizers tokenizer.json"):
        BPETokenizer(b'{"model": 3}')
    no_eos = json.loads(bpe.to_json())
    no_eos["added_tokens"] = []
    no_eos["model"]["vocab"] = {k: v for k, v in no_eos["model"]["vocab"].items() if not k.startswith("<|")}
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        BPETokenizer(json.dumps(no_eos).encode())
    with pytest.raises(TokenizerError, match="vocab_size must be in"):
        train_bpe(iter(TEXTS), vocab_size=100)


def test_byte_tokenizer_as_tokenizer_json_gives_the_same_ids() -> None:
    byte = ByteTokenizer()
    as_bpe = BPETokenizer(byte.to_json().encode())
    text = "héllo\twörld 🚀\n\x00\x7f  spaces"
    assert as_bpe.vocab_size == 260 and (as_bpe.bos_id, as_bpe.eos_id, as_bpe.pad_id) == (256, 257, 258)
    assert as_bpe.encode(text).tolist() == byte.encode(text).tolist()
    assert as_bpe.decode(byte.encode(text)) == text


def test_corpus_tokenised_with_bpe(tmp_path: Path, bpe: BPETokenizer) -> None:
    (tmp_path / "a.txt").write_text("".join(TEXTS[:50]))
    (tmp_path / "b.txt").write_text("".join(TEXTS[50:100]))
    cfg = DataConfig(source=str(tmp_path), eval_fraction=0.0)
    as_bytes = load_corpus(cfg)
    as_bpe = load_corpus(cfg, bpe)
    stream = as_bpe.train_tokens
    assert len(stream) < len(as_bytes.train_tokens) / 2
    assert stream.max() < bpe.vocab_size
    assert [int(i) for i in np.flatnonzero(stream == bpe.eos_id)] == [len(bpe.encode("".join(TEXTS[:50]))), len(stream) - 1]
    assert as_bpe.fingerprint != as_bytes.fingerprint


def test_model_vocab_comes_from_the_tokenizer(tmp_path: Path, bpe: BPETokenizer) -> None:
    from swarm.train.solo import TrainConfig

    assert vocab_overrides(ByteTokenizer(), {"d_model": 64}) == {"d_model": 64}
    assert vocab_overrides(bpe, {"d_model": 64}) == {"d_model": 64, "vocab_size": 320}
    assert vocab_overrides(bpe, {"vocab_size": 384})["vocab_size"] == 384  # padded up is fine
    with pytest.raises(TokenizerError, match="smaller than the tokenizer's 320"):
        vocab_overrides(bpe, {"vocab_size": 300})
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json())
    assert TrainConfig(tokenizer=str(path), out_dir=None).model_config().vocab_size == 320
    assert TrainConfig(out_dir=None).model_config().vocab_size == 260


def test_run_description_validates_the_hash() -> None:
    from swarm.run import RunConfig

    assert RunConfig(tokenizer_sha256="0" * 64, tokenizer_bytes=10).tokenizer_sha256 == "0" * 64
    with pytest.raises(ValueError, match="tokenizer_sha256 must be 64 lowercase hex"):
        RunConfig(tokenizer_sha256="../../etc/passwd", tokenizer_bytes=10)


def test_cli_train_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.tokenizer import main

    (tmp_path / "corpus.txt").write_text("".join(TEXTS))
    out = tmp_path / "tok.json"
    assert main(["train", "--vocab", "300", "--data", str(tmp_path / "corpus.txt"), "--out", str(out)]) == 0
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"vocab 300, sha256 {sha}" in capsys.readouterr().out
    assert main(["info", str(out), "--data", str(tmp_path / "corpus.txt")]) == 0
    printed = capsys.readouterr().out
    assert "bpe" in printed and sha in printed and "bytes/tok" in printed
    assert main(["info", str(tmp_path / "nope.json")]) == 2
    assert "tokenizer file not found" in capsys.readouterr().err
