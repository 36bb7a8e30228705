"""Distributed training: Ray Train workers running DeepSpeed ZeRO (or DDP).

``fit(cfg, name, storage, address)`` is the entry point; ``train_loop`` is the
per-worker function it hands to ``TorchTrainer``. The names below load on first
use, so ``biflow.train.engine`` imports without Ray or pyarrow (the device check
on a bare machine).
"""

from __future__ import annotations

from typing import Any

__all__ = ["fit", "prepare", "TrainingFailed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from biflow.train import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'biflow.train' has no attribute {name!r}")
