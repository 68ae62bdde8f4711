"""Getting a run's corpus onto this machine: each shard verified against its sha256, cached, served.

`ShardFetcher.get(shard)` returns a local file holding exactly the shard's bytes. It tries the
cache (SWARM_CACHE_DIR, default ~/.cache/swarm/shards, one folder per sha256), then the shard's
sources in order: a local path is used in place if it hashes right and is an error naming both
hashes if it does not (the operator pointed at the wrong file: never fall back silently); an
HTTP(S) URL is streamed to the cache with its length and hash checked, and a bad one is skipped for
the next source; "swarm" asks the coordinator and the holders in the DHT (swarm/net/files.py).
Every shard a node holds is served to the others. Downloads show a progress bar on stderr when it
is a terminal.

`RunData.corpus(data_shard)` is what a role reads: the one shard file of a sharded run, or the
run's own data source, whose token fingerprint must equal the one the coordinator signed into the
run description (the 'stdlib' corpus differs between Python versions: such a peer is refused).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from swarm import __version__
from swarm.data.corpus import STDLIB_SOURCE, Corpus, CorpusError, DataConfig, load_corpus
from swarm.data.shards import stream_slot
from swarm.data.tokenizer import run_tokenizer_source
from swarm.log import get_logger
from swarm.net.files import PIECE_BYTES, FileFetchError, FileService, file_sha256
from swarm.run import CorpusShard, source_kind

if TYPE_CHECKING:
    from swarm.run import RunConfig

logger = get_logger(__name__)


class ShardError(CorpusError):
    """A shard that could not be had with the right bytes; the message says what each source did."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm" / "shards")


