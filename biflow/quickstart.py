"""`biflow quickstart`: the whole system on one machine with a small real dataset.

It runs the recipe ``jobs/eval/quickstart.yaml`` (see :mod:`biflow.recipe`):

1. Fashion-MNIST -> parquet shards in a local directory (Ray Data conversion).
2. Stage 1: the forward flow on local Ray Train workers (the layout: :func:`biflow.recipe.auto_layout`).
3. Stage 2: the reverse model from the stage-1 checkpoint.
4. Evaluation: sample grids (BiFlow 1-NFE and the exact inverse), FID of
   both samplers, bits/dim, reconstruction PSNR, ms/img of both.

Every step is idempotent: rerunning resumes training from the latest
checkpoints and reuses the shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from biflow.recipe import builtin_recipe, run_recipe


def quickstart(out: str | Path = "runs/quickstart", workers: int = 0, overrides: list[str] | None = None,
               num_samples: int = 0, log: Callable[[str], None] = print) -> dict:
    """``num_samples`` (0 = the recipe's) overrides the FID sample count per sampler."""
    recipe = builtin_recipe("eval/quickstart")
    return run_recipe(recipe, out, workers=workers, overrides=overrides,
                      evaluate_opts={"num_samples": num_samples} if num_samples else None, log=log)
