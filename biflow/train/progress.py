"""What a run shows while it trains, and what it watches for.

:class:`RunInfo`: where the run lives (its name under the run storage).
:class:`Logger`: TensorBoard scalars and images and the console progress line
(rank 0). :class:`PreemptionNotice`: whether Ray Train has seen a node of this
run being reclaimed (a drained spot node), so the loop writes a just-in-time
checkpoint before the deadline.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from biflow.train.clock import StageClock


@dataclass
class RunInfo:
    """A run's name and storage; the loop, its Logger and the launcher share it."""

    name: str = "biflow"
    storage: str = "runs"  # run storage root (local dir, s3:// or gs://)
    endpoint: str = ""
    region: str = ""
    forward_checkpoint: str = ""  # resolved URI of the stage-1 checkpoint (reverse stage)

    @property
    def uri(self) -> str:
        return self.storage.rstrip("/") + "/" + self.name

    @property
    def is_local(self) -> bool:
        return "://" not in self.storage or self.storage.startswith("file://")


class Logger:
    """TensorBoard scalars/images and a console progress line, on rank 0 only.

    With remote run storage the event files are written to a local directory
    and copied to ``RUN/tensorboard`` at every checkpoint.
    """

    def __init__(self, run: RunInfo, stage: str, total_steps: int, enabled: bool, clock: StageClock | None = None):
        self.enabled, self.stage, self.total, self.clock = enabled, stage, total_steps, clock
        self.run = run
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if run.is_local:
            from biflow.data import storage

            _, path = storage.resolve(run.uri)
            self.log_dir = Path(path) / "tensorboard"
        else:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"biflow-tb-{run.name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def console(self, step: int, loss: float, extra: str, samples_per_s: float, steps_per_s: float) -> None:
        if not self.enabled:
            return
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        if self.clock is not None and self.clock.budget > 0:
            eta = min(eta, self.clock.remaining())
        width = len(str(self.total))
        print(f"[{self.stage}] step {step:>{width}}/{self.total} | loss {loss:.4f}{extra} | "
              f"{samples_per_s:,.0f} img/s | ETA {_fmt_duration(eta)}", flush=True)

    def image(self, step: int, images: torch.Tensor) -> None:
        if not self.writer:
            return
        from biflow.metrics import make_grid, save_grid

        path = save_grid(images, self.log_dir / "samples" / f"step_{step:08d}.png", nrow=8)
        grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=8).add(1).div(2)
        self.writer.add_image("samples", grid, step)
        print(f"[{self.stage}] step {step}: samples -> {path}", flush=True)

    def sync(self) -> None:
        """Copy the local log dir to remote storage (no-op for local runs)."""
        if not self.writer or self.run.is_local:
            return
        import pyarrow.fs as pafs

        from biflow.data import storage

        self.writer.flush()
        fs, path = storage.resolve(self.run.uri, self.run.endpoint, self.run.region, check=False)
        try:
            pafs.copy_files(str(self.log_dir), storage.join(path, "tensorboard"),
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as exc:  # logs are best effort; training goes on
            print(f"[{self.stage}] warning: could not upload TensorBoard logs: {str(exc).splitlines()[0]}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer:
            self.sync()
            self.writer.close()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class PreemptionNotice:
    """Asks Ray Train every ``every`` steps whether a node of this run is being
    preempted (``ray.train.get_preemption_info()``: a collective, so every rank asks
    at the same steps). True once per notice: the step that should be checkpointed
    now, before the node goes."""

    def __init__(self, every: int, say: Callable[[str], None]):
        self.every, self.say = every, say
        self.seen: tuple = ()

    def due(self, step: int) -> bool:
        if self.every <= 0 or step % self.every:
            return False
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return False
        key = (info.deadline_ms, tuple(info.preempted_node_ids))
        if key == self.seen:
            return False
        self.seen = key
        left = f"in {info.deadline_ms / 1000 - time.time():.0f} s" if info.deadline_ms else "with no deadline"
        nodes = ", ".join(n[:12] for n in info.preempted_node_ids)
        self.say(f"preemption notice at step {step}: node {nodes} (ranks {info.preempted_ranks}) goes {left}; "
                 f"writing a just-in-time checkpoint")
        return True
