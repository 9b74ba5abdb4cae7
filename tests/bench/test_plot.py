"""--plot writes a PNG when matplotlib is there, and says what to install when it is not."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from framecast_client.bench.plot import PlotUnavailableError, plot_latency_vs_throughput
from framecast_client.bench.report import BenchReport


def test_missing_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report_factory: Callable[..., BenchReport]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailableError, match=r"framecast-client\[plot\]"):
        plot_latency_vs_throughput(report_factory().steps, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_png_is_written(tmp_path: Path, report_factory: Callable[..., BenchReport]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "latency.png"
    plot_latency_vs_throughput(report_factory(concurrencies=(1, 2, 4)).steps, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
