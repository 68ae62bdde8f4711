"""`swarm-data`: describe a corpus by content (a shard manifest) and pre-fetch its shards.

swarm-data manifest data/*.jsonl --url-prefix https://mirror.example/corpus -o corpus.json
swarm-coordinator --data corpus.json ...       # the run description carries the shard list
swarm-data fetch corpus.json                   # optional: fill the cache from paths and URLs
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from swarm.data.fetch import ShardError, ShardFetcher
from swarm.data.shards import make_manifest, read_manifest, write_manifest
from swarm.run import SHARD_SUFFIXES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarm-data", description="Corpus shards named by their sha256.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="hash shard files into a manifest for swarm-coordinator --data")
    m.add_argument("paths", nargs="+", help=f"shard files, or folders of them ({', '.join(SHARD_SUFFIXES)})")
    m.add_argument("-o", "--out", default="corpus.json", help="manifest to write (default %(default)s)")
    m.add_argument("--url-prefix", help="where the shards are also published over HTTP(S): URL = prefix/<file name>")
    m.add_argument("--no-local", action="store_true", help="do not list the local paths as sources")
    m.add_argument("--no-swarm", action="store_true", help="do not list the swarm as a source")
    f = sub.add_parser("fetch", help="download and verify every shard of a manifest into the cache (not from the swarm)")
    f.add_argument("manifest")
    f.add_argument("--cache-dir", help="default: $SWARM_CACHE_DIR or ~/.cache/swarm/shards")
    return p.parse_args(argv)


def shard_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"swarm-data: {name}: no such file or folder")
    if not files:
        raise SystemExit("swarm-data: no shard files found")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "manifest":
        try:
            shards = make_manifest(
                shard_files(args.paths), url_prefix=args.url_prefix, local=not args.no_local, swarm=not args.no_swarm
            )
        except ValueError as e:
            raise SystemExit(f"swarm-data: {e}") from None
        write_manifest(shards, args.out)
        total = sum(s.size for s in shards)
        print(f"{args.out}: {len(shards)} shards, {total / 2**20:.1f} MiB; use it with: swarm-coordinator --data {args.out}")
        return 0
    try:
        shards = read_manifest(args.manifest)
    except ValueError as e:
        raise SystemExit(f"swarm-data: {e}") from None
    fetcher = ShardFetcher(None, cache_dir=args.cache_dir)
    failed = 0
    for shard in shards:
        try:
            print(f"{shard.name}: {asyncio.run(fetcher.get(shard))}")
        except ShardError as e:
            print(f"swarm-data: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
