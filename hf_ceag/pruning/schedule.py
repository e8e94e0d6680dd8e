"""When to prune: the gradual (cubic) schedule of Zhu & Gupta (2017), and FairGRAPE's rounds.

    s(t) = s_f + (s_0 − s_f) · (1 − (t − t_0) / (t_1 − t_0))³     for t_0 ≤ t ≤ t_1

Masks are recomputed every `frequency` optimizer steps between t_0 and t_1 and are nested (a pruned weight
never comes back).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    """Target sparsity per optimizer step: cubic ramp from `initial` at `start` to `final` at `end`."""

    initial: float
    final: float
    start: int
    end: int
    frequency: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ValueError(
                f"CubicSchedule: need 0 <= initial_sparsity ({self.initial}) <= target_sparsity "
                f"({self.final}) < 1."
            )
        if not 0 <= self.start <= self.end:
            raise ValueError(f"CubicSchedule: need 0 <= start ({self.start}) <= end ({self.end}) steps.")
        if self.frequency < 1:
            raise ValueError(f"CubicSchedule: pruning_frequency must be >= 1 step, got {self.frequency}.")

    def sparsity_at(self, step: int) -> float:
        """s(step): `initial` before `start`, the cubic ramp in between, `final` from `end` on."""
        if step < self.start:
            return self.initial
        if step >= self.end:
            return self.final
        progress = (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def is_pruning_step(self, step: int) -> bool:
        """Whether masks are recomputed after optimizer step `step` (every `frequency` steps, and at `end`)."""
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.frequency == 0


def fairgrape_round_steps(start: int, end: int, rounds: int) -> list[int]:
    """Optimizer steps of `rounds` pruning rounds spread evenly over [start, end] (the last one at `end`)."""
    if rounds == 1:
        return [end]
    return sorted({round(start + i * (end - start) / (rounds - 1)) for i in range(rounds)})
