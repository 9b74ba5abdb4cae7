"""--plot writes a PNG when matplotlib is there, and says what to install when it is not."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from framecast_bench.plot import PlotUnavailableError, plot_latency_vs_throughput
from framecast_bench.report import BenchReport


def test_missing_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report_factory: Callable[..., BenchReport]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailableError, match=r"pip install 'matplotlib>=3\.8'"):
        plot_latency_vs_throughput(report_factory().steps, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_png_is_written(tmp_path: Path, report_factory: Callable[..., BenchReport]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "latency.png"
    plot_latency_vs_throughput(report_factory(concurrencies=(1, 2, 4)).steps, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_stays_readable(report_factory: Callable[..., BenchReport]) -> None:
    pytest.importorskip("matplotlib")
    import dataclasses

    from framecast_bench.plot import PLOTTED, _pyplot, draw_latency_vs_throughput

    steps = list(report_factory(concurrencies=(1, 2, 4)).steps)
    # Coinciding percentiles (p50 = p99.9) and an unstable step.
    flat = {key: 5.0 for key in steps[0].latency_ms}
    steps[0] = dataclasses.replace(steps[0], latency_ms=flat)
    steps[2] = dataclasses.replace(steps[2], stable=False)
    plt = _pyplot()
    fig = draw_latency_vs_throughput(plt, steps, "t")
    try:
        ax = fig.axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        # Every percentile is drawn with its own marker size, hollow: coinciding ones nest.
        sizes = [lines[key].get_markersize() for key in PLOTTED]
        assert len(set(sizes)) == len(PLOTTED)
        assert all(lines[key].get_markerfacecolor() == "none" for key in PLOTTED)
        # Step labels sit beside the marker, not on it; the unstable step says so.
        texts = ax.texts
        assert len(texts) == 3
        assert all(t.xyann != (0, 0) for t in texts)  # offset from the point
        assert "(not stable)" in texts[2].get_text()
        assert "not stable" in [t.get_text() for t in ax.get_legend().get_texts()]
        # Plain tick labels on the log axis: "10", not "$10^{1}$".
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels
        assert not any("^" in label or "$" in label for label in labels)
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    ("scale", "concurrencies"),
    [(1.0, (1, 2, 4)), (10.0, (2, 3)), (1.0, (1, 16, 256)), (25.0, (1, 1))],
    ids=["within a decade", "narrow", "three decades", "one value"],
)
def test_log_axis_labels_enough_values_to_read_a_point(
    scale: float, concurrencies: tuple[int, ...], report_factory: Callable[..., BenchReport]
) -> None:
    pytest.importorskip("matplotlib")
    from framecast_bench.plot import _pyplot, draw_latency_vs_throughput

    steps = report_factory(scale=scale, concurrencies=concurrencies).steps
    plt = _pyplot()
    fig = draw_latency_vs_throughput(plt, steps, "t")
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        low, high = ax.get_ylim()
        shown = [
            (tick.get_loc(), tick.label1.get_text())
            for tick in ax.yaxis.get_major_ticks()
            if low <= tick.get_loc() <= high and tick.label1.get_visible()
        ]
        values = [float(text) for _, text in shown]  # plain numbers, each one readable
        assert len(values) >= 3, (low, high, shown)
        assert values == sorted(values)
        assert all(abs(v - loc) <= 1e-9 * loc for v, (loc, _) in zip(values, shown, strict=True))
    finally:
        plt.close(fig)