class _Bar:
    """A byte progress bar on stderr when it is a terminal (never in tests or logs to a file)."""

    def __init__(self, total: int, desc: str, enabled: bool | None):
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc[:40], unit="B", unit_scale=True, file=sys.stderr, leave=False)

    def __call__(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ShardFetcher:
    """Local files for corpus shards, from the cache, local paths, HTTP(S) or the swarm."""

    def __init__(
        self,
        files: FileService | None,
        *,
        cache_dir: str | Path | None = None,
        coordinator: str = "",
        http_timeout_s: float = 60.0,
        progress: bool | None = None,
    ):
        """files: the node's file service (None: no swarm source, nothing served).
        coordinator: peer id tried first for 'swarm' sources. progress: None = when stderr is a terminal."""
        self.files = files
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.coordinator = coordinator
        self.http_timeout_s = http_timeout_s
        self.progress = progress

    def cached_path(self, shard: CorpusShard) -> Path:
        return self.cache_dir / shard.sha256 / shard.name

    async def get(self, shard: CorpusShard) -> Path:
        """A local file with exactly the shard's bytes (served to other nodes from now on)."""
        cached = self.cached_path(shard)
        if await asyncio.to_thread(_holds, cached, shard):
            return await self._serve(shard, cached)
        failures: list[str] = []
        for source in shard.sources:
            kind = source_kind(source)
            start = time.monotonic()
            bar = _Bar(shard.size, f"{shard.name} ({kind})", self.progress)
            try:
                if kind == "local":
                    path = await self._local(shard, Path(source).expanduser(), bar)
                    if path is None:
                        failures.append(f"{source}: no such file")
                        continue
                elif kind == "http":
                    path = await asyncio.to_thread(self._http, source, shard, cached, bar)
                elif self.files is None:
                    failures.append("swarm: this process is not a swarm node")
                    continue
                else:
                    holders = [self.coordinator] if self.coordinator else []
                    path = await self.files.fetch(shard.sha256, cached, shard.size, holders=holders, progress=bar)
            except (ShardError, FileFetchError) as e:
                if isinstance(e, ShardError) and kind == "local":
                    raise
                failures.append(str(e))
                logger.warning("shard %s: %s", shard.name, e)
                continue
            finally:
                bar.close()
            elapsed = time.monotonic() - start
            logger.info("shard %s: %d bytes from %s in %.1fs, sha256 verified", shard.name, shard.size, source[:80], elapsed)
            return await self._serve(shard, path)
        raise ShardError(
            f"shard {shard.name} ({shard.sha256[:12]}, {shard.size} bytes): no source delivered it: " + "; ".join(failures)
        )

    async def serve_available(self, shards: list[CorpusShard]) -> int:
        """Serve every shard already on this machine (cache or a local source); never downloads."""
        served = 0
        for shard in shards:
            candidates = [self.cached_path(shard)] + [Path(s).expanduser() for s in shard.sources if source_kind(s) == "local"]
            for path in candidates:
                if await asyncio.to_thread(_holds, path, shard):
                    await self._serve(shard, path)
                    served += 1
                    break
        if shards:
            logger.info("serving %d of the corpus's %d shards", served, len(shards))
        return served

    async def _serve(self, shard: CorpusShard, path: Path) -> Path:
        if self.files is not None and not self.files.serves(shard.sha256):
            await self.files.serve(path, sha256=shard.sha256)
        return path

    async def _local(self, shard: CorpusShard, path: Path, bar: _Bar) -> Path | None:
        if not path.is_file():
            return None
        digest = await asyncio.to_thread(file_sha256, path, bar)
        if digest != shard.sha256:
            raise ShardError(
                f"local file {str(path)!r} is not shard {shard.name} of this run: it has sha256 {digest}, "
                f"the run description names {shard.sha256}"
            )
        return path

    def _http(self, url: str, shard: CorpusShard, dest: Path, bar: _Bar) -> Path:
        """Stream one URL into dest (blocking): length and sha256 checked before dest appears."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
        request = urllib.request.Request(url, headers={"User-Agent": f"swarm/{__version__}"})
        digest, done = hashlib.sha256(), 0
        try:
            with urllib.request.urlopen(request, timeout=self.http_timeout_s) as response, open(part, "wb") as out:
                announced = response.headers.get("Content-Length")
                if announced is not None and announced.isdigit() and int(announced) != shard.size:
                    raise ShardError(f"{url}: the server offers {announced} bytes, the run names {shard.size}")
                while piece := response.read(PIECE_BYTES):
                    done += len(piece)
                    if done > shard.size:
                        raise ShardError(f"{url}: more than the {shard.size} bytes the run names")
                    digest.update(piece)
                    out.write(piece)
                    bar(done)
            if done != shard.size:
                raise ShardError(f"{url}: {done} bytes, the run names {shard.size}")
            if digest.hexdigest() != shard.sha256:
                raise ShardError(f"{url}: the bytes hash to {digest.hexdigest()}, the run names {shard.sha256}")
            os.replace(part, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as e:
            if isinstance(e, ShardError):
                raise
            raise ShardError(f"{url}: {type(e).__name__}: {e}") from None
        finally:
            part.unlink(missing_ok=True)


def _holds(path: Path, shard: CorpusShard) -> bool:
    try:
        return path.is_file() and path.stat().st_size == shard.size and file_sha256(path) == shard.sha256
    except OSError:
        return False


def data_config(run: RunConfig, source: str | None = None) -> DataConfig:
    return DataConfig(
        source=source or run.data_source,
        text_field=run.text_field,
        eval_fraction=run.eval_fraction,
        max_bytes=run.data_max_bytes,
        tokenizer=run_tokenizer_source(run),  # put in the cache by obtain_run_tokenizer when the node joined
    )


def corpus_origin(source: str) -> str:
    """Words for where an unsharded corpus came from, for the run description and errors."""
    if source == STDLIB_SOURCE:
        return f"the standard library of Python {platform.python_version()}"
    return f"{source!r}"


def check_identity(run: RunConfig, corpus: Corpus) -> None:
    """Refuse an unsharded corpus whose tokens differ from the one the coordinator signed."""
    if run.corpus or not run.corpus_fingerprint or corpus.fingerprint == run.corpus_fingerprint:
        return
    hint = ""
    if run.data_source == STDLIB_SOURCE:
        hint = (
            " The 'stdlib' corpus is the interpreter's own standard library and differs between Python versions:"
            " join with the coordinator's Python version, or have the coordinator publish its corpus as shards"
            " (swarm-data manifest) so every peer downloads the same bytes."
        )
    raise CorpusError(
        f"this peer's corpus is not the run's: the run trains on {run.corpus_origin or run.data_source} with token "
        f"fingerprint {run.corpus_fingerprint}, this peer read {corpus_origin(run.data_source)} with fingerprint "
        f"{corpus.fingerprint}.{hint}"
    )


def shard_file(run: RunConfig, data_shard: int) -> int | None:
    """Which of the run's corpus files a data shard reads (None: the run has one unsharded source)."""
    return stream_slot(len(run.corpus), run.num_shards, data_shard)[0] if run.corpus else None


class RunData:
    """The corpus of a run as one node reads it."""

    def __init__(self, run: RunConfig, fetcher: ShardFetcher):
        self.run = run
        self.fetcher = fetcher

    async def corpus(self, data_shard: int) -> Corpus:
        """The tokens a role with this data shard reads: its shard file, or the run's whole source."""
        index = shard_file(self.run, data_shard)
        if index is not None:
            path = await self.fetcher.get(self.run.corpus[index])
            return await asyncio.to_thread(load_corpus, data_config(self.run, str(path)))
        corpus = await asyncio.to_thread(load_corpus, data_config(self.run))
        check_identity(self.run, corpus)
        return corpus

    async def stamp(self) -> Corpus | None:
        """On the coordinator: sign the identity of an unsharded corpus into the run (once; a restarted
        coordinator whose data changed is refused) and return it; nothing to do for shards."""
        if self.run.corpus:
            return None
        corpus = await asyncio.to_thread(load_corpus, data_config(self.run))
        if not self.run.corpus_fingerprint:
            self.run.corpus_fingerprint = corpus.fingerprint
            self.run.corpus_origin = corpus_origin(self.run.data_source)
        check_identity(self.run, corpus)
        return corpus
