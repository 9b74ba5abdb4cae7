"""Giving freed memory back to the operating system after bursts: part of the core, no gRPC.

glibc's malloc keeps freed memory for reuse, and a burst of large requests (8-image calls over
a hundred connections, thousands of streams) leaves hundreds of MB of it in the process's
arenas, freed but resident, long after the burst (measured: RSS 82 -> 392-640 MB five seconds
after such a burst; benchmarks/overload_soak.py). :class:`MemoryTrimmer` calls
``malloc_trim(0)`` (every arena, free pages in the middle of the heap too) once a second while
the server holds no work (the caller says when: ``quiet``), so RSS comes back within a second or
two of the load ending, and no call waits on malloc's locks while a trim runs.
Measured against the alternatives in the README's memory section.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["MemoryTrimmer", "malloc_trim"]

logger = logging.getLogger(__name__)
TRIM_INTERVAL_S = 1.0


def _libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to trim this way
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


_TRIM = _libc_trim()


def malloc_trim() -> bool:
    """Return free heap memory to the OS; True if some was (False where not glibc)."""
    return bool(_TRIM(0)) if _TRIM is not None else False


class MemoryTrimmer:
    """Trims the heap once per interval while ``quiet()`` says no work is held."""

    def __init__(self, quiet: Callable[[], bool], interval_s: float = TRIM_INTERVAL_S) -> None:
        self._quiet = quiet
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.trims = 0  # how many trims returned memory (for tests and logs)

    def start(self) -> None:
        if _TRIM is not None and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            # ctypes drops the GIL for the call: the loop goes on meanwhile.
            if self._quiet() and await asyncio.to_thread(malloc_trim):
                self.trims += 1
