"""How the benchmark writes a figure in its tables: mean ± std over seeds, a sparsity, a target's verdict."""

from __future__ import annotations

import statistics


def cell(values: list[float], digits: int, signed: bool = False) -> str:
    """The mean of `values` to `digits` decimals (with its sign if `signed`), and ± the std over two or more."""
    mean = statistics.fmean(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if len(values) < 2 else f"{text} ± {statistics.stdev(values):.{digits}f}"


def percent(fraction: float) -> str:
    """A sparsity as a percentage, as precise as it was given (0.975 is "97.5%", not "98%")."""
    return f"{100 * fraction:g}%"


def verdict(value: float, target: float) -> str:
    """Whether a step-time ratio met its upper target."""
    return f"target ≤ {target:.2f}: {'met' if value <= target else 'MISSED'}"
