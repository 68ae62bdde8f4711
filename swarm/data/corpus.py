"""Corpus loading: text sources -> one byte-token stream, split into train and held-out eval.

Every source is read as a sequence of documents (a file, a JSONL record, a parquet row); each
document's bytes are followed by <eos>, the documents are concatenated in a fixed order, and the
last `eval_fraction` of that stream is the eval split. Nothing is downloaded and nothing is written.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.data.tokenizer import TOKEN_DTYPE, Tokenizer, load_tokenizer

STDLIB_SOURCE = "stdlib"
# The full stdlib is ~30 MB of .py; 8 MiB loads in well under a second and is ample for the
# nano/tiny presets. Pass max_bytes explicitly to read more.
STDLIB_DEFAULT_MAX_BYTES = 8 * 2**20
DIR_SUFFIXES = (".txt", ".md", ".py")
_GLOB_CHARS = "*?["
_FINGERPRINT_TAG = b"swarm-corpus-v1"


class CorpusError(ValueError):
    """The data source is missing, empty or malformed; the message says where."""


@dataclass
class DataConfig:
    """Where the training text comes from and how much of it is held out."""

    # "stdlib" (this interpreter's standard-library .py files), a file (.txt or any text,
    # .jsonl, .jsonl.gz, .parquet), a directory (recursive *.txt, *.md, *.py) or a glob.
    source: str = STDLIB_SOURCE
    text_field: str = "text"  # JSONL/parquet field that holds a document's text
    tokenizer: str = ""  # a BPE tokenizer.json (already checked against the run's hash); "" = bytes
    eval_fraction: float = 0.01  # tail of the token stream kept for evaluation, never trained on
    # Cap on document bytes read (documents are taken in order, the last one cut to fit).
    # None = the source's default: STDLIB_DEFAULT_MAX_BYTES for "stdlib", unlimited otherwise.
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("DataConfig.source must be non-empty")
        if not self.text_field:
            raise ValueError("DataConfig.text_field must be non-empty")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"DataConfig.max_bytes must be positive or None, got {self.max_bytes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return cls(**data)

    def effective_max_bytes(self) -> int | None:
        if self.max_bytes is None and self.source == STDLIB_SOURCE:
            return STDLIB_DEFAULT_MAX_BYTES
        return self.max_bytes


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus. Both arrays are read-only uint16 views of one stream."""

    train_tokens: np.ndarray  # (N_train,)
    eval_tokens: np.ndarray  # (N_eval,), the stream's tail; disjoint from train_tokens
    fingerprint: str  # sha256 hex of the token stream and split point; equal iff same corpus
    num_documents: int
    num_bytes: int  # document bytes, without the <eos> separators


