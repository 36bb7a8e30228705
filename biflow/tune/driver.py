"""``search``: build the Tuner (search space, searcher, ASHA), run or resume
it, and write the results."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Callable

from biflow.config import ConfigError, ExperimentConfig, load_config
from biflow.errors import UserError
from biflow.tune.placement_groups import janitor
from biflow.tune.results import write_results
from biflow.tune.spec import STAGE_ORDER, Param, Plan, SearchSpec, absolute, load_search
from biflow.tune.trial import reports_per_stage, run_trial, stage_config

Log = Callable[[str], None]



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

def _concurrency(spec: SearchSpec, cfg: ExperimentConfig) -> int:
    """Trials at once: what the cluster can have (its autoscaler's node types) divided by
    one trial's needs, not what is up now (a fleet scaled to zero has nothing up)."""
    from biflow.fleet.capacity import reachable

    if spec.max_concurrent:
        return spec.max_concurrent
    per_trial_cpu = cfg.ray.workers * cfg.ray.cpus_per_worker + spec.resources.trial_cpus
    by_cpu = int(max(reachable("CPU") - 1, 1) // max(per_trial_cpu, 1e-9))  # one CPU left for Ray Data
    gpus = reachable("GPU")
    by_gpu = int(gpus // cfg.ray.workers) if gpus and cfg.ray.use_gpu != "no" else by_cpu
    return max(1, min(by_cpu, by_gpu, spec.num_samples))


def _reference_stats(cfg: ExperimentConfig, n: int, batch_size: int, log: Log) -> tuple:
    """Inception statistics of ``n`` held-out images (data.eval_split), cached under the data URI (not the
    images' content, as ``biflow evaluate`` does), so a cache hit reads no images."""
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
                                callbacks=[janitor()])
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
    plan = Plan(name=spec.name, stages=stages, stage_bases={s: absolute(bases[s]) for s in stages},
                params=params, metric=spec.metric, mode=spec.mode, runs_storage=runs_storage,
                storage_endpoint=spec.storage_endpoint, fid_samples=spec.fid_samples,
                fid_batch_size=spec.fid_batch_size)
    if "forward-once" in bases:
        bases["forward-once"] = absolute(bases["forward-once"])
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

