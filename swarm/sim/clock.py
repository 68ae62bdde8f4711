"""Virtual time for asyncio: the real round code, run in one process, with a clock that jumps.

`VirtualLoop` is an ordinary asyncio event loop except for its clock: when no callback is ready it
moves its time straight to the next timer instead of waiting for it. Everything that awaits
`asyncio.sleep`, `asyncio.wait_for` or a timeout therefore runs unchanged, hours of simulated
rounds take seconds, and the order of events depends on the schedule alone: the same seed gives
the same trace. Work handed to threads (`asyncio.to_thread`) runs inline instead, at the moment it
is submitted, so no real thread races the virtual clock.

The round code reads time through `loop.time()` (monotonic in production) and the world's
`wall_time()` (the DHT's clock in production), never `time.monotonic()` directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each submitted call at once in the calling thread: deterministic `to_thread` for the simulator.
    (A ThreadPoolExecutor by type only, as asyncio requires of a default executor; it starts no thread.)"""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to the awaiting coroutine, as a thread's exception would be
            future.set_exception(e)
        return future


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock advances to the next timer whenever nothing is ready to run."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._now = start
        self.set_default_executor(InlineExecutor())

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        # CPython's loop computes its select() timeout from the first timer and `time()`; jumping
        # the clock to that timer first makes the timeout zero, so the loop never sleeps.
        ready: Any = getattr(self, "_ready")  # noqa: B009 (CPython internals, checked in __init__ of tests)
        scheduled: Any = getattr(self, "_scheduled")  # noqa: B009
        if not ready and scheduled:
            self._now = max(self._now, scheduled[0].when())
        super()._run_once()  # type: ignore[misc]

    def advance(self, seconds: float) -> None:
        """Move the clock forward by hand (between runs; the loop does it on its own while running)."""
        self._now += seconds


def run_virtual(main: Callable[[], Any], *, start: float = 0.0) -> Any:
    """Run the coroutine function `main` to completion on a fresh VirtualLoop; returns its result."""
    loop = VirtualLoop(start)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
