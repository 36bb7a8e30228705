"""Ray Tune search over BiFlow's open settings: noise level, guidance, loss weights.

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
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from biflow.config import ConfigError, ExperimentConfig, apply_overrides, from_dict, load_config, read_yaml, to_dict
from biflow.errors import UserError

Log = Callable[[str], None]

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")
STAGE_ORDER = {"forward": ["forward"], "reverse": ["reverse"], "both": ["forward", "reverse"]}
FIXED_KEYS = ("name", "stage", "train.forward_checkpoint", "train.steps", "train.checkpoint_every")


# ---------------------------------------------------------------------------
# The search spec
# ---------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """Settings of the FID objective that are not training settings (``eval.*`` in a space)."""

    guidance: float = 0.0  # sampling guidance scale w of the 1-NFE samples


@dataclass
class SchedulerSpec:
    kind: Literal["asha", "none"] = "asha"
    metric: str = ""  # metric ASHA compares at its rungs; default: the objective, or loss for fid
    grace_period: int = 1  # reports before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int = 0  # 0: every report of a full trial (ASHA stops trials at max_t)


@dataclass
class ResourceSpec:
    """Per-trial resources; non-zero values replace the base job's ``ray.*``."""

    workers: int = 0  # Ray Train workers (DeepSpeed ranks) per trial
    cpus_per_worker: float = 0.0
    use_gpu: Literal["", "auto", "yes", "no"] = ""
    trial_cpus: float = 0.5  # the trial function itself (drives the trainer, computes FID)
    trial_gpus: float = 0.0


@dataclass
class SearchSpec:
    name: str = ""
    base: Any = None  # job YAML path or inline mapping: the searched stage (stage both: the reverse job)
    forward: Any = None  # forward job for stage both (default: base), or to train once for a reverse search
    overrides: list = field(default_factory=list)  # KEY=VALUE applied to every base job, like --set base.KEY=VALUE
    stage: Literal["forward", "reverse", "both"] = "forward"
    space: dict = field(default_factory=dict)
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 8
    search: Literal["optuna", "random", "grid"] = "optuna"
    seed: int = 0
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    fid_samples: int = 64
    fid_batch_size: int = 64
    storage: str = ""  # default: the base job's ray.storage
    storage_endpoint: str = ""


@dataclass
class Param:
    key: str
    dist: str
    args: list

    @property
    def target(self) -> str:
        return "eval" if self.key.startswith("eval.") else ("forward" if self.key.startswith("flow.") else "main")


@dataclass
class Plan:
    """Everything a trial needs, resolved on the driver (plain data: it travels to trial actors)."""

    name: str
    stages: list[str]
    stage_bases: dict[str, dict]  # stage -> experiment dict (paths made absolute)
    params: list[Param]
    metric: str
    mode: str
    runs_storage: str
    storage_endpoint: str
    forward_checkpoint: str = ""  # reverse-only search: the one frozen forward checkpoint
    fid_samples: int = 64
    fid_batch_size: int = 64


# ---------------------------------------------------------------------------
# Loading and validation: everything fails here, before any trial starts
# ---------------------------------------------------------------------------


