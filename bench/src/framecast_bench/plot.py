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
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

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
    # Matplotlib labels only powers of ten on a log axis: latencies within one decade (the
    # usual case) got one labelled tick. Label enough values to read a point off the plot.
    ax.yaxis.set_major_locator(FixedLocator(_log_ticks(*ax.get_ylim())))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _log_ticks(low: float, high: float, wanted: int = 4) -> list[float]:
    """At least ``wanted`` readable values between low and high for a log axis.

    Tries 1-2-5 per decade, then every digit, then evenly spaced round values.
    """
    low, high = max(low, 1e-9), max(high, 1e-9)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for digits in ((1, 2, 5), tuple(range(1, 10))):
        ticks = [
            d * 10.0**e
            for e in range(first, last + 1)
            for d in digits
            if low <= d * 10.0**e <= high
        ]
        if len(ticks) >= wanted:
            return ticks
    # A narrow range: round steps of 1, 2 or 5 x 10^k, as a linear axis would label it.
    span = high - low
    step = 10.0 ** math.floor(math.log10(span / wanted)) if span > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= wanted + 2:
            step *= factor
            break
    start = math.ceil(low / step) * step
    return [round(start + i * step, 12) for i in range(int((high - start) / step) + 1)]
