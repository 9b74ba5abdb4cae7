"""Names of the shared-memory blocks, and the sweep of those a killed run left behind.

A clean shutdown removes every block (:func:`.link.unlink_link`), but a run whose processes
were all killed (SIGKILL, the OOM killer, a container stopped hard: the resource tracker goes
with them) leaves its blocks in /dev/shm, memory that nothing frees until a reboot. So each
block is named after the process that makes it: ``framecast_<pid>_<start>_<random>``, where
``start`` is when that process started (/proc/<pid>/stat), which tells a live owner from a
later process given the same pid. A supervisor starting up removes the blocks of this user
whose owner is gone (:func:`sweep_stale_blocks`) before it makes its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["PREFIX", "block_name", "sweep_stale_blocks"]

PREFIX = "framecast_"
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory; elsewhere nothing is swept
_NAME = re.compile(rf"^{PREFIX}(\d+)_(\d+)_[0-9a-f]+$")


def _started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return 0  # unreadable: treated as alive and unknown
    # Field 22 (starttime); the command name before it is in parentheses and may hold spaces.
    return int(stat.rpartition(")")[2].split()[19])


def block_name(pid: int | None = None) -> str:
    """A new block's name: this process (or ``pid``) as its owner."""
    owner = os.getpid() if pid is None else pid
    return f"{PREFIX}{owner}_{_started(owner) or 0}_{secrets.token_hex(4)}"


def _stale(pid: int, started: int) -> bool:
    now = _started(pid)
    if now is None:
        return True  # the owner is gone
    # Alive: the owner, unless the pid was given to a later process (a restarted container's
    # supervisor often gets the pid of the one before); an unknown start time keeps the block.
    return 0 not in (now, started) and now != started


def sweep_stale_blocks(directory: Path = SHM_DIR) -> list[str]:
    """Remove this user's blocks whose owner process is gone; returns their names."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    uid = os.getuid()
    for path in directory.iterdir():
        found = _NAME.match(path.name)
        if found is None:
            continue
        with contextlib.suppress(FileNotFoundError):  # another supervisor swept it first
            if path.stat().st_uid != uid or not _stale(int(found[1]), int(found[2])):
                continue
            path.unlink()
            removed.append(path.name)
    if removed:
        logger.info(
            "removed %d shared-memory block(s) left by a killed run: %s",
            len(removed),
            ", ".join(sorted(removed)),
        )
    return removed