def _read_yaml(source: Any, what: str, relative_to: Path | None) -> dict:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    if not isinstance(source, (str, Path)) or not str(source):
        raise ConfigError(f"{what}: expected a job YAML path or a mapping, got {source!r}")
    path = Path(source)
    if not path.is_file() and relative_to is not None and (relative_to / path).is_file():
        path = relative_to / path
    return read_yaml(path, what)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _field_leaf(key: str, where: str) -> None:
    """Check a dotted key names a settable field of the experiment (or ``eval.*``)."""
    parts = key.split(".")
    cls: Any = EvalSettings if parts[0] == "eval" else ExperimentConfig
    rest = parts[1:] if parts[0] == "eval" else parts
    path = "eval" if parts[0] == "eval" else ""
    if not rest:
        raise ConfigError(f"{where}: {key!r} is a section, not a parameter")
    for i, part in enumerate(rest):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            here = f"{path}." if path else ""
            raise ConfigError(f"{where}: unknown parameter {key!r} ({here}{part} is not a config field; "
                              f"allowed here: {', '.join(here + n for n in names)})")
        path = f"{path}.{part}" if path else part
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            if i == len(rest) - 1:
                raise ConfigError(f"{where}: {key!r} is a section, not a parameter")
            cls = tp
        elif i != len(rest) - 1:
            raise ConfigError(f"{where}: unknown parameter {key!r} ({path} is not a section)")
    if key in FIXED_KEYS or key.startswith("ray."):
        raise ConfigError(f"{where}: {key!r} cannot be searched (set it in the base job; trial resources go in "
                          f"'resources:'); ASHA compares trials at equal steps")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_param(key: str, spec: Any) -> Param:
    """One ``space`` entry: ``{uniform: [lo, hi]}``, ``{choice: [a, b]}``, ... Raises naming the key."""
    where = f"space.{key}"
    _field_leaf(key, where)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution such as {{uniform: [0.0, 1.0]}}; "
                          f"allowed distributions: {', '.join(DISTRIBUTIONS)}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {dist} needs a non-empty list of values, got {args!r}")
        return Param(key, dist, list(args))
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(f"{where}: {dist} needs [low, high] (two numbers), got {args!r}")
    low, high = args
    if low >= high:
        raise ConfigError(f"{where}: empty range: {dist} low={low} must be < high={high} "
                          f"(use choice for a single value)")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
    return Param(key, dist, [low, high])


def _param_values(p: Param) -> list:
    """Values that stand for the whole distribution in the up-front type check
    (uniform draws are floats: an integer field must use randint or choice)."""
    if p.dist in ("uniform", "loguniform"):
        return [float(a) for a in p.args]
    return list(p.args)


def _check_values(params: list[Param], bases: dict[str, dict], stages: list[str]) -> None:
    """Every endpoint / choice must make a valid config (type, range): checked now, not in trial 7."""
    for p in params:
        for value in _param_values(p):
            if p.target == "eval":
                try:
                    from_dict(EvalSettings, {p.key.split(".", 1)[1]: value}, "eval")
                except ConfigError as exc:
                    raise ConfigError(f"space.{p.key}: value {value!r}: {exc}") from None
                continue
            for stage in _stages_for(p, stages):
                data = copy.deepcopy(bases[stage])
                _set_dotted(data, p.key, value)
                data["stage"] = stage
                if stage == "reverse":
                    data.setdefault("train", {})["forward_checkpoint"] = "checked-later"
                try:
                    load_config(data)
                except ConfigError as exc:
                    raise ConfigError(f"space.{p.key}: value {value!r} makes an invalid config: {exc}") from None


def _stages_for(p: Param, stages: list[str]) -> list[str]:
    """Which trained stage a parameter goes to: flow.* to the forward job, the rest to the last stage."""
    if p.target == "eval":
        return []
    if p.target == "forward" and "forward" in stages:
        return ["forward"] if len(stages) > 1 else stages
    return [stages[-1]]


def _absolute(data: dict) -> dict:
    """Local paths made absolute: Tune runs trials in their own working directory."""
    data = copy.deepcopy(data)

    def fix(section: str, key: str) -> None:
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] and "://" not in node[key]:
            node[key] = str(Path(node[key]).expanduser().resolve())

    fix("data", "uri")
    fix("ray", "storage")
    rev = data.get("reverse")
    if isinstance(rev, dict) and isinstance(rev.get("perceptual"), dict):
        wp = rev["perceptual"].get("weights_path")
        if isinstance(wp, str) and wp and "://" not in wp:
            rev["perceptual"]["weights_path"] = str(Path(wp).expanduser().resolve())
    return data