_STDLIB_CACHE: dict[tuple[str, int | None, float, str], Corpus] = {}


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """Read, tokenise (bytes unless a BPE `tokenizer` is given) and split the corpus described by
    `cfg` (stdlib results cached in memory)."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer or None)
    if cfg.source != STDLIB_SOURCE:
        return _build_corpus(_iter_documents(cfg), cfg, tok)
    key = (stdlib_root(), cfg.effective_max_bytes(), cfg.eval_fraction, tok.sha256)
    if key not in _STDLIB_CACHE:
        _STDLIB_CACHE[key] = _build_corpus(_iter_documents(cfg), cfg, tok)
    return _STDLIB_CACHE[key]


def iter_documents(cfg: DataConfig) -> Iterator[bytes]:
    """The documents `cfg` names, in corpus order, up to its byte cap (what a tokenizer is trained on)."""
    return _take_bytes(_iter_documents(cfg), cfg.effective_max_bytes())


def corpus_fingerprint(stream: np.ndarray, num_train: int, tokenizer_sha256: str = "") -> str:
    """sha256 over a tag, the tokenizer's hash (none for bytes), the split point and the
    little-endian token bytes."""
    digest = hashlib.sha256(_FINGERPRINT_TAG)
    digest.update(tokenizer_sha256.encode())
    digest.update(int(num_train).to_bytes(8, "little"))
    digest.update(np.ascontiguousarray(stream, dtype="<u2").tobytes())
    return digest.hexdigest()


def _build_corpus(documents: Iterable[bytes], cfg: DataConfig, tok: Tokenizer) -> Corpus:
    docs = list(_take_bytes(documents, cfg.effective_max_bytes()))
    num_bytes = sum(len(d) for d in docs)
    if num_bytes == 0:
        raise CorpusError(f"corpus is empty: {cfg.source!r} yielded no text")
    encoded = tok.encode_documents(docs)
    stream = np.empty(sum(len(e) for e in encoded) + len(docs), dtype=TOKEN_DTYPE)
    pos = 0
    for ids in encoded:
        stream[pos : pos + len(ids)] = ids
        stream[pos + len(ids)] = tok.eos_id
        pos += len(ids) + 1
    num_eval = round(len(stream) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and num_eval == 0:
        num_eval = 1
    num_train = len(stream) - num_eval
    if num_train <= 0:
        raise CorpusError(f"corpus {cfg.source!r} too small to split: {len(stream)} tokens")
    stream.flags.writeable = False
    return Corpus(
        train_tokens=stream[:num_train],
        eval_tokens=stream[num_train:],
        fingerprint=corpus_fingerprint(stream, num_train, tok.sha256),
        num_documents=len(docs),
        num_bytes=num_bytes,
    )


def _take_bytes(documents: Iterable[bytes], max_bytes: int | None) -> Iterator[bytes]:
    """Non-empty documents in order until `max_bytes` is reached; the last one is cut to fit."""
    left = max_bytes
    for doc in documents:
        if not doc:
            continue
        if left is not None:
            doc = doc[:left]
            left -= len(doc)
        yield doc
        if left is not None and left <= 0:
            return


def _iter_documents(cfg: DataConfig) -> Iterator[bytes]:
    if cfg.source == STDLIB_SOURCE:
        for path in stdlib_paths():
            yield path.read_bytes()
        return
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        files = _dir_files(path)
        if not files:
            raise CorpusError(f"directory {str(path)!r} has no {'/'.join(DIR_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    elif any(c in cfg.source for c in _GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not files:
            raise CorpusError(f"glob {cfg.source!r} matched no files")
    else:
        raise CorpusError(f"data source not found: {cfg.source!r} (expected 'stdlib', a file, a directory or a glob)")
    for file in files:
        yield from _file_documents(file, cfg.text_field)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_paths() -> list[Path]:
    """The interpreter's standard-library .py files, sorted, without site-packages."""
    root = Path(stdlib_root())
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not paths:
        raise CorpusError(f"no standard-library .py files under {str(root)!r}")
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _dir_files(root: Path) -> list[Path]:
    """Text files under `root`, recursively, sorted by relative path; hidden dirs skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(DIR_SUFFIXES))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _file_documents(path: Path, text_field: str) -> Iterator[bytes]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path, text_field)
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, text_field)
    else:
        yield path.read_bytes()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[bytes]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{path}:{lineno}")
    except (OSError, EOFError) as exc:
        raise CorpusError(f"cannot read {str(path)!r}: {exc}") from exc


def _jsonl_text(line: bytes, text_field: str, where: str) -> bytes:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise CorpusError(f"{where}: bad JSON ({exc})") from exc
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{where}: no {text_field!r} field (found {keys})")
    text = record[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text.encode("utf-8")


def _parquet_documents(path: Path, text_field: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CorpusError(f"reading {str(path)!r} needs pyarrow (pip install pyarrow)") from exc
    table_file = pq.ParquetFile(path)
    if text_field not in table_file.schema_arrow.names:
        raise CorpusError(f"{path}: no {text_field!r} column (found {table_file.schema_arrow.names})")
    for batch in table_file.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text.encode("utf-8")
