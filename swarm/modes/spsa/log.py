"""The replay log: each round's inline payloads, as the coordinator's rounds.jsonl records them.

A row holds the round, its entries as [peer id, payload hex] in manifest order, and the state hash
after the round. From any saved state of round r and the rows since, `replay` rebuilds every later
state bit for bit and checks each hash on the way, which is also what a joiner does with the
manifests in the DHT (docs/modes/spsa.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swarm.modes.base import TrainingMode
from swarm.state import GlobalState


class ReplayError(ValueError):
    """A log that does not continue the state, or a replayed round whose hash differs from the log's."""


def inline_entries(entries: Iterable[Any]) -> list[list[str]]:
    """[peer id, payload hex] of a manifest's inline entries, in manifest order."""
    return [[e.peer_id, e.inline.hex()] for e in entries if e.inline]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a rounds.jsonl that carry inline payloads, by round."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "inline" in r), key=lambda r: r["round"])


def replay(mode: TrainingMode, state: GlobalState, rows: list[dict[str, Any]], *, until: int | None = None) -> GlobalState:
    """Apply the logged rounds from state.round on (up to round `until`, exclusive), in place."""
    for row in rows:
        r = int(row["round"])
        if r < state.round:
            continue
        if until is not None and r >= until:
            break
        if r != state.round:
            raise ReplayError(f"the log jumps from round {state.round} to {r}")
        contributions = [(peer, bytes.fromhex(data)) for peer, data in row["inline"]]
        if contributions:
            mode.apply_inline(state, r, contributions)
        else:
            state.advance_without_update()
        if row.get("hash") and row["hash"] != state.hash:
            raise ReplayError(f"round {r}: replayed state {state.hash[:12]}, the log says {row['hash'][:12]}")
    return state