def load_search(path: str | Path | dict, overrides: list[str] | None = None, name: str = "",
                storage: str = "") -> tuple[SearchSpec, dict[str, dict], list[Param]]:
    """Read and validate a search YAML. ``--set`` keys starting with ``base.`` or
    ``forward.`` override the base jobs; the others override the search spec.

    Returns (spec, stage -> base experiment dict, params).
    """
    base_over = [o[len("base."):] for o in overrides or [] if o.startswith("base.")]
    fwd_over = [o[len("forward."):] for o in overrides or [] if o.startswith("forward.")]
    spec_over = [o for o in overrides or [] if not o.startswith(("base.", "forward."))]
    relative_to = None if isinstance(path, dict) else Path(path).resolve().parent
    if isinstance(path, dict):
        raw = copy.deepcopy(path)
    else:
        raw = _read_yaml(path, "--config", None)
    raw = apply_overrides(raw, spec_over)
    spec: SearchSpec = from_dict(SearchSpec, raw)
    spec.name = name or spec.name or (Path(path).stem if not isinstance(path, dict) else "search")
    if "/" in spec.name or not spec.name:
        raise ConfigError(f"name={spec.name!r}: a search name must be non-empty and contain no '/'")
    if spec.base is None:
        raise ConfigError("base: required: the job YAML (path or mapping) of the searched stage")
    if not isinstance(spec.space, dict) or not spec.space:
        raise ConfigError("space: required: a mapping of dotted config keys to distributions, "
                          "e.g. flow.noise_std: {loguniform: [0.02, 0.5]}")
    if spec.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {spec.num_samples}")
    if spec.fid_samples < 2 or spec.fid_batch_size < 1:
        raise ConfigError("fid_samples must be >= 2 and fid_batch_size >= 1")
    if spec.max_concurrent < 0:
        raise ConfigError(f"max_concurrent must be >= 0, got {spec.max_concurrent}")
    sch = spec.scheduler
    if sch.grace_period < 1 or sch.reduction_factor <= 1 or sch.max_t < 0:
        raise ConfigError("scheduler: grace_period must be >= 1, reduction_factor > 1 and max_t >= 0")

    if not isinstance(spec.overrides, list) or not all(isinstance(o, str) for o in spec.overrides):
        raise ConfigError(f"overrides: expected a list of KEY=VALUE strings, got {spec.overrides!r}")
    base_over = [*spec.overrides, *base_over]
    fwd_over = [*spec.overrides, *fwd_over]
    main = apply_overrides(_read_yaml(spec.base, "base", relative_to), base_over)
    stages = STAGE_ORDER[spec.stage]
    bases: dict[str, dict] = {stages[-1]: main}
    if spec.forward is not None:
        forward = apply_overrides(_read_yaml(spec.forward if spec.forward is not None else spec.base,
                                             "forward", relative_to), fwd_over)
    else:
        forward = None
    if spec.stage == "both":
        bases["forward"] = forward if forward is not None else copy.deepcopy(main)
    elif spec.stage == "reverse" and forward is not None:
        bases["forward-once"] = forward
    res = spec.resources
    for data in bases.values():
        ray = data.setdefault("ray", {})
        if res.workers:
            ray["workers"] = res.workers
        if res.cpus_per_worker:
            ray["cpus_per_worker"] = res.cpus_per_worker
        if res.use_gpu:
            ray["use_gpu"] = res.use_gpu
    for stage, data in bases.items():
        check = copy.deepcopy(data)
        check["stage"] = "forward" if stage == "forward-once" else stage
        if check["stage"] == "reverse":
            check.setdefault("train", {}).setdefault("forward_checkpoint", "checked-later")
        try:
            load_config(check)
        except ConfigError as exc:
            raise ConfigError(f"{'base' if stage == stages[-1] else 'forward'} ({stage} job): {exc}") from None

    params = [parse_param(str(k), v) for k, v in spec.space.items()]
    for p in params:
        if p.target == "forward" and spec.stage == "reverse":
            raise ConfigError(f"space.{p.key}: a reverse-only search reuses one frozen forward checkpoint, so "
                              f"flow.* cannot change; search it with stage: both")
        if p.target == "eval" and spec.metric != "fid":
            raise ConfigError(f"space.{p.key}: eval.* settings only matter with metric: fid (got metric: "
                              f"{spec.metric})")
        if spec.search == "optuna" and p.dist == "grid":
            raise ConfigError(f"space.{p.key}: grid does not mix with search: optuna; use choice, or search: grid")
        if spec.search == "grid" and p.dist not in ("grid", "choice"):
            raise ConfigError(f"space.{p.key}: search: grid needs grid or choice values, got {p.dist}")
    if spec.metric == "fid" and bases[stages[-1]].get("data", {}).get("kind") == "latents":
        raise ConfigError("metric: fid needs pixel data (base data.kind: pixels); with latent shards "
                          "search a logged metric such as loss")
    _check_values(params, bases, stages)
    spec.storage = storage or spec.storage or bases[stages[-1]].get("ray", {}).get("storage", "runs")
    return spec, bases, params


