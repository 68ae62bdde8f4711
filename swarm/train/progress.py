"""A tqdm progress bar for training loops that logging can write around without tearing it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class _Bar:
    def __init__(self, bar: tqdm | None) -> None:
        self._bar = bar

    def update(self, loss: float, tokens_per_s: float) -> None:
        """Advance one step and show the latest loss and throughput."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.3f} | {tokens_per_s:,.0f} tok/s", refresh=False)
            self._bar.update(1)


@contextlib.contextmanager
def progress_bar(*, total: int, initial: int, enabled: bool) -> Iterator[_Bar]:
    """A bar over steps [initial, total) on stderr, or a no-op when not `enabled`."""
    if not enabled:
        yield _Bar(None)
        return
    loggers = [logging.getLogger(name) for name in ("swarm", "launch", "models")]
    with (
        logging_redirect_tqdm(loggers=loggers),
        tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True) as bar,
    ):
        yield _Bar(bar)
