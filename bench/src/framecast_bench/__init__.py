"""``framecast bench``: latency and throughput benchmarking of a Framecast server.

Closed-loop (concurrency sweep) and open-loop (Poisson rate sweep, latency from the scheduled
send time) load, warm-up and measurement windows with a stability criterion, percentiles from
a constant-memory log-bucketed histogram, and reports as a table, JSON, CSV and a PNG plot.
"""

from __future__ import annotations

from framecast_client.histogram import LogHistogram

from framecast_bench.compare import compare_reports
from framecast_bench.plan import (
    BenchPlan,
    run_plan,
)
from framecast_bench.report import BenchReport, StepResult, WindowResult
from framecast_bench.runner import (
    BenchUnavailableError,
    StepConfig,
    run_closed_step,
    run_open_step,
)
from framecast_bench.schedule import constant_schedule, poisson_schedule

__all__ = [
    "BenchPlan",
    "BenchReport",
    "BenchUnavailableError",
    "LogHistogram",
    "StepConfig",
    "StepResult",
    "WindowResult",
    "compare_reports",
    "constant_schedule",
    "poisson_schedule",
    "run_closed_step",
    "run_open_step",
    "run_plan",
]
