"""Corpus shards named by content: manifest, which file a data shard reads, local and HTTP sources."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from swarm.data.corpus import CorpusError, DataConfig, load_corpus
from swarm.data.fetch import RunData, ShardError, ShardFetcher, check_identity
from swarm.data.shards import make_manifest, read_manifest, stream_slot, write_manifest
from swarm.net.schema import decode_record, encode_record
from swarm.run import CorpusShard, RunConfig, source_kind


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (a thread), and its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _shard(path: Path, sources: list[str]) -> CorpusShard:
    data = path.read_bytes()
    return CorpusShard(name=path.name, sha256=hashlib.sha256(data).hexdigest(), size=len(data), sources=sources)


def test_shard_records_are_validated():
    good: dict[str, Any] = {"name": "part-0.jsonl", "sha256": "ab" * 32, "size": 10}
    assert CorpusShard(**good).sources == ["swarm"]
    bad: list[dict] = [
        {"name": "../etc/passwd.txt"},
        {"name": "dir/part.jsonl"},
        {"name": "part.exe"},
        {"sha256": "AB" * 32},
        {"sha256": "ab" * 31},
        {"size": 0},
        {"sources": []},
        {"sources": ["ftp://host/part.jsonl"]},
        {"sources": [""]},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            CorpusShard(**{**good, **change})
    assert [source_kind(s) for s in ["swarm", "https://h/x", "http://h/x", "/data/x.jsonl", "x.jsonl"]] == [
        "swarm",
        "http",
        "http",
        "local",
        "local",
    ]


def test_every_data_shard_reads_one_file_and_no_window_twice():
    for num_files, num_shards in [(1, 4), (3, 8), (4, 4), (5, 1024), (0, 16)]:
        seen: dict[int, set[int]] = {}
        counts: dict[int, int] = {}
        for s in range(num_shards):
            f, sub, count = stream_slot(num_files, num_shards, s)
            assert 0 <= sub < count and ((num_files == 0 and f == 0) or 0 <= f < num_files)
            assert sub not in seen.setdefault(f, set())  # disjoint sub-streams within a file
            seen[f].add(sub)
            counts[f] = count
        assert all(seen[f] == set(range(counts[f])) for f in seen)  # every sub-stream has a reader
        assert stream_slot(num_files, num_shards, num_shards + 1) == stream_slot(num_files, num_shards, 1)


def test_manifest_round_trip_and_run_description(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["one", "two"])
    b = _jsonl(tmp_path / "b.jsonl", ["three"])
    shards = make_manifest([a, b], url_prefix="https://example.invalid/corpus/")
    assert shards[0].sources == [str(a.resolve()), "https://example.invalid/corpus/a.jsonl", "swarm"]
    assert shards[1].sha256 == hashlib.sha256(b.read_bytes()).hexdigest() and shards[1].size == b.stat().st_size
    write_manifest(shards, tmp_path / "corpus.json")
    assert read_manifest(tmp_path / "corpus.json") == shards
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "shards": [{"name": "a.jsonl", "sha256": "x", "size": 1}]}))
    with pytest.raises(ValueError, match="sha256"):
        read_manifest(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="manifest"):
        read_manifest(tmp_path / "missing.json")

    run = RunConfig(data_source="shards", corpus=shards, num_shards=4)
    assert decode_record(RunConfig, encode_record(run)).corpus == shards  # signed and read like any record
    with pytest.raises(ValueError, match="shards"):
        RunConfig(data_source="shards")
    with pytest.raises(ValueError, match="shards"):
        RunConfig(data_source="stdlib", corpus=shards)
    with pytest.raises(ValueError, match="num_shards"):
        RunConfig(data_source="shards", corpus=shards, num_shards=1)


def test_local_path_must_match_the_hash(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["the right text"])
    shard = _shard(a, [str(tmp_path / "absent.jsonl"), str(a)])
    fetcher = ShardFetcher(None, cache_dir=tmp_path / "cache")
    assert asyncio.run(fetcher.get(shard)) == a  # used in place, no copy
    assert not (tmp_path / "cache").exists()
    _jsonl(a, ["other text, same name"])
    wrong = hashlib.sha256(a.read_bytes()).hexdigest()
    with pytest.raises(ShardError) as err:
        asyncio.run(fetcher.get(shard))
    assert shard.sha256 in str(err.value) and wrong in str(err.value) and str(a) in str(err.value)


def test_http_sources_bad_copies_skipped_then_cached(tmp_path, http_dir):
    root, url = http_dir
    texts = [f"document {i} " * 50 for i in range(200)]
    good = _jsonl(root / "part-0.jsonl", texts)
    data = good.read_bytes()
    (root / "corrupt.jsonl").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    (root / "short.jsonl").write_bytes(data[:-5])
    shard = _shard(good, [f"{url}/corrupt.jsonl", f"{url}/missing.jsonl", f"{url}/short.jsonl", f"{url}/part-0.jsonl"])
    fetcher = ShardFetcher(None, cache_dir=tmp_path / "cache")
    path = asyncio.run(fetcher.get(shard))
    assert path == fetcher.cached_path(shard) and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.jsonl"]  # no partial file left
    good.unlink()  # the cache answers from now on, without the network
    assert asyncio.run(fetcher.get(shard)) == path

    shard2 = CorpusShard(name="x.jsonl", sha256=shard.sha256, size=shard.size, sources=[f"{url}/corrupt.jsonl", "swarm"])
    with pytest.raises(ShardError) as err:
        asyncio.run(ShardFetcher(None, cache_dir=tmp_path / "cache2").get(shard2))
    text = str(err.value)
    assert "hash to" in text and shard.sha256 in text and "not a swarm node" in text


def test_run_data_reads_its_shard_file_and_refuses_another_corpus(tmp_path):
    files = [_jsonl(tmp_path / f"p{i}.jsonl", [f"file {i} text number {j}. " * 20 for j in range(30)]) for i in range(3)]
    shards = [_shard(f, [str(f)]) for f in files]
    run = RunConfig(data_source="shards", corpus=shards, num_shards=8, eval_fraction=0.1)
    data = RunData(run, ShardFetcher(None, cache_dir=tmp_path / "cache"))
    for s in (0, 4, 7):
        corpus = asyncio.run(data.corpus(s))
        expected = load_corpus(DataConfig(source=str(files[s % 3]), eval_fraction=0.1))
        assert corpus.fingerprint == expected.fingerprint
        assert np.array_equal(corpus.train_tokens, expected.train_tokens)

    other = tmp_path / "other.txt"
    other.write_text("not the coordinator's text " * 100)
    mine = tmp_path / "mine.txt"
    mine.write_text("the coordinator's text " * 100)
    run = RunConfig(data_source=str(mine))
    stamped = asyncio.run(RunData(run, ShardFetcher(None)).stamp())
    assert stamped is not None and run.corpus_fingerprint == stamped.fingerprint and str(mine) in run.corpus_origin
    check_identity(run, stamped)
    theirs = load_corpus(DataConfig(source=str(other), eval_fraction=run.eval_fraction))
    with pytest.raises(CorpusError) as err:
        check_identity(run, theirs)
    assert run.corpus_fingerprint in str(err.value) and theirs.fingerprint in str(err.value)

    stdlib_run = RunConfig(data_source="stdlib", corpus_fingerprint="0" * 64, corpus_origin="the standard library of Python 2.7")
    with pytest.raises(CorpusError, match="differs between Python versions") as err:
        asyncio.run(RunData(stdlib_run, ShardFetcher(None)).corpus(0))
    assert "Python 2.7" in str(err.value) and "0" * 64 in str(err.value)


def test_cli_manifest_fetch_and_coordinator_data_flag(tmp_path, capsys):
    from launch.coordinator import build_run, parse_args
    from launch.data import main

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        _jsonl(folder / f"part-{i}.jsonl", [f"text {i}"])
    (folder / "notes.bin").write_bytes(b"not a shard")
    manifest = tmp_path / "corpus.json"
    assert main(["manifest", str(folder), "-o", str(manifest), "--url-prefix", "http://127.0.0.1:9/x"]) == 0
    shards = read_manifest(manifest)
    assert [s.name for s in shards] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    assert main(["fetch", str(manifest), "--cache-dir", str(tmp_path / "cache")]) == 0  # from the local paths
    assert "part-2.jsonl: " in capsys.readouterr().out

    run = build_run(parse_args(["--data", str(manifest)]))
    assert run.data_source == "shards" and run.corpus == shards

    (folder / "part-1.jsonl").unlink()  # and the URL points nowhere: that shard fails, clearly
    assert main(["fetch", str(manifest), "--cache-dir", str(tmp_path / "cache2")]) == 1
    assert "part-1.jsonl" in capsys.readouterr().err


def test_parquet_shards_with_the_extra(tmp_path, http_dir):
    pa = pytest.importorskip("pyarrow")  # the 'parquet' extra; in the test extra, so CI runs this
    import pyarrow.parquet as pq

    root, url = http_dir
    texts = [f"row {i}: " + "parquet text " * 30 for i in range(100)]
    pq.write_table(pa.table({"text": texts, "n": list(range(100))}), root / "part-0.parquet")
    shard = _shard(root / "part-0.parquet", [f"{url}/part-0.parquet"])
    run = RunConfig(data_source="shards", corpus=[shard], num_shards=2, eval_fraction=0.1)
    corpus = asyncio.run(RunData(run, ShardFetcher(None, cache_dir=tmp_path / "cache")).corpus(1))
    assert corpus.num_documents == 100 and corpus.num_bytes == sum(len(t.encode()) for t in texts)
