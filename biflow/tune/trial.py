"""A trial: its stage configs, and the trial function that fits one
``TorchTrainer`` per stage (forwarding every report to Tune), then FID."""

from __future__ import annotations

import copy
import time
from typing import Any

from biflow.config import ExperimentConfig, from_dict, load_config
from biflow.tune.placement_groups import release_orphaned_placement_groups
from biflow.tune.spec import EvalSettings, Plan, set_dotted, stages_for


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def stage_config(plan: Plan, stage: str, params: dict[str, Any], run_prefix: str,
                 forward_uri: str = "") -> ExperimentConfig:
    data = copy.deepcopy(plan.stage_bases[stage])
    for p in plan.params:
        if stage in stages_for(p, plan.stages) and p.key in params:
            set_dotted(data, p.key, plain(params[p.key]))
    data["stage"] = stage
    data["name"] = f"{run_prefix}-{stage}"
    data.setdefault("ray", {})["storage"] = plan.runs_storage
    data["ray"]["storage_endpoint"] = plan.storage_endpoint
    if stage == "reverse":
        data.setdefault("train", {})["forward_checkpoint"] = forward_uri or plan.forward_checkpoint
    return load_config(data)


def eval_settings(params: dict[str, Any]) -> EvalSettings:
    return from_dict(EvalSettings, {k.split(".", 1)[1]: plain(v) for k, v in params.items()
                                    if k.startswith("eval.")}, "eval")


def reports_per_stage(cfg: ExperimentConfig) -> int:
    """ray.train.report calls of one full run: one per checkpoint, the last at the final step."""
    every, steps = cfg.train.checkpoint_every, cfg.train.steps
    return steps // every + (1 if steps % every else 0)


# ---------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------


def _stage_callback(stage: str):
    from ray.tune.integration.ray_train import TuneReportCallback

    class StageReportCallback(TuneReportCallback):
        """Forward each report of the training loop to Tune, tagged with the stage."""

        def after_report(self, run_context, metrics, checkpoint):
            tagged = [{**m, "stage": stage} for m in metrics]
            super().after_report(run_context, tagged, checkpoint)

    return StageReportCallback()


def trial_fid(plan: Plan, last_run_uri: str, forward_uri: str, settings: EvalSettings, ref: tuple) -> float:
    """FID of ``plan.fid_samples`` samples of the trial's models against held-out images."""
    import numpy as np
    import torch

    from biflow.evaluate import generate, load_pair
    from biflow.metrics import compute_fid, FIDStats

    device = "cuda" if torch.cuda.is_available() else "cpu"
    flow, rev = load_pair(last_run_uri, forward_uri, plan.runs_storage, plan.storage_endpoint, device=device)
    sampler = "biflow" if rev is not None else "exact"  # 1 NFE; a forward-only search samples the exact inverse
    x = generate(flow.model, rev.model if rev else None, sampler, plan.fid_samples, settings.guidance,
                 plan.fid_batch_size, seed=0, device=device)
    mu, sigma, count = ref
    return float(compute_fid(x, FIDStats(np.asarray(mu), np.asarray(sigma), count),
                             batch_size=plan.fid_batch_size, device=device))


def run_trial(params: dict[str, Any], plan: Plan, ref_stats: tuple | None = None) -> None:
    """Tune trial function: train the plan's stages, forwarding metrics; then FID if asked."""
    from ray import tune

    from biflow.train.launch import fit

    trial_id = tune.get_context().get_trial_id()
    prefix = f"{plan.name}-{trial_id}"
    forward_uri = plan.forward_checkpoint
    run_uri = ""
    last: dict[str, Any] = {}
    for stage in plan.stages:
        freed = release_orphaned_placement_groups()  # workers of trials stopped before this one
        if freed:
            print(f"[tune] freed {freed} worker group(s) left by stopped trials", flush=True)
        cfg = stage_config(plan, stage, params, prefix, forward_uri)
        # the same fit() as `biflow train`, with every report forwarded to this trial
        result = fit(cfg, report_callbacks=[_stage_callback(stage)], failure_prefix=f"trial {trial_id}: ")
        run_uri = cfg.ray.storage.rstrip("/") + "/" + cfg.name
        last = dict(result.metrics or {})
        if stage == "forward":
            forward_uri = run_uri
    if plan.metric == "fid":
        t0 = time.time()
        fid = trial_fid(plan, run_uri, forward_uri, eval_settings(params), ref_stats)
        tune.report({"fid": fid, "fid_seconds": time.time() - t0, "stage": plan.stages[-1],
                     "step": last.get("step", 0)})

