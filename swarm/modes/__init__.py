"""Training modes: one module per mode, each defining `MODE`, a TrainingMode subclass.

The runtime (peer, coordinator, rounds, status page) only ever calls the TrainingMode interface
(base.py). A mode is found by name: `mode_class("spes")` imports `swarm.modes.spes.mode` and returns its
`MODE`, so adding a mode is adding a file here, with no registry to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.modes.base import TrainingMode
    from swarm.run import OuterConfig, RunConfig

_HELPERS = {"base", "replica"}  # modules here that are not modes (replica: the full-replica worker they share)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def available_modes() -> list[str]:
    """Names of the modes shipped in this package."""
    found = (m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return sorted(n for n in found if n not in _HELPERS and hasattr(importlib.import_module(f"{__name__}.{n}"), "MODE"))


@cache
def mode_class(name: str) -> type[TrainingMode]:
    """The TrainingMode class of a mode name; ValueError listing the choices if there is none."""
    if not isinstance(name, str) or not _NAME.match(name) or name in _HELPERS:
        raise ValueError(f"unknown training mode {name!r}; available: {', '.join(available_modes())}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"unknown training mode {name!r}; available: {', '.join(available_modes())}") from None
    mode = getattr(module, "MODE", None)
    if mode is None:
        raise ValueError(f"swarm/modes/{name} defines no MODE")
    return mode


def mode_for(run: RunConfig) -> TrainingMode:
    """The mode object of a run, its options validated: an unknown mode, an option the mode lacks or a
    setting that means nothing there is a ValueError. Whoever builds or reads a run description calls it."""
    return mode_class(run.mode)(run)


def default_outer(mode: str, dense_dtype: str = "fp32") -> OuterConfig:
    """The outer settings a mode recommends (its `TrainingMode.default_outer`)."""
    return mode_class(mode).default_outer(dense_dtype)
