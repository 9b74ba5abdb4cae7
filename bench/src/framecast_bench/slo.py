"""``--slo``: a service-level objective a camera-fleet step meets or not.

Written as comma-separated bounds, e.g. ``p99<=100ms,drops<=1%``:

* ``p50``, ``p99``: end-to-end latency of answered frames (capture to result), fleet-wide;
* ``age_p50``, ``age_p99``: frame age at compute as the server states it (a server that
  states no age, e.g. Triton, fails a bound on it: it is absent, not zero);
* ``drops``: frames captured that got no useful answer (dropped on the client, on the server,
  or answered after ``--max-age``), in percent of frames captured.

Times take a unit (``us``, ``ms``, ``s``); drops take ``%``. ``<=`` and ``<`` are accepted.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TIME_KEYS: tuple[str, ...] = ("p50", "p99", "age_p50", "age_p99")
KEYS: tuple[str, ...] = (*TIME_KEYS, "drops")
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_BOUND = re.compile(
    r"^\s*(?P<key>[a-z_0-9]+)\s*(?P<op><=|<)\s*(?P<value>[0-9]*\.?[0-9]+)\s*(?P<unit>us|ms|s|%)?\s*$"
)


@dataclass(frozen=True)
class Bound:
    """One bound: ``key op limit`` (limit in ms for times, percent for drops)."""

    key: str
    limit: float
    strict: bool  # ``<`` rather than ``<=``

    def holds(self, value: float | None) -> bool:
        """Whether ``value`` meets the bound; an absent or NaN value never does."""
        if value is None or math.isnan(value):
            return False
        return value < self.limit if self.strict else value <= self.limit

    def __str__(self) -> str:
        unit = "%" if self.key == "drops" else "ms"
        return f"{self.key}{'<' if self.strict else '<='}{self.limit:g}{unit}"


@dataclass(frozen=True)
class Slo:
    """Bounds that must all hold."""

    bounds: tuple[Bound, ...]
    text: str

    def misses(self, values: Mapping[str, float | None]) -> list[str]:
        """The bounds ``values`` miss, each as ``"p99 140.2ms > 100ms"``; empty when met."""
        missed = []
        for bound in self.bounds:
            value = values.get(bound.key)
            if not bound.holds(value):
                shown = "absent" if value is None or math.isnan(value) else f"{value:.1f}"
                missed.append(f"{bound.key} {shown} (needs {bound})")
        return missed

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.bounds)


def parse_slo(text: str) -> Slo:
    """Parse ``--slo``; raises argparse.ArgumentTypeError (a one-line usage error)."""
    bounds: list[Bound] = []
    for part in text.split(","):
        match = _BOUND.match(part)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"expected bounds like p99<=100ms,drops<=1%, got {part.strip()!r} in {text!r}"
            )
        key, op, value, unit = match.group("key", "op", "value", "unit")
        if key not in KEYS:
            raise argparse.ArgumentTypeError(
                f"unknown SLO key {key!r} in {text!r} (known: {', '.join(KEYS)})"
            )
        if key == "drops":
            if unit != "%":
                raise argparse.ArgumentTypeError(f"drops is in percent, like drops<=1%: {part!r}")
            limit = float(value)
        else:
            if unit not in _UNITS_MS:
                raise argparse.ArgumentTypeError(
                    f"{key} needs a time unit (us, ms or s), like {key}<=100ms: {part!r}"
                )
            limit = float(value) * _UNITS_MS[unit]
        if any(b.key == key for b in bounds):
            raise argparse.ArgumentTypeError(f"{key} is bounded twice in {text!r}")
        bounds.append(Bound(key, limit, strict=op == "<"))
    return Slo(tuple(bounds), text)


def search_max(
    meets: Callable[[int], bool], start: int, limit: int
) -> tuple[int, bool, dict[int, bool]]:
    """The largest n <= ``limit`` for which ``meets(n)`` holds, as ``--find-max`` searches it.

    From ``start``, n doubles while the objective holds, then bisects between the largest size
    that met it and the smallest that missed, to within one camera or an eighth of the former
    (each step is a whole measurement: a finer answer is not worth its minutes). Returns
    (that n, 0 if none; whether the search stopped at ``limit`` still meeting it; every size
    tried, in order, with its outcome).
    """
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tried: dict[int, bool] = {}
    best, missed = 0, None
    n = start
    while n not in tried:
        tried[n] = ok = meets(n)
        if ok:
            best = max(best, n)
        else:
            missed = n if missed is None else min(missed, n)
        if missed is None:
            if n >= limit:
                return best, True, tried
            n = min(2 * n, limit)
        elif missed - best <= max(1, best // 8):
            break
        else:
            n = (best + missed) // 2
    return best, False, tried
