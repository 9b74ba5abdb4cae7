"""Shared-memory blocks a killed `--inference shared` run left are removed by the next start.

A real server (`serve --workers 2 --inference shared`) killed with SIGKILL, with every process
it started (the resource tracker among them, as when a container is killed), leaves its blocks
in /dev/shm; the next server's supervisor removes them before it makes its own, and its clean
shutdown leaves none. The sweep itself against real processes: a dead owner's block goes, a
live owner's stays, and one named after a pid now given to another process goes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

import pytest
from framecast_server.process.shared_inference.blocks import (
    PREFIX,
    SHM_DIR,
    block_name,
    sweep_stale_blocks,
)
from support import serve_workers, wait_until

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory in /dev/shm")


def blocks_of(pid: int) -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(f"{PREFIX}{pid}_")}


def descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, and by those, from /proc."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split()
            found.extend(int(c) for c in children)
            pending.extend(int(c) for c in children)
    return found


def make_block(name: str) -> None:
    block = shared_memory.SharedMemory(name=name, create=True, size=64)
    block.close()
    # The test removes it by the sweep, not by this process's resource tracker.
    from multiprocessing import resource_tracker

    resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]


def test_the_sweep_removes_blocks_of_owners_that_are_gone_only() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "gone": block_name(gone.pid),
            "alive": block_name(alive.pid),
            # The pid of a live process, with another start time: a predecessor's block.
            "reused": f"{PREFIX}{alive.pid}_1_0badf00d",
        }
        for name in names.values():
            make_block(name)
        removed = sweep_stale_blocks()
        assert names["gone"] in removed
        assert names["reused"] in removed
        assert names["alive"] not in removed
        assert (SHM_DIR / names["alive"]).exists()
        assert not (SHM_DIR / names["gone"]).exists()
    finally:
        alive.kill()
        alive.wait()
    assert names["alive"] in sweep_stale_blocks()  # its owner is gone now


@pytest.mark.timeout(300)
def test_blocks_of_a_killed_server_are_removed_by_the_next_start(
    cache_dir: Path, tmp_path: Path
) -> None:
    for run in ("killed", "next"):
        (tmp_path / run).mkdir()
    with serve_workers(cache_dir, tmp_path / "killed", inference="shared") as killed:
        supervisor = killed.process.pid
        left = blocks_of(supervisor)
        # The counters and one region per front end, named after the supervisor.
        assert len(left) == 3, sorted(p.name for p in SHM_DIR.iterdir())
        for pid in [supervisor, *descendants(supervisor)]:
            os.kill(pid, signal.SIGKILL)
        killed.process.wait()
        # Nothing ran to remove them (the resource tracker was killed too).
        assert blocks_of(supervisor) == left
    with serve_workers(cache_dir, tmp_path / "next", inference="shared") as following:
        assert not any((SHM_DIR / name).exists() for name in left)
        assert "left by a killed run" in following.log.read_text()
        own = blocks_of(following.process.pid)
        assert len(own) == 3
    wait_until(lambda: not blocks_of(following.process.pid), "a clean stop to remove its blocks")
