"""Time inside a training stage: the budget clock (``train.time_budget_s``, summed over
resumes, agreed by all ranks) and the per-phase step timers the loop logs."""

from __future__ import annotations

import collections
import time

import torch

from biflow.train.engine import max_over_ranks


class StageClock:
    """The training loop's wall time, summed over resumes, against ``train.time_budget_s``.

    ``sync`` is called once per step; with a budget every rank takes the slowest rank's time
    (one scalar all-reduce), so all ranks stop at the same step and follow the same LR.
    ``warmup_end`` is set by the LR schedule (:func:`biflow.train.engine.warmup_cosine`)
    when its warmup ends: the cosine spans the budget left after it."""

    def __init__(self, budget_s: float):
        self.budget, self.spent, self.elapsed = budget_s, 0.0, 0.0
        self.warmup_end: float | None = None
        self._t0 = time.perf_counter()

    def resume(self, spent_s: float) -> None:
        """Start counting now, on top of ``spent_s`` seconds of earlier attempts."""
        self.spent = self.elapsed = spent_s
        self._t0 = time.perf_counter()

    def sync(self, device: torch.device) -> float:
        self.elapsed = self.spent + time.perf_counter() - self._t0
        if self.budget > 0:
            self.elapsed = max_over_ranks(self.elapsed, device)
        return self.elapsed

    def fraction(self) -> float:
        """Share of the budget spent (0 without a budget)."""
        return min(1.0, self.elapsed / self.budget) if self.budget > 0 else 0.0

    def progress(self, step: int, total_steps: int) -> float:
        """How far the stage is, in [0, 1]: whichever of steps and the time budget is further
        along (the training-time curriculum switches terms on by it)."""
        return min(1.0, max(step / max(1, total_steps), self.fraction()))

    @property
    def expired(self) -> bool:
        return self.budget > 0 and self.elapsed >= self.budget

    def remaining(self) -> float:
        return max(0.0, self.budget - self.elapsed) if self.budget > 0 else float("inf")


class PhaseTimer:
    """Host wall time of each phase of a step over a logging window (perf/ms_<phase> scalars):
    loss (the model's forward, and the frozen flow's in stage 2), backward, optimizer (clipping,
    the finite-gradient check that is the step's one host sync, the update, the LR schedule), ema.
    On a CPU every op is synchronous, so these are the phases' costs; on a GPU they are launch
    times, until the host sync waits for the device."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)

    def lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.total[phase] += now - since
        return now

    def per_step(self, steps: int) -> dict[str, float]:
        return {k: 1e3 * v / max(steps, 1) for k, v in self.total.items()}

    def clear(self) -> None:
        self.total.clear()
