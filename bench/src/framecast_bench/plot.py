"""``--plot``: a PNG of latency percentiles against throughput (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from framecast_bench.report import StepResult

PLOTTED: tuple[str, ...] = ("p50", "p90", "p99", "p99.9")
# One look per percentile: hollow markers of falling size, so that percentiles that coincide
# (a fast, steady server: p50 = p99) still show one inside the other.
_STYLES: dict[str, dict[str, Any]] = {
    "p50": {"marker": "o", "markersize": 10, "linestyle": "-"},
    "p90": {"marker": "s", "markersize": 8, "linestyle": "--"},
    "p99": {"marker": "^", "markersize": 6, "linestyle": "-."},
    "p99.9": {"marker": "D", "markersize": 4, "linestyle": ":"},
}


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    """The matplotlib module; PlotUnavailableError, saying how to install it, when missing."""
    # Imported here, not at module import: matplotlib is the bench's optional extra ``plot`` and
    # most runs never plot.
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailableError(
            "--plot needs matplotlib (the 'plot' extra of framecast-bench): "
            "pip install 'matplotlib>=3.8', or pip install './bench[plot]' from a checkout"
        ) from exc
    return matplotlib


def _pyplot() -> Any:
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_latency_vs_throughput(
    steps: Sequence[StepResult], path: str | Path, title: str = "framecast bench"
) -> None:
    """Write a PNG: one line per percentile, latency (ms, log scale) over images/s.

    Steps are labelled beside their p50 marker (not on it); steps that did not become stable
    are drawn in red and labelled so. Tick labels are plain numbers.

    Raises PlotUnavailableError when matplotlib is missing.
    """
    plt = _pyplot()
    fig = draw_latency_vs_throughput(plt, steps, title)
    try:
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)


def draw_latency_vs_throughput(plt: Any, steps: Sequence[StepResult], title: str) -> Any:
    """The figure :func:`plot_latency_vs_throughput` saves (the caller closes it)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    xs = [s.throughput_ips for s in steps]
    for key in PLOTTED:
        ys = [s.latency_ms.get(key, math.nan) for s in steps]
        ax.plot(xs, ys, label=key, markerfacecolor="none", markeredgewidth=1.5, **_STYLES[key])
    unstable = [(x, s) for s, x in zip(steps, xs, strict=True) if not s.stable]
    if unstable:
        ax.scatter(
            [x for x, _ in unstable],
            [s.latency_ms.get("p50", math.nan) for _, s in unstable],
            marker="x",
            s=120,
            color="red",
            zorder=5,
            label="not stable",
        )
    for s, x in zip(steps, xs, strict=True):
        label = s.load_label if s.stable else f"{s.load_label} (not stable)"
        ax.annotate(
            label,
            (x, s.latency_ms.get("p50", math.nan)),
            xytext=(6, -14),  # below and right of the marker, clear of the lines above it
            textcoords="offset points",
            fontsize=7,
            color="black" if s.stable else "red",
        )
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig
