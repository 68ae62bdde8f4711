"""The architecture contract: the layers of docs/architecture.md, checked over the import graph.

Every import counts, typing-only ones and those inside functions included: a module imports only
modules of its own layer or of layers below it, the graph has no cycle, and `models/` imports
nothing of `swarm` (single-device model code, no networking). A change that breaks the layering
fails here with the offending import named.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("swarm", "models", "launch")

# Top layer first. A module belongs to the first (longest) prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("launch",),
    ("swarm.sim",),  # the simulator: the round code over an in-memory network on virtual time
    ("swarm.processes",),  # what runs as a process: volunteer, coordinator, roles, state download
    ("swarm.status",),  # the status page (reads the DHT only)
    ("swarm.round",),  # one round: agreement, leadership, admission, robust aggregation, payloads
    ("swarm.modes",),  # the training modes behind one interface, and their workers
    ("swarm.export",),  # Hugging Face export
    ("swarm.state",),  # the agreed state
    ("swarm.train",),  # optimizer, inner step, checkpoints, solo trainer, metric sinks
    ("swarm.data",),  # tokenizers, corpora, shards
    ("swarm.node",),  # what every swarm process runs: DHT node, transfer server, heartbeats
    ("swarm.net",),  # identities, records, DHT, transfers, files: the network layer
    ("swarm.codec", "models", "swarm.run", "swarm.log", "swarm"),  # the ground floor
]
EXACT = {"swarm"}  # the package's own __init__ only: a module no other prefix names is in no layer


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: Collection[str] = ()) -> Iterator[str]:
    """The modules an import statement of `module` (at `path`) names."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    for alias in node.names:
        full = f"{base}.{alias.name}"
        yield full if full in known else base  # `from pkg import submodule` imports the submodule only


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in its file)."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(module, path, node, known):
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or (module.startswith(prefix + ".") and prefix not in EXACT)) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), index)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return best[1]


def test_every_import_points_down_or_sideways():
    wrong = [
        f"{m} (layer {LAYERS[layer_of(m)][0]}) imports {d} (layer {LAYERS[layer_of(d)][0]}, above it)"
        for m, deps in import_graph().items()
        for d in deps
        if layer_of(d) < layer_of(m)
    ]
    assert not wrong, "imports running upward:\n" + "\n".join(sorted(wrong))


def test_models_import_nothing_of_the_swarm():
    wrong = [
        f"{m} imports {d}" for m, deps in import_graph().items() if m.startswith("models") for d in deps if d.startswith("swarm")
    ]
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_contract_sees_what_it_must():
    """The checks above are not vacuous: they find an upward import, a typing-only one and a cycle."""
    graph = import_graph()
    assert "swarm.net.dht" in graph["swarm.node"] and "swarm.modes.base" in graph["swarm.round.agreement"]
    assert layer_of("swarm.node") < layer_of("swarm.net.files") < layer_of("swarm.run")  # index 0 is the top
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # A typing-only import (under `if TYPE_CHECKING:`) is an edge like any other.
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from swarm.node import SwarmNode\n")
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "swarm.node"]
    assert found and list(_imported("swarm.net.files", ROOT / "swarm/net/files.py", found[0])) == ["swarm.node"]
