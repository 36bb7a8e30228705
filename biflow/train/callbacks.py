"""Hooks of the training loop: a :class:`Callbacks` object passed into
``train_loop`` (``fit(..., callbacks=...)``). The loop calls its methods at
fixed points and knows nothing of what they do; the default does nothing.

:class:`FaultInjection` is the one used by the fault tests: it NaNs chosen
steps and SIGKILLs workers at chosen points, built from the ``hooks`` dict
that ``fit(..., hooks=...)`` takes.

A callbacks object travels to every worker inside ``train_loop_config`` and
must pickle; each worker (and each restarted worker) gets its own copy.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from biflow.train.engine import rank

CHECKPOINT_PHASES = ("save", "commit")


class Callbacks:
    """The loop's hook points. Subclass and override the ones you need."""

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called with each micro-step's loss of optimizer step ``step`` (1-based)
        before the non-finite guard; returns the loss the loop goes on with."""
        return loss

    def on_step(self, step: int) -> None:
        """After optimizer step ``step``, before its log line and checkpoint."""

    def on_checkpoint_phase(self, phase: str, step: int) -> None:
        """Inside the collective checkpoint of ``step``: phase ``"save"`` after this
        rank's state is written locally and before it is reported, ``"commit"``
        after every rank's upload and before the commit marker."""


class FaultInjection(Callbacks):
    """Test hooks, from a dict (all keys optional):

    ``nan_at_steps``: step numbers; each entry makes one attempt at that step
    produce a NaN loss. ``kill_at_steps``: ``[[step, rank], ...]`` SIGKILLs that
    rank right after optimizer step ``step``. ``kill_in_checkpoint``:
    ``[[step, rank, phase], ...]`` SIGKILLs that rank inside the checkpoint of
    ``step`` at ``phase`` (see :meth:`Callbacks.on_checkpoint_phase`).
    ``marker_dir`` (required with kills) holds one marker file per kill, so a
    restarted worker passing the same point again does not die again.
    """

    def __init__(self, hooks: dict[str, Any] | None = None):
        hooks = hooks or {}
        self.nan_remaining = collections.Counter(hooks.get("nan_at_steps") or [])
        self.marker_dir = hooks.get("marker_dir")
        self.kill_points = {("step", int(s), int(r)) for s, r in hooks.get("kill_at_steps") or []}
        for s, r, phase in hooks.get("kill_in_checkpoint") or []:
            if phase not in CHECKPOINT_PHASES:
                raise ValueError(f"kill_in_checkpoint phase {phase!r}: use 'save' or 'commit'")
            self.kill_points.add((phase, int(s), int(r)))
        if self.kill_points and not self.marker_dir:
            raise ValueError("kill hooks need hooks['marker_dir']")

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.nan_remaining[step] > 0:
            self.nan_remaining[step] -= 1
            return loss * float("nan")
        return loss

    def on_step(self, step: int) -> None:
        self._kill("step", step)

    def on_checkpoint_phase(self, phase: str, step: int) -> None:
        self._kill(phase, step)

    def _kill(self, point: str, step: int) -> None:
        if (point, step, rank()) not in self.kill_points:
            return
        marker = Path(self.marker_dir) / f"killed-{point}-{step}-rank{rank()}"
        if marker.exists():
            return
        marker.write_text(str(time.time()))
        print(f"[hook] SIGKILL rank {rank()} (pid {os.getpid()}) at {point} {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def resolve(callbacks: Callbacks | None = None, hooks: dict[str, Any] | None = None) -> Callbacks:
    """The loop's callbacks: ``callbacks`` as given, else fault injection from ``hooks``, else none."""
    if callbacks is not None and hooks:
        raise ValueError("pass callbacks or hooks, not both (hooks build a FaultInjection)")
    if callbacks is not None:
        return callbacks
    return FaultInjection(hooks) if hooks else Callbacks()


class StepLog(Callbacks):
    """Appends ``step wall_time`` to a local file on rank 0 after every optimizer step:
    how a test on one machine follows a run's progress without reading its storage.
    ``pace_s`` makes every step last at least that long (every rank), so a toy run is
    still running when a scenario acts on it."""

    def __init__(self, path: str, pace_s: float = 0.0):
        self.path, self.pace_s = path, pace_s
        self._last = 0.0

    def on_step(self, step: int) -> None:
        if self.pace_s:
            time.sleep(max(0.0, self._last + self.pace_s - time.time()))
            self._last = time.time()
        import ray.train

        # Ray's rank, not torch.distributed's: a worker whose process group is being torn
        # down (a preempted group) would read rank 0 there and log the step twice
        if ray.train.get_context().get_world_rank() == 0:
            with open(self.path, "a") as f:
                f.write(f"{step} {time.time():.3f}\n")
