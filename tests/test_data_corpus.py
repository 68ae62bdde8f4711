"""Corpus loading from every source kind, its errors, and the eval split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from swarm.data.corpus import STDLIB_DEFAULT_MAX_BYTES, CorpusError, DataConfig, load_corpus
from swarm.data.tokenizer import EOS_ID, ByteTokenizer


def _text(tokens: np.ndarray) -> str:
    return ByteTokenizer().decode(tokens)


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hello world " * 50)
    corpus = load_corpus(DataConfig(source=str(path), eval_fraction=0.1))
    stream = np.concatenate([corpus.train_tokens, corpus.eval_tokens])
    assert corpus.num_documents == 1 and corpus.num_bytes == 600
    assert stream[-1] == EOS_ID and (stream == EOS_ID).sum() == 1
    assert _text(stream) == "hello world " * 50
    assert len(corpus.eval_tokens) == round(601 * 0.1)


def test_directory_reads_txt_md_py_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.py").write_text("C")
    (tmp_path / "skip.bin").write_text("X")
    (tmp_path / ".hidden" / "h.txt").write_text("H")
    corpus = load_corpus(DataConfig(source=str(tmp_path), eval_fraction=0.0))
    assert corpus.train_tokens.tolist() == [ord("A"), EOS_ID, ord("B"), EOS_ID, ord("C"), EOS_ID]
    assert len(corpus.eval_tokens) == 0


def test_glob(tmp_path: Path) -> None:
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    corpus = load_corpus(DataConfig(source=str(tmp_path / "x*.txt"), eval_fraction=0.0))
    assert _text(corpus.train_tokens) == "x1.txtx2.txt"
    assert corpus.num_documents == 2


@pytest.mark.parametrize("compressed", [False, True])
def test_jsonl(tmp_path: Path, compressed: bool) -> None:
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "sécond", "id": 2})]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("d.jsonl.gz" if compressed else "d.jsonl")
    path.write_bytes(gzip.compress(data) if compressed else data)
    corpus = load_corpus(DataConfig(source=str(path), eval_fraction=0.0))
    assert corpus.num_documents == 2
    assert corpus.train_tokens.tolist().count(EOS_ID) == 2
    assert _text(corpus.train_tokens) == "firstsécond"


def test_custom_text_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "abc"}) + "\n")
    assert load_corpus(DataConfig(source=str(path), text_field="body", eval_fraction=0.0)).num_bytes == 3


def test_max_bytes_cuts_the_last_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("aaaa")
    (tmp_path / "b.txt").write_text("bbbb")
    (tmp_path / "c.txt").write_text("cccc")
    corpus = load_corpus(DataConfig(source=str(tmp_path), eval_fraction=0.0, max_bytes=6))
    assert _text(corpus.train_tokens) == "aaaabb" and corpus.num_documents == 2


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(DataConfig(source=str(tmp_path / "missing.txt")))


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="matched no files"):
        load_corpus(DataConfig(source=str(tmp_path / "nothing-*.txt")))


def test_empty_file_and_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CorpusError, match="corpus is empty"):
        load_corpus(DataConfig(source=str(tmp_path / "empty.txt")))
    with pytest.raises(CorpusError, match="has no .txt/.md/.py files"):
        load_corpus(DataConfig(source=str(tmp_path / "sub")))


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: bad JSON"):
        load_corpus(DataConfig(source=str(path)))


def test_jsonl_missing_field_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(CorpusError, match=r"d\.jsonl:3: no 'text' field.*content"):
        load_corpus(DataConfig(source=str(path)))


def test_jsonl_non_string_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match="expected a string"):
        load_corpus(DataConfig(source=str(path)))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        DataConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="max_bytes"):
        DataConfig(max_bytes=0)


def test_eval_split_is_the_disjoint_tail(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(bytes(range(256)) * 8)
    corpus = load_corpus(DataConfig(source=str(path), eval_fraction=0.25))
    n_train, n_eval = len(corpus.train_tokens), len(corpus.eval_tokens)
    assert n_eval == round((256 * 8 + 1) * 0.25) and n_train + n_eval == 256 * 8 + 1
    # Views of one stream: the eval split starts exactly where train ends, no overlap.
    assert np.shares_memory(corpus.train_tokens, corpus.eval_tokens) is False
    assert corpus.train_tokens.base is corpus.eval_tokens.base
    assert not corpus.train_tokens.flags.writeable


def test_fingerprint_tracks_content_and_split(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("some text to hash " * 10)
    first = load_corpus(DataConfig(source=str(path))).fingerprint
    assert load_corpus(DataConfig(source=str(path))).fingerprint == first
    assert load_corpus(DataConfig(source=str(path), eval_fraction=0.2)).fingerprint != first
    path.write_text("other text to hash " * 10)
    assert load_corpus(DataConfig(source=str(path))).fingerprint != first


def test_stdlib_default() -> None:
    corpus = load_corpus(DataConfig())
    assert corpus.num_bytes == STDLIB_DEFAULT_MAX_BYTES
    assert corpus.num_documents > 100
    assert len(corpus.eval_tokens) > 0
    assert "def " in _text(corpus.train_tokens[:100_000])
    assert load_corpus(DataConfig()).fingerprint == corpus.fingerprint
    small = load_corpus(DataConfig(max_bytes=10_000))
    assert small.num_bytes == 10_000
    assert np.array_equal(small.train_tokens[:5000], corpus.train_tokens[:5000])