# ---------------------------------------------------------------------------
# Building a trial's configs
# ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def stage_config(plan: Plan, stage: str, params: dict[str, Any], run_prefix: str,
                 forward_uri: str = "") -> ExperimentConfig:
    data = copy.deepcopy(plan.stage_bases[stage])
    for p in plan.params:
        if stage in _stages_for(p, plan.stages) and p.key in params:
            _set_dotted(data, p.key, _plain(params[p.key]))
    data["stage"] = stage
    data["name"] = f"{run_prefix}-{stage}"
    data.setdefault("ray", {})["storage"] = plan.runs_storage
    data["ray"]["storage_endpoint"] = plan.storage_endpoint
    if stage == "reverse":
        data.setdefault("train", {})["forward_checkpoint"] = forward_uri or plan.forward_checkpoint
    return load_config(data)


def eval_settings(params: dict[str, Any]) -> EvalSettings:
    return from_dict(EvalSettings, {k.split(".", 1)[1]: _plain(v) for k, v in params.items()
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
    from ray.train import TrainingFailedError

    from biflow.train.launch import TrainingFailed, _worker_message, build_trainer, prepare

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
        cfg, run = prepare(cfg)
        trainer = build_trainer(cfg, run)
        trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), _stage_callback(stage)]
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            raise TrainingFailed(f"trial {trial_id}: {stage} run {run.name!r} failed: "
                                 f"{_worker_message(exc)} (under {run.uri})") from exc
        run_uri = run.uri
        last = dict(result.metrics or {})
        if stage == "forward":
            forward_uri = run.uri
    if plan.metric == "fid":
        t0 = time.time()
        fid = trial_fid(plan, run_uri, forward_uri, eval_settings(params), ref_stats)
        tune.report({"fid": fid, "fid_seconds": time.time() - t0, "stage": plan.stages[-1],
                     "step": last.get("step", 0)})


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _search_space(params: list[Param], search: str) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for p in params:
        a = p.args
        if p.dist == "uniform":
            space[p.key] = tune.uniform(a[0], a[1])
        elif p.dist == "loguniform":
            space[p.key] = tune.loguniform(a[0], a[1])
        elif p.dist == "randint":
            space[p.key] = tune.randint(a[0], a[1] + 1)  # inclusive high, as written in the YAML
        elif p.dist == "grid" or (p.dist == "choice" and search == "grid"):
            space[p.key] = tune.grid_search(a)
        else:
            space[p.key] = tune.choice(a)
    return space


def _optuna_search_cls() -> type:
    """OptunaSearch that skips reports without the objective (with metric: fid, every
    training report before the trial's last one), instead of raising KeyError."""
    cls = globals().get("_OptunaMetricSearch")
    if cls is None:
        from ray.tune.search.optuna import OptunaSearch

        class _OptunaMetricSearch(OptunaSearch):
            def on_trial_result(self, trial_id: str, result: dict) -> None:
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        _OptunaMetricSearch.__module__ = __name__
        _OptunaMetricSearch.__qualname__ = "_OptunaMetricSearch"
        globals()["_OptunaMetricSearch"] = cls = _OptunaMetricSearch
    return cls


def __getattr__(name: str) -> Any:  # pickle finds the searcher class when a search is restored
    if name == "_OptunaMetricSearch":
        return _optuna_search_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _init_ray(address: str, cpus_needed: float) -> None:
    from biflow.train.launch import init_ray

    init_ray(address, cpus_needed=cpus_needed)


def release_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead: the worker groups of
    trainers whose trial ASHA stopped inside ``trainer.fit()``.

    Ray Train's own cleaner does this through the state API, which needs the
    dashboard of *this* cluster and finds the wrong one when several local Ray
    instances run on a machine; unremoved, each leak holds a trial's CPUs/GPUs
    until the driver exits. Placement groups made by the driver (Tune's trial
    bundles) and detached ones are left alone.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    try:
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached
                    and pg.creator_actor_dead and not ray.ActorID(pg.creator_actor_id).is_nil()):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
    except Exception:  # private API: never let the janitor fail a search
        pass
    return removed


