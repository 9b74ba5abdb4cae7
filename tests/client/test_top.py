"""``framecast top``: the server's streams, through its JSON output and through a terminal (tmux).

Real servers on port 0 with real streams running from another thread; the command runs as a
real process (the installed ``framecast`` script).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framecast_client import AsyncClient, Client, StreamSession
from framecast_client.types import StreamView
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import make_settings

FRAMECAST = str(Path(sys.executable).with_name("framecast"))
TIMEOUT_S = 60.0
TOKEN = "top-secret-token-0123456789"
LONG_NAME = "gate-" + "x" * 95


def camera(stop: threading.Event, fps: float = 30.0) -> Iterator[NDArray[np.uint8]]:
    """Frames at ``fps`` until stopped."""
    frame = np.full((32, 32, 3), 7, dtype=np.uint8)
    while not stop.is_set():
        yield frame
        time.sleep(1 / fps)


@contextmanager
def streams(address: str, names: list[str], **client_args: Any) -> Iterator[list[StreamSession]]:
    """Realtime streams named ``names``, running (and answered) until the block ends."""
    stop = threading.Event()
    with Client(address, **client_args) as client:
        sessions = [client.stream(camera(stop), name=name) for name in names]
        try:
            for session in sessions:
                # Consumed on threads, as an application would.
                threading.Thread(target=lambda s=session: [None for _ in s], daemon=True).start()
            deadline = time.monotonic() + TIMEOUT_S
            while not all(s.stats.received >= 3 for s in sessions):
                assert time.monotonic() < deadline, "the streams were not answered"
                time.sleep(0.05)
            yield sessions
        finally:
            stop.set()
            for session in sessions:
                session.close()


def top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FRAMECAST, "top", *args], capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[BackgroundServer]:
    settings = make_settings(cache_dir, backend="null", max_batch=32, metrics_port=0)
    with BackgroundServer(settings) as server:
        yield server


def readme_top_command() -> list[str]:
    """The README's ``$ uv run framecast top ...`` line, as argv after ``top``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("$ uv run framecast top ")]
    return shlex.split(line.removeprefix("$ uv run framecast top "))


def test_top_json_lists_the_running_streams_with_their_names(server: BackgroundServer) -> None:
    """Runs the README's command, against this server."""
    address, *flags = readme_top_command()
    assert address == "localhost:50051"
    with streams(server.address, ["dock-3", LONG_NAME]):
        done = top(server.address, *flags)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    by_name = {s["name"]: s for s in listing["streams"]}
    assert set(by_name) == {"dock-3", LONG_NAME[:64]}
    for stream in by_name.values():
        assert stream["caller"]
        assert stream["frames_in"] >= 3
        assert stream["frames_out"] >= 3
        assert stream["p99_latency_ms"] > 0
        assert stream["started_unix_s"] <= listing["time_unix_s"]
    # A stream's name is never a metrics label.
    port = server.server.wiring.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert "dock-3" not in reply.read().decode()
    # Ended streams leave the listing.
    after = json.loads(top(server.address, "--json", "--once").stdout)
    assert after["streams"] == []


def test_async_client_lists_streams_as_the_client_does(server: BackgroundServer) -> None:
    async def listed_while_streaming() -> list[StreamView]:
        stop = threading.Event()
        async with (
            AsyncClient(server.address) as client,
            client.stream(camera(stop), name="yard-1", max_age=2.0) as session,
        ):
            async for _ in session:
                if session.stats.received >= 3:
                    break
            listed = await client.list_streams()
            stop.set()
        return listed

    (stream,) = asyncio.run(listed_while_streaming())
    assert stream.name == "yard-1"
    assert stream.max_age_ms == 2000
    assert stream.frames_in >= 3
    with streams(server.address, ["dock-3"]), Client(server.address) as client:
        (listed,) = client.list_streams()
    assert listed.name == "dock-3"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_shows_the_streams_live_in_a_terminal(server: BackgroundServer) -> None:
    socket = f"framecast-top-{os.getpid()}"
    tmux = ["tmux", "-L", socket]
    with streams(server.address, ["dock-3", "yard-1"]):
        subprocess.run(
            [*tmux, "new-session", "-d", "-x", "160", "-y", "20", FRAMECAST, "top",
             server.address],
            check=True,
            timeout=TIMEOUT_S,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + TIMEOUT_S
            screen = ""
            while not ("dock-3" in screen and "yard-1" in screen and "2 streams" in screen):
                assert time.monotonic() < deadline, f"top never showed the streams:\n{screen}"
                time.sleep(0.2)
                screen = subprocess.run(
                    [*tmux, "capture-pane", "-p"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=TIMEOUT_S,
                ).stdout
            assert "IN/S" in screen
            assert "AGE P99" in screen
            first = screen.splitlines()[0]
            # It refreshes: the header's clock moves on.
            deadline = time.monotonic() + TIMEOUT_S
            while screen.splitlines()[0] == first:
                assert time.monotonic() < deadline, "top did not refresh"
                time.sleep(0.2)
                screen = subprocess.run(
                    [*tmux, "capture-pane", "-p"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=TIMEOUT_S,
                ).stdout
            subprocess.run([*tmux, "send-keys", "C-c"], check=True, timeout=TIMEOUT_S)
        finally:
            subprocess.run([*tmux, "kill-server"], check=False, timeout=TIMEOUT_S)


def test_top_is_protected_like_the_classifier(cache_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{TOKEN}\n")
    settings = make_settings(cache_dir, backend="null", max_batch=32, auth_tokens=tokens)
    with BackgroundServer(settings) as server:
        refused = top(server.address, "--json", "--once")
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "UNAUTHENTICATED" in refused.stderr or "token" in refused.stderr
        with streams(server.address, ["dock-3"], token=TOKEN, allow_insecure_token=True):
            done = top(server.address, "--json", "--once", "--token", TOKEN, "--insecure-token")
        assert done.returncode == 0, done.stderr
        (stream,) = json.loads(done.stdout)["streams"]
        assert stream["name"] == "dock-3"
        assert stream["caller"] == "ops"


def test_the_id_column_fits_the_ids_of_every_worker() -> None:
    from framecast_client.top_cli import render
    from framecast_server.service.stream_board import START_SHIFT, WORKER_SHIFT

    # Worker 3's stream 7 after one restart, as the stream board numbers it (13 digits and
    # more), beside worker 0's stream 12: every id whole, and each column under its heading.
    ids = [3 << WORKER_SHIFT | 1 << START_SHIFT | 7, 12]
    view = StreamView(
        id=0, caller="camera-7", name="dock-3", started_unix_s=1.0e9, frames_in_per_s=30.0,
        frames_out_per_s=30.0, p99_latency_ms=4.0, p99_age_ms=5.0, frames_in=90,
        frames_out=90, dropped=0, max_age_ms=0, rate_hint_fps=30.0,
    )  # fmt: skip
    views = [dataclasses.replace(view, id=i) for i in ids]
    header, *rows = render("127.0.0.1:1", views, now=1.0e9 + 5).splitlines()[1:]
    assert len(str(ids[0])) >= 13
    for row, stream_id in zip(rows, ids, strict=True):
        assert row.split()[0] == str(stream_id)
        assert row.index("camera-7") == header.index("CALLER")
        assert row.index("dock-3") == header.index("NAME")
    assert header.split()[0] == "ID"
    assert header.endswith("SINCE")
