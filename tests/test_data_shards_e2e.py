"""A volunteer with nothing but the join address gets its corpus shard: a corrupted HTTP copy is
rejected, the swarm (the coordinator) delivers the right bytes, and the peer trains on them."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launch.cluster import LocalCluster, nano_run, wait_for
from swarm.net.schema import to_plain
from swarm.run import CorpusShard

pytestmark = pytest.mark.slow


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_peer_gets_its_shard_from_the_swarm_after_a_corrupt_http_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    www, coordinator_cache, peer_cache = tmp_path / "www", tmp_path / "coordinator-cache", tmp_path / "peer-cache"
    www.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    shards = []
    for i in range(2):
        name = f"part-{i}.jsonl"
        lines = [json.dumps({"text": f"shard {i} document {j}: " + "the quick brown fox jumps. " * 20}) for j in range(60)]
        data = ("\n".join(lines) + "\n").encode()
        shard = CorpusShard(
            name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data), sources=[f"{url}/{name}", "swarm"]
        )
        (coordinator_cache / shard.sha256).mkdir(parents=True)
        (coordinator_cache / shard.sha256 / name).write_bytes(data)  # only the coordinator holds the corpus
        (www / name).write_bytes(data.replace(b"fox", b"cat", 1))  # the mirror's copy is corrupted
        shards.append(shard)
    run = nano_run(data_source="shards", corpus=to_plain(shards), num_shards=4)
    try:
        monkeypatch.setenv("SWARM_CACHE_DIR", str(coordinator_cache))
        with LocalCluster(tmp_path / "cluster", run) as cluster:
            monkeypatch.setenv("SWARM_CACHE_DIR", str(peer_cache))
            cluster.add_peer("p0", max_rounds=2)
            wait_for(lambda: cluster.rounds_completed(1) >= 1, 150, "a round trained on the fetched shard", cluster)
            log = cluster.log("p0")
            assert f"{url}/part-0.jsonl: the bytes hash to" in log, log[-3000:]
            assert "shard part-0.jsonl: " in log and "from swarm" in log
            assert "serving 2 of the corpus's 2 shards" in cluster.log("coordinator")
        got = (peer_cache / shards[0].sha256 / "part-0.jsonl").read_bytes()
        assert hashlib.sha256(got).hexdigest() == shards[0].sha256
        assert not (peer_cache / shards[1].sha256).exists()  # a peer downloads only what its role reads
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
