"""`framecast stream` against an in-process server on the NullBackend."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framecast_client import Client, StreamSession
from framecast_client.cli import main
from framecast_client.streaming import DEFAULT_KEEPALIVE_S
from framecast_server.process.background import BackgroundServer
from PIL import Image
from support import HoldableNullBackend, make_settings, wait_until

LIVE_LINE = re.compile(
    r"^\[\s*[\d.]+s\] last [\d.]+s: in\s+[\d.]+ fps, out\s+[\d.]+ fps, p50 .+ ms, p99 .+ ms "
    r"\|\| totals: in flight\s+\d+, dropped \d+, errors \d+, disconnects \d+$"
)


@pytest.fixture(scope="module")
def null_server(cache_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(make_settings(cache_dir, backend="null", max_batch=32)) as server:
        yield server


def summary_numbers(out: str) -> dict[str, int]:
    match = re.search(r"read (\d+), sent (\d+), results (\d+) \((\d+) errors\), dropped (\d+)", out)
    assert match is not None, out
    keys = ("read", "sent", "results", "errors", "dropped")
    return dict(zip(keys, map(int, match.groups()), strict=True))


def test_stream_a_synthetic_camera_prints_live_lines_and_a_summary(
    null_server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["stream", "synthetic:320x240@30", "--address", null_server.address, "--duration", "2.5"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    live = [line for line in lines if line.startswith("[")]
    assert live, out
    assert all(LIVE_LINE.match(line) for line in live), live
    assert "framecast stream: synthetic 320x240 @ 30 fps -> " in out
    assert "realtime mode" in out
    numbers = summary_numbers(out)
    assert numbers["results"] > 0
    assert numbers["errors"] == 0
    assert re.search(r"latency\s+p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms", out), out
    assert re.search(r"\d+ disconnects, \d+ reconnects", out), out


def test_stream_a_directory_is_lossless_and_ends_with_the_source(
    null_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(20):
        Image.fromarray(np.full((40, 40, 3), i, dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    code = main(["stream", str(tmp_path), "--address", null_server.address, "--top-k", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "lossless mode" in out
    assert summary_numbers(out) == {
        "read": 20,
        "sent": 20,
        "results": 20,
        "errors": 0,
        "dropped": 0,
    }


def test_keepalive_can_be_set_or_turned_off(
    null_server: BackgroundServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passed: list[float | None] = []
    real_stream = Client.stream

    def spy(self: Client, *args: Any, **kwargs: Any) -> StreamSession:
        passed.append(kwargs["keepalive_s"])
        return real_stream(self, *args, **kwargs)

    monkeypatch.setattr(Client, "stream", spy)
    for keepalive in ("5", "off", None):
        args = ["stream", "synthetic:64x48@30", "--address", null_server.address]
        args += ["--duration", "0.5"] + (["--keepalive", keepalive] if keepalive else [])
        code = main(args)
        out = capsys.readouterr().out
        assert code == 0, out
        assert summary_numbers(out)["errors"] == 0
    assert passed == [5.0, None, DEFAULT_KEEPALIVE_S]
    with pytest.raises(SystemExit) as bad:
        main(["stream", "synthetic", "--keepalive", "-1"])
    assert bad.value.code == 2
    assert "--keepalive: must be more than 0" in capsys.readouterr().err


def test_a_bad_source_exits_2_with_the_reason(
    null_server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["stream", "synthetic:big", "--address", null_server.address])
    assert code == 2
    assert "expected synthetic" in capsys.readouterr().err


def test_bad_numbers_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["stream", "synthetic", "--max-in-flight", "0"])
    assert caught.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_stream_summary_lists_errors_by_reason_and_the_failed_inputs(
    null_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), i, dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "02.png").write_text("not a picture")
    (tmp_path / "04.png").write_text("nor this")
    code = main(["stream", str(tmp_path), "--address", null_server.address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert summary_numbers(out)["errors"] == 2
    assert re.search(r"errors\s+2 x INVALID_ARGUMENT \(client\): cannot decode", out), out
    assert f"failed      {tmp_path / '02.png'}, {tmp_path / '04.png'}" in out
    # The live lines include the last, partial second: every result is in one of them.
    live = [line for line in out.splitlines() if line.startswith("[")]
    assert live, out
    assert all(LIVE_LINE.match(line) for line in live), live


def test_name_and_max_age_reach_the_server_and_max_age_drops_are_reported(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = HoldableNullBackend()
    server = start_server(backend_instance=backend)
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), i, dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    name = "dock-3/" + "x" * 93  # cut to 64 characters
    args = ["stream", str(tmp_path), "--address", server.address, "--max-in-flight", "2"]
    args += ["--name", name, "--max-age", "200"]
    codes: list[int] = []
    backend.hold()
    cli = threading.Thread(target=lambda: codes.append(main(args)))
    cli.start()
    try:
        with Client(server.address) as client:
            listed = client.list_streams
            wait_until(
                lambda: backend.entered.is_set() and listed(), "the held stream", seen=listed
            )
            (stream,) = listed()
        assert stream.name == name[:64]
        assert stream.max_age_ms == 200
        # The frames behind the held one (in the server's queue, and read and prepared on the
        # client) grow older than the max age.
        time.sleep(0.5)
    finally:
        backend.release()
        cli.join()
    out = capsys.readouterr().out
    assert codes == [0], out
    numbers = summary_numbers(out)
    assert numbers["results"] == 6
    match = re.search(
        r"max age     200 ms: (\d+) frames dropped by the server before compute \((.*)\)", out
    )
    assert match is not None, out
    assert int(match.group(1)) == numbers["errors"] >= 1, out
    # Frames read before the hold ended and sent after it are refused at admission.
    assert "stale at admission" in match.group(2), out
    assert "failed " not in out  # drops are not failed inputs


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--name", "", "--name: must not be empty"),
        ("--name", "dock-\u00e9", "--name: must be printable ASCII"),
        ("--max-age", "0", "--max-age: must be more than 0"),
        ("--max-age", "0.5", "--max-age: must be from 1 to 3600000 ms"),
        ("--max-age", "4000000", "--max-age: must be from 1 to 3600000 ms"),
        ("--max-age", "soon", "--max-age: expected a number"),
    ],
)
def test_bad_name_or_max_age_is_one_line_and_exit_2(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["stream", "synthetic", flag, value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_the_sdk_refuses_a_name_grpc_metadata_cannot_carry(null_server: BackgroundServer) -> None:
    # gRPC would fail the stream with INTERNAL "Invalid metadata" instead.
    with Client(null_server.address) as client, pytest.raises(ValueError, match="printable ASCII"):
        client.stream([], name="dock-\u00e9")
