"""A corpus named by content: manifests of shard files, and which shard a peer reads.

(`CorpusShard`, one entry of the run description's shard list, lives with the run in swarm/run.py.)

A big corpus is many files (JSONL, JSONL.gz, parquet or plain text). The run description lists
each one as a `CorpusShard`: its file name (which says its format), the sha256 and size of its
bytes, and where to get it: local paths, HTTP(S) URLs, or "swarm" (any node of the run that holds
it). The hash is the shard's identity; a source is only a hint where to look, and every copy is
checked against the hash before it is read (swarm/data/fetch.py).

Each data shard index s (a peer's role, 0 <= s < num_shards) reads exactly one file,
f = s mod F, and within it the sub-stream s // F of the data shards mapped to that file, so a peer
downloads one file and peers never share a window within an epoch. Every file's last
`eval_fraction` is held out on every peer; eval loss is measured on file 0's held-out tail.
"""

from __future__ import annotations

import json
from pathlib import Path

from swarm.run import SWARM, CorpusShard

MANIFEST_VERSION = 1


def stream_slot(num_files: int, num_shards: int, data_shard: int) -> tuple[int, int, int]:
    """(file index, sub-shard, sub-shards of that file) read by one data shard.

    With no shard list (num_files == 0) the whole corpus is one stream: (0, s, num_shards).
    """
    s = data_shard % num_shards
    if num_files == 0:
        return 0, s, num_shards
    f = s % num_files
    return f, s // num_files, (num_shards - f + num_files - 1) // num_files


def read_manifest(path: str | Path) -> list[CorpusShard]:
    """A shard list written by write_manifest (`swarm-data manifest`); ValueError on anything off."""
    from swarm.net.schema import SchemaError, from_plain

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read corpus manifest {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("shards"), list):
        raise ValueError(f"{path}: not a version-{MANIFEST_VERSION} corpus manifest ({{'version': 1, 'shards': [...]}})")
    try:
        shards = [from_plain(CorpusShard, item, f"{path}: shard {i}") for i, item in enumerate(data["shards"])]
    except SchemaError as e:
        raise ValueError(str(e)) from None
    if not shards:
        raise ValueError(f"{path}: the manifest lists no shard")
    return shards


def write_manifest(shards: list[CorpusShard], path: str | Path) -> None:
    from swarm.net.schema import to_plain

    Path(path).write_text(json.dumps({"version": MANIFEST_VERSION, "shards": to_plain(shards)}, indent=1) + "\n")


def make_manifest(
    paths: list[Path], *, url_prefix: str | None = None, local: bool = True, swarm: bool = True
) -> list[CorpusShard]:
    """Hash local files into a shard list; sources: the path itself, url_prefix + name, the swarm."""
    from swarm.net.files import file_sha256

    shards = []
    for path in paths:
        sources = [str(path.resolve())] if local else []
        if url_prefix:
            sources.append(url_prefix.rstrip("/") + "/" + path.name)
        if swarm:
            sources.append(SWARM)
        shards.append(CorpusShard(name=path.name, sha256=file_sha256(path), size=path.stat().st_size, sources=sources))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"two shards share a file name: {sorted(n for n in names if names.count(n) > 1)}")
    return shards
