"""Say, before the server starts, why it could not listen where it is asked to.

gRPC reports any failed bind as "Failed to bind to address"; a plain socket tells the cases
apart: the port is taken (and, on Linux, by which process), the address is not one of this
host's, or the name does not resolve. Standard library only.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

__all__ = ["bind_problem", "port_owner"]


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, in one sentence; None when it can.

    Port 0 (any free port) is checked for the address only. Like the server, the probe does
    not set SO_REUSEPORT, so a port another server holds counts as taken.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR as servers set it: a port in TIME_WAIT is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
            probe.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                owner = port_owner(port)
                by = f" by {owner}" if owner else ""
                return f"port {port} on {host} is already in use{by}"
            if exc.errno == errno.EADDRNOTAVAIL:
                return (
                    f"{host} is not an address of this host (use 0.0.0.0 for all, "
                    "127.0.0.1 for loopback)"
                )
            if exc.errno == errno.EACCES:
                return f"not allowed to listen on port {port} (ports below 1024 need privileges)"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def port_owner(port: int) -> str | None:
    """``pid N (name)`` of a process listening on TCP ``port``, where /proc tells; else None."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    proc = Path("/proc")
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    name = (pid_dir / "comm").read_text().strip()
                    return f"pid {pid_dir.name} ({name})"
        except OSError:
            continue  # another user's process, or gone meanwhile
    return "another process"


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port``, from /proc/net/tcp and tcp6 (Linux)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(inode)
    return found
