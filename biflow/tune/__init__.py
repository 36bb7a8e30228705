"""``biflow tune``: Ray Tune search over BiFlow's open settings: noise level, guidance, loss weights.

A search is a YAML (``jobs/tune/*.yaml``)::

    name: smoke-search
    base: jobs/smoke-forward.yaml     # the job of the searched stage (path or inline mapping)
    stage: forward                    # forward | reverse | both
    space:                            # dotted config keys -> one distribution each
      flow.noise_std: {loguniform: [0.02, 0.5]}
      reverse.guidance_max: {choice: [0.0, 1.0, 2.0]}
      eval.guidance: {uniform: [0.0, 2.0]}   # sampling guidance of the FID objective
    metric: loss                      # any logged metric (loss, bpd, ...) or fid
    mode: min
    num_samples: 8                    # trials
    search: optuna                    # optuna (TPE) | random | grid
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    resources: {workers: 2, cpus_per_worker: 1}
    fid_samples: 64

Each trial is a function that builds one ``TorchTrainer`` per stage (the same
trainer ``biflow train`` runs, DeepSpeed workers included) with a trial-specific
run name, and forwards every report of the training loop to Tune, so ASHA can
stop a bad trial at its first rungs. A reverse-only search reuses one frozen
forward checkpoint; ``stage: both`` trains the flow in every trial (needed when
``flow.*`` is searched). With ``metric: fid`` each finished trial samples
``fid_samples`` images in one network evaluation (BiFlow; the exact inverse for
a forward-only search) and reports FID against held-out images.

Outputs, under ``STORAGE/NAME/results`` (local storage) or ``--out``:
``trials.csv``/``trials.json`` (every trial: parameters, metric, status),
``best.yaml`` (the best config, accepted by ``biflow train`` unchanged),
``best.json`` and ``metric-vs-params.png``. Each trial's training runs, with
their TensorBoard logs, are under ``STORAGE/NAME/runs/``. Running the same
name again resumes an interrupted search.

Modules: ``spec.py`` (the search YAML: loading and validation), ``trial.py``
(a trial's configs and the trial function with its FID), ``driver.py``
(``search``: the Tuner, scheduler and searcher), ``results.py`` (table, best
config, plot), ``placement_groups.py`` (a cleaner for stopped trials' worker
groups, on private Ray APIs).
"""

from typing import Any

from biflow.tune.driver import search
from biflow.tune.placement_groups import release_orphaned_placement_groups
from biflow.tune.results import best_configs, best_row, format_table, plot_results, write_results
from biflow.tune.spec import (DISTRIBUTIONS, FIXED_KEYS, STAGE_ORDER, EvalSettings, Param, Plan, ResourceSpec,
                              SchedulerSpec, SearchSpec, load_search, parse_param)
from biflow.tune.trial import eval_settings, reports_per_stage, run_trial, stage_config, trial_fid

__all__ = ["DISTRIBUTIONS", "FIXED_KEYS", "STAGE_ORDER", "EvalSettings", "Param", "Plan", "ResourceSpec",
           "SchedulerSpec", "SearchSpec", "best_configs", "best_row", "eval_settings", "format_table",
           "load_search", "parse_param", "plot_results", "release_orphaned_placement_groups", "reports_per_stage",
           "run_trial", "search", "stage_config", "trial_fid", "write_results"]


def __getattr__(name: str) -> Any:  # searches pickled when this package was one module (biflow.tune)
    if name == "_OptunaMetricSearch":
        from biflow.tune.driver import _optuna_search_cls

        return _optuna_search_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
