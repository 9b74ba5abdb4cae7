"""The bench command line: wiring, --compare, and errors before any load is sent."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from framecast_bench.cli import add_parser, run
from framecast_bench.report import BenchReport


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="framecast")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_defaults_and_lists() -> None:
    args = parse(["bench", "host:1", "--concurrency", "1,2,8", "--mode", "batch"])
    assert args.address == "host:1"
    assert args.concurrency == (1, 2, 8)
    assert args.rate is None
    assert args.handler is run
    args = parse(["bench", "--rate", "50,100.5"])
    assert args.address == "localhost:50051"
    assert args.rate == (50.0, 100.5)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--concurrency", "0"],
        ["bench", "--concurrency", "a,b"],
        ["bench", "--rate", "-5"],
        ["bench", "--rate", "10", "--concurrency", "2"],
        ["bench", "--frame-size", "640"],
    ],
)
def test_bad_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)
    assert "error" in capsys.readouterr().err


def test_compare_prints_the_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report_factory: Callable[..., BenchReport]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    report_factory(scale=1.0).write_json(a)
    report_factory(scale=2.0).write_json(b)
    assert run(parse(["bench", "--compare", str(a), str(b)])) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.split()[:2] == ["c=4", "p50"])
    assert "worse" in line
    assert "%" in line


def test_compare_of_a_missing_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(parse(["bench", "--compare", str(tmp_path / "a"), str(tmp_path / "b")])) == 2
    assert "framecast bench:" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # No server at this address: failing on the plot first proves the check comes first.
    args = parse(["bench", "127.0.0.1:9", "--plot", str(tmp_path / "p.png")])
    assert run(args) == 2
    assert "pip install 'matplotlib>=3.8'" in capsys.readouterr().err


def test_bench_is_a_framecast_command() -> None:
    from framecast_client.cli import build_parser

    args = build_parser().parse_args(["bench", "h:1", "--rate", "10"])
    assert args.handler is run
