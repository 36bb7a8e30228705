"""Distributed training: Ray Train workers running DeepSpeed ZeRO (or DDP).

``fit(cfg, name, storage, address)`` is the entry point; ``train_loop`` is the
per-worker function it hands to ``TorchTrainer``.
"""

from biflow.train.launch import TrainingFailed, fit, prepare

__all__ = ["fit", "prepare", "TrainingFailed"]
