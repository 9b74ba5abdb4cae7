"""A run's plan and its steps: which loads to offer, in order, through a mode's step drivers.

runner.py measures one step (closed or open loop); this module sweeps the steps of a plan
with the drivers of a mode (unary and batch here, streams in stream_runner.py, the Open
Inference Protocol in oip_sessions.py) and collects the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from framecast_bench.inputs import Payload
from framecast_bench.report import BenchReport, StepResult
from framecast_bench.runner import (
    Arrival,
    SessionFactory,
    StepConfig,
    run_closed_step,
    run_open_step,
)


@dataclass(frozen=True)
class BenchPlan:
    """The load steps of a run: a concurrency sweep (closed loop) or a rate sweep (open)."""

    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    max_inflight: int = 64
    arrival: Arrival = "poisson"
    seed: int = 0

    def __post_init__(self) -> None:
        if bool(self.concurrency) == bool(self.rates):
            raise ValueError("give either concurrency levels or rates, not both or neither")
        if any(c < 1 for c in self.concurrency) or any(
            not (r > 0 and math.isfinite(r)) for r in self.rates
        ):
            raise ValueError("concurrency levels must be >= 1 and rates positive")


ClosedStep = Callable[[int, StepConfig], StepResult]
OpenStep = Callable[[float, StepConfig, np.random.Generator], StepResult]


#: What a mode's step drivers load: a SessionFactory (unary, batch) or a StreamOpener (stream).
Target = TypeVar("Target")
_Target_contra = TypeVar("_Target_contra", contravariant=True)


class _OpenStepRunner(Protocol[_Target_contra]):
    """``run_open_step`` or ``run_stream_open_step``."""

    def __call__(
        self,
        target: _Target_contra,
        payloads: Sequence[Payload],
        rate: float,
        config: StepConfig,
        /,
        *,
        max_inflight: int,
        arrival: Arrival,
        rng: np.random.Generator | None,
    ) -> StepResult: ...


def plan_steps(
    run_closed: Callable[[Target, Sequence[Payload], int, StepConfig], StepResult],
    run_open: _OpenStepRunner[Target],
    target: Target,
    payloads: Sequence[Payload],
    plan: BenchPlan,
) -> tuple[ClosedStep, OpenStep]:
    """A mode's step drivers: its closed and open step runners bound to ``target``."""

    def closed(concurrency: int, config: StepConfig) -> StepResult:
        return run_closed(target, payloads, concurrency, config)

    def open_(rate: float, config: StepConfig, rng: np.random.Generator) -> StepResult:
        return run_open(
            target,
            payloads,
            rate,
            config,
            max_inflight=plan.max_inflight,
            arrival=plan.arrival,
            rng=rng,
        )

    return closed, open_


def unary_steps(
    factory: SessionFactory, payloads: Sequence[Payload], plan: BenchPlan
) -> tuple[ClosedStep, OpenStep]:
    """The step drivers of the unary and batch modes (worker threads, one call each)."""
    return plan_steps(run_closed_step, run_open_step, factory, payloads, plan)


def run_plan(
    steps: tuple[ClosedStep, OpenStep],
    plan: BenchPlan,
    config: StepConfig,
    meta: dict[str, object],
    progress: Callable[[StepResult], None] | None = None,
) -> BenchReport:
    """Run every step of ``plan`` in order with the mode's step drivers; collect a report."""
    closed, open_ = steps
    report = BenchReport(meta=dict(meta))
    rng = np.random.default_rng(plan.seed)
    for c in plan.concurrency:
        step = closed(c, config)
        report.steps.append(step)
        if progress:
            progress(step)
    for r in plan.rates:
        step = open_(r, config, rng)
        report.steps.append(step)
        if progress:
            progress(step)
    return report