def _janitor():
    from ray import tune

    class PlacementGroupJanitor(tune.Callback):
        """Frees the worker groups of stopped trials (see release_orphaned_placement_groups)."""

        def __init__(self, every_s: float = 2.0):
            self.every_s, self.last = every_s, 0.0

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self.last > self.every_s:
                self.last = time.time()
                if release_orphaned_placement_groups():
                    print("[tune] freed the worker group of a stopped trial", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            release_orphaned_placement_groups()

        def on_experiment_end(self, trials, **info):
            release_orphaned_placement_groups()

    return PlacementGroupJanitor()


def _concurrency(spec: SearchSpec, cfg: ExperimentConfig) -> int:
    import ray

    if spec.max_concurrent:
        return spec.max_concurrent
    res = ray.cluster_resources()
    per_trial_cpu = cfg.ray.workers * cfg.ray.cpus_per_worker + spec.resources.trial_cpus
    by_cpu = int(max(res.get("CPU", 1) - 1, 1) // max(per_trial_cpu, 1e-9))  # one CPU left for Ray Data
    gpus = res.get("GPU", 0)
    by_gpu = int(gpus // cfg.ray.workers) if gpus and cfg.ray.use_gpu != "no" else by_cpu
    return max(1, min(by_cpu, by_gpu, spec.num_samples))


def _reference_stats(cfg: ExperimentConfig, n: int, batch_size: int, log: Log) -> tuple:
    """Inception statistics of ``n`` held-out images (data.eval_split), cached like ``biflow evaluate``."""
    import hashlib

    import torch

    from biflow.data.pipeline import iter_split
    from biflow.metrics import reference_stats

    def images():
        xs = [x for x, _ in iter_split(cfg.data, cfg.data.eval_split, batch_size=256, limit=n)]
        if not xs:
            raise UserError(f"data.eval_split={cfg.data.eval_split!r} of {cfg.data.uri} has no images for FID")
        got = torch.cat(xs)
        if len(got) < n:
            raise UserError(f"fid_samples={n}: data.eval_split={cfg.data.eval_split!r} has only {len(got)} images")
        return got

    dataset = Path(cfg.data.uri.rstrip("/")).name or "data"
    tag = hashlib.sha256(cfg.data.uri.encode()).hexdigest()[:8]
    log(f"FID reference: {n} images of {cfg.data.uri} ({cfg.data.eval_split})")
    st = reference_stats(f"{dataset}-{tag}", cfg.data.eval_split, images, count=n,
                         image_size=cfg.flow.image_size, batch_size=batch_size)
    return st.mu, st.sigma, st.count


def _forward_once(spec: SearchSpec, bases: dict[str, dict], runs_storage: str, address: str, log: Log) -> str:
    """The frozen forward checkpoint of a reverse-only search: the base job's
    ``train.forward_checkpoint`` if it resolves, else the ``forward`` job trained once."""
    from biflow.train import checkpoint as ckpt_io

    main = bases["reverse"]
    ref = str(main.get("train", {}).get("forward_checkpoint", "") or "")
    base_storage = main.get("ray", {}).get("storage", "runs")
    endpoint = main.get("ray", {}).get("storage_endpoint", "")
    problem = "base train.forward_checkpoint is empty"
    if ref:
        try:
            found = ckpt_io.find_checkpoint(ref, base_storage, endpoint)
            if found.metadata().get("stage") != "forward":
                raise ConfigError(f"base train.forward_checkpoint={ref!r} is not a forward-stage checkpoint")
            uri = found.uri if "://" in found.uri else str(Path(found.uri).resolve())
            log(f"frozen forward flow: {uri} (step {found.step})")
            return uri
        except ConfigError:
            raise
        except UserError as exc:
            problem = str(exc)
    if "forward-once" not in bases:
        raise ConfigError(f"stage: reverse needs a trained forward flow: {problem}. Train it first "
                          f"(biflow train forward ...), or add 'forward: <forward job>' to the search to "
                          f"train it once before the trials")
    from biflow.train.launch import fit

    data = copy.deepcopy(bases["forward-once"])
    data["stage"] = "forward"
    data.setdefault("ray", {})["storage"] = runs_storage
    cfg = load_config(data)
    name = f"{spec.name}-forward"
    log(f"training the shared forward flow once: {runs_storage}/{name}")
    fit(cfg, name, runs_storage, address or None)
    return f"{runs_storage}/{name}"


def _make_tuner(spec: SearchSpec, plan: Plan, ref_stats: tuple | None, trial_cfg: ExperimentConfig,
                address: str, log: Log):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from biflow.data import storage as storage_mod

    trainable = tune.with_parameters(run_trial, plan=plan, ref_stats=ref_stats)
    trial_res = {"CPU": spec.resources.trial_cpus, **({"GPU": spec.resources.trial_gpus}
                                                       if spec.resources.trial_gpus else {})}
    trainable = tune.with_resources(trainable, trial_res)

    per_run = sum(reports_per_stage(stage_config(plan, s, {}, "check", "x")) for s in plan.stages)
    # +1: ASHA stops a trial when it reaches max_t; one beyond the last report lets trials end
    # by themselves (a trial stopped inside trainer.fit() leaves its worker group to Ray's cleaner)
    total_reports = per_run + (1 if plan.metric == "fid" else 0) + 1
    sch = spec.scheduler
    sched_metric = sch.metric or ("loss" if plan.metric == "fid" else plan.metric)
    sched_mode = spec.mode if sched_metric == plan.metric or plan.metric != "fid" else "min"
    if sch.kind == "asha":
        max_t = sch.max_t or total_reports
        if max_t < total_reports:
            raise ConfigError(f"scheduler.max_t={max_t}: a full trial makes {total_reports} reports and ASHA "
                              f"stops every trial at max_t; leave it 0 (auto) or raise it")
        if sch.grace_period > max_t:
            raise ConfigError(f"scheduler.grace_period={sch.grace_period} is beyond max_t={max_t} reports")
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=sched_metric, mode=sched_mode,
                                  max_t=max_t, grace_period=sch.grace_period, reduction_factor=sch.reduction_factor)
        log(f"ASHA on {sched_metric} ({sched_mode}): grace {sch.grace_period}, factor {sch.reduction_factor:g}, "
            f"max_t {max_t} reports")
    else:
        scheduler = FIFOScheduler()
    if spec.search == "optuna":
        search_alg = _optuna_search_cls()(metric=plan.metric, mode=plan.mode, seed=spec.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.seed)
    concurrency = _concurrency(spec, trial_cfg)
    num_samples = 1 if spec.search == "grid" and spec.num_samples == 1 else spec.num_samples
    log(f"search {spec.name}: {spec.search}, {num_samples}{' x grid' if spec.search == 'grid' else ''} trials, "
        f"{concurrency} at a time, each {trial_cfg.ray.workers} workers x {trial_cfg.ray.cpus_per_worker:g} CPU")
    # reuse_actors=False: a stopped trial's process must exit, taking its trainer with it
    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=concurrency, reuse_actors=False)
    run_config = tune.RunConfig(name=spec.name, **storage_mod.ray_storage(spec.storage, spec.storage_endpoint),
                                failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                callbacks=[_janitor()])
    return trainable, tune_config, run_config, _search_space(plan.params, spec.search)


def search(config: str | Path | dict, overrides: list[str] | None = None, name: str = "", storage: str = "",
           address: str = "", out: str | Path | None = None, log: Log = print) -> dict[str, Any]:
    """Run (or resume) a search; write the results table, best config and plot. Returns the summary."""
    from ray import tune

    from biflow.data import storage as storage_mod

    t_start = time.time()
    spec, bases, params = load_search(config, overrides, name, storage)
    if "://" not in spec.storage:
        spec.storage = str(Path(spec.storage).expanduser().resolve())
    storage_mod.resolve(spec.storage, spec.storage_endpoint)  # a bad URI / missing bucket fails now
    runs_storage = spec.storage.rstrip("/") + f"/{spec.name}/runs"
    stages = STAGE_ORDER[spec.stage]
    plan = Plan(name=spec.name, stages=stages, stage_bases={s: _absolute(bases[s]) for s in stages},
                params=params, metric=spec.metric, mode=spec.mode, runs_storage=runs_storage,
                storage_endpoint=spec.storage_endpoint, fid_samples=spec.fid_samples,
                fid_batch_size=spec.fid_batch_size)
    if "forward-once" in bases:
        bases["forward-once"] = _absolute(bases["forward-once"])
    trial_cfg = stage_config(plan, stages[-1], {}, "check", "x")
    for s in stages:
        from biflow.data.shards import read_manifest

        d = stage_config(plan, s, {}, "check", "x").data
        read_manifest(d.uri, d.endpoint, d.region)  # missing shards fail now, naming data.uri

    _init_ray(address, trial_cfg.ray.workers * trial_cfg.ray.cpus_per_worker + spec.resources.trial_cpus)
    if spec.stage == "reverse":
        plan.forward_checkpoint = _forward_once(spec, bases, runs_storage, address, log)
        stage_config(plan, "reverse", {}, "check")  # forward checkpoint in place: the reverse job is complete
    ref_stats = None
    if spec.metric == "fid":
        # FID comes with a trial's last report only; the training reports before it lack it
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        ref_stats = _reference_stats(trial_cfg, spec.fid_samples, spec.fid_batch_size, log)

    trainable, tune_config, run_config, space = _make_tuner(spec, plan, ref_stats, trial_cfg, address, log)
    experiment = spec.storage.rstrip("/") + "/" + spec.name
    fs_kwargs = storage_mod.ray_storage(spec.storage, spec.storage_endpoint)
    restore_fs = fs_kwargs.get("storage_filesystem")
    restore_path = experiment if restore_fs is None else fs_kwargs["storage_path"].rstrip("/") + "/" + spec.name
    if tune.Tuner.can_restore(restore_path, storage_filesystem=restore_fs):
        log(f"resuming search {spec.name} from {experiment}")
        tuner = tune.Tuner.restore(restore_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=restore_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()
    out_dir = Path(out) if out else (Path(experiment) / "results" if "://" not in experiment
                                     else Path("runs/tune") / spec.name / "results")
    summary = write_results(grid, spec, bases, plan, out_dir, time.time() - t_start, log)
    return summary


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def _trial_rows(grid, spec: SearchSpec, plan: Plan) -> list[dict[str, Any]]:
    full_steps = stage_config(plan, plan.stages[-1], {}, "check", "x").train.steps
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        cfg = dict(result.config or {})
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "")
        value = metrics.get(spec.metric)
        if result.error is not None:
            status = "error"
        elif not metrics:
            status = "not run"
        elif spec.metric == "fid":
            status = "completed" if "fid" in metrics else "stopped early"
        else:
            done = metrics.get("stage") == plan.stages[-1] and metrics.get("step", 0) >= full_steps
            status = "completed" if done else "stopped early"
        prefix = f"{plan.name}-{trial_id}"
        row = {"trial_id": trial_id, "status": status,
               **{p.key: _plain(cfg.get(p.key)) for p in plan.params},
               spec.metric: None if value is None else float(value),
               "stage": metrics.get("stage", ""), "step": metrics.get("step"),
               "reports": metrics.get("training_iteration"), "seconds": metrics.get("time_total_s"),
               "runs": ";".join(f"{plan.runs_storage}/{prefix}-{s}" for s in plan.stages),
               "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:300]}
        if "loss" in metrics and spec.metric != "loss":
            row["loss"] = float(metrics["loss"])
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best finished trial (an early-stopped trial's metric is from fewer steps)."""
    def finite(r):
        v = r.get(metric)
        return v is not None and math.isfinite(v)

    pool = [r for r in rows if r["status"] == "completed" and finite(r)] or [r for r in rows if finite(r)]
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda r: r[metric])


def best_configs(spec: SearchSpec, bases: dict[str, dict], plan: Plan, row: dict[str, Any]) -> dict[str, dict]:
    """stage -> experiment dict of the best trial, as `biflow train STAGE --config` takes it."""
    params = {p.key: row[p.key] for p in plan.params}
    out: dict[str, dict] = {}
    for stage in plan.stages:
        data = copy.deepcopy(bases[stage])
        for p in plan.params:
            if stage in _stages_for(p, plan.stages):
                _set_dotted(data, p.key, params[p.key])
        data["stage"] = stage
        data["name"] = f"{spec.name}-best-{stage}"
        if stage == "reverse":
            # the frozen flow the trial was trained against (a search over flow.*: the trial's own)
            fwd = (f"{plan.runs_storage}/{plan.name}-{row['trial_id']}-forward" if "forward" in plan.stages
                   else plan.forward_checkpoint)
            data.setdefault("train", {})["forward_checkpoint"] = fwd
        out[stage] = to_dict(load_config(data))  # validated: what biflow train will read
    return out


def plot_results(rows: list[dict[str, Any]], plan: Plan, metric: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(plan.params)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red", "not run": "tab:gray"}
    for ax, p in zip(axes[0], plan.params):
        categorical = p.dist in ("choice", "grid") and not all(_is_number(v) for v in p.args)
        for status, color in colors.items():
            pts = [(r[p.key], r[metric]) for r in rows if r["status"] == status and r.get(metric) is not None
                   and r.get(p.key) is not None]
            if not pts:
                continue
            xs = [([str(v) for v in p.args].index(str(x)) if categorical else x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], c=color, label=status, s=36, alpha=0.85, edgecolors="k",
                       linewidths=0.4)
        if categorical:
            ax.set_xticks(range(len(p.args)), [str(v) for v in p.args])
        if p.dist == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"{plan.name}: {metric} vs parameters ({len(rows)} trials; stopped early: last report)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(grid, spec: SearchSpec, bases: dict[str, dict], plan: Plan, out_dir: Path, seconds: float,
                  log: Log = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _trial_rows(grid, spec, plan)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    best = best_row(rows, spec.metric, spec.mode)
    summary: dict[str, Any] = {
        "name": spec.name, "stage": spec.stage, "metric": spec.metric, "mode": spec.mode, "search": spec.search,
        "trials": len(rows), "status": {s: sum(r["status"] == s for r in rows) for s in
                                        sorted({r["status"] for r in rows})},
        "seconds": seconds, "results": str(out_dir), "best": None,
    }
    values = [r[spec.metric] for r in rows if r.get(spec.metric) is not None and math.isfinite(r[spec.metric])]
    if values:
        summary["metric_range"] = [min(values), max(values)]
    if best is not None:
        configs = best_configs(spec, bases, plan, best)
        header = (f"# Best trial {best['trial_id']} of search {spec.name!r}: {spec.metric}={best[spec.metric]:.6g} "
                  f"({spec.mode}), {best['status']}.\n# Parameters: "
                  + ", ".join(f"{p.key}={best[p.key]}" for p in plan.params) + "\n")
        files = {}
        for stage, data in configs.items():
            fname = "best.yaml" if stage == plan.stages[-1] else f"best-{stage}.yaml"
            cmd = f"# Train it: biflow train {stage} --config {out_dir / fname}\n"
            (out_dir / fname).write_text(header + cmd + yaml.safe_dump(data, sort_keys=False))
            files[stage] = str(out_dir / fname)
        summary["best"] = {"trial_id": best["trial_id"], spec.metric: best[spec.metric], "status": best["status"],
                           "params": {p.key: best[p.key] for p in plan.params}, "configs": files,
                           "runs": best["runs"]}
    if plan.params and rows:
        summary["plot"] = str(plot_results(rows, plan, spec.metric, out_dir / "metric-vs-params.png"))
    (out_dir / "best.json").write_text(json.dumps(summary, indent=2, default=str))
    log(format_table(rows, plan, spec.metric))
    if best is not None:
        log(f"best: trial {best['trial_id']} {spec.metric}={best[spec.metric]:.4g} -> {summary['best']['configs']}")
    log(f"results: {out_dir} ({seconds:.0f} s); TensorBoard: tensorboard --logdir {plan.runs_storage}")
    return summary


def format_table(rows: list[dict[str, Any]], plan: Plan, metric: str) -> str:
    cols = ["trial_id", "status", *[p.key for p in plan.params], metric, "step"]
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
