"""``--plot``: a PNG of latency percentiles against throughput (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from framecast_client.bench.report import StepResult

PLOTTED: tuple[str, ...] = ("p50", "p90", "p99", "p99.9")


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    """The matplotlib module; PlotUnavailableError, saying how to install it, when missing."""
    # Imported here, not at module import: matplotlib is the optional extra ``plot`` and
    # most runs never plot.
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailableError(
            "--plot needs matplotlib, the optional extra 'plot' of framecast-client: "
            "pip install 'framecast-client[plot]'"
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

    Raises PlotUnavailableError when matplotlib is missing.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        xs = [s.throughput_ips for s in steps]
        for key in PLOTTED:
            ys = [s.latency_ms.get(key, math.nan) for s in steps]
            ax.plot(xs, ys, marker="o", label=key)
        for s, x in zip(steps, xs, strict=True):
            ax.annotate(s.load_label, (x, s.latency_ms.get("p50", math.nan)), fontsize=7, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)
