"""Freed memory back to the operating system (memory.py), with the real glibc malloc_trim."""

from __future__ import annotations

import asyncio
import ctypes.util

import pytest
from framecast_server.core.memory import MemoryTrimmer, malloc_trim

glibc = pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no libc to trim")


def _churn() -> None:
    # Many small objects (the heap, not mmap), then freed: memory malloc keeps for reuse.
    blocks = [bytes(4000) for _ in range(20_000)]
    del blocks


@glibc
def test_malloc_trim_returns_memory_freed_on_the_heap() -> None:
    _churn()
    assert malloc_trim() is True


@glibc
async def test_the_trimmer_trims_only_while_quiet() -> None:
    quiet = False
    trimmer = MemoryTrimmer(lambda: quiet, interval_s=0.01)
    trimmer.start()
    try:
        _churn()
        await asyncio.sleep(0.1)
        assert trimmer.trims == 0
        quiet = True
        for _ in range(200):
            if trimmer.trims:
                break
            await asyncio.sleep(0.01)
        assert trimmer.trims >= 1
    finally:
        await trimmer.stop()
