"""Assemble and run a ``TorchTrainer`` for one stage.

Everything that can be wrong with a run is checked here, on the driver, before
any worker starts: the config (keys named), the run storage (bucket exists),
the data manifest, the stage-1 checkpoint of a reverse run, and that a resumed
run keeps the world size its ZeRO state was written with.
"""

from __future__ import annotations

import math
import os
from typing import Any

from biflow.config import ConfigError, ExperimentConfig, FlowConfig, from_dict, to_dict
from biflow.errors import UserError
from biflow.fleet import START_TIMEOUT_ENV
from biflow.train import checkpoint as ckpt_io
from biflow.train.callbacks import Callbacks
from biflow.train.callbacks import resolve as resolve_callbacks
from biflow.train.loop import RunInfo, train_loop

WORKER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train tees print() to stdout and to its logger, so every progress line showed twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # a worker group that waits for GPU nodes to scale up from zero (minutes) is not a failed start
    **START_TIMEOUT_ENV,
}


# Copied from the driver when set there. AWS_EC2_METADATA_DISABLED is never forced on:
# on cloud nodes the instance role (through the metadata service) supplies S3 credentials.
PASSTHROUGH_ENV = ("AWS_EC2_METADATA_DISABLED", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                   "STORAGE_EMULATOR_HOST", "BIFLOW_STORAGE_RETRY_MINUTES")


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: fixed settings plus the driver's pass-through values."""
    return {**WORKER_ENV, **{k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}}


class TrainingFailed(UserError):
    """The run stopped with an error; the message is the worker's, in one line."""


def prepare(cfg: ExperimentConfig, name: str | None = None, storage: str | None = None,
            workers: int | None = None) -> tuple[ExperimentConfig, RunInfo]:
    """Validate and resolve everything a run needs; raises UserError naming the key."""
    from biflow.data import storage as storage_mod

    if name:
        cfg.name = name
    if storage:
        cfg.ray.storage = storage
    if workers:
        cfg.ray.workers = workers
    # workers resolve paths in their own working directory: a relative run storage would put
    # the commit markers (and the reverse stage's forward lookup) somewhere else
    cfg.ray.storage = storage_mod.absolute(cfg.ray.storage)
    cfg.data.uri = storage_mod.absolute(cfg.data.uri)
    cfg.validate()
    if cfg.stage == "reverse" and cfg.reverse.perceptual_weight > 0:  # fails here, not on every worker
        from biflow.perceptual import check_settings

        check_settings(cfg.reverse.perceptual)
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name={cfg.name!r}: a run name must be non-empty and contain no '/'")
    run = RunInfo(name=cfg.name, storage=cfg.ray.storage, endpoint=cfg.ray.storage_endpoint)
    storage_mod.resolve(run.storage, run.endpoint, run.region)  # bucket exists, URI is well formed

    if cfg.stage == "reverse":
        if not cfg.train.forward_checkpoint:
            raise ConfigError("train.forward_checkpoint is required for the reverse stage: "
                              "a stage-1 run name (under ray.storage) or a checkpoint path/URI")
        ref = ckpt_io.find_checkpoint(cfg.train.forward_checkpoint, run.storage, run.endpoint, run.region)
        meta = ref.metadata()
        if meta.get("stage") != "forward":
            raise ConfigError(f"train.forward_checkpoint={cfg.train.forward_checkpoint!r} is a "
                              f"{meta.get('stage')!r} checkpoint; the reverse stage needs a forward-stage one")
        cfg.flow = from_dict(FlowConfig, ckpt_io.saved_config(meta)["flow"], "flow")  # the flow as it was trained
        run.forward_checkpoint = ref.uri
        cfg.reverse.check_flow(cfg.flow, "the forward checkpoint")

    latest = ckpt_io.latest_checkpoint(run.uri, run.endpoint, run.region)
    if latest is not None:
        meta = latest.metadata()
        if meta.get("stage", cfg.stage) != cfg.stage:
            raise ConfigError(f"name={cfg.name!r}: run {run.uri} holds {meta['stage']!r} checkpoints; "
                              f"choose another --name for the {cfg.stage} stage")
        ckpt_io.check_world_size(meta.get("world_size"), cfg.ray.workers, run.uri)
    ckpt_io.clear_diverged(run.uri, run.endpoint, run.region)  # rerunning a stopped run is a deliberate retry
    return cfg, run


def check_data(cfg: ExperimentConfig) -> None:
    """The shards exist and fit the job, before any worker starts: the manifest is
    readable (naming data.uri), its kind is data.kind, and latent data has an
    autoencoder whose latents have the flow's shape."""
    from biflow.data.shards import read_manifest

    manifest = read_manifest(cfg.data.uri, cfg.data.endpoint, cfg.data.region)
    if manifest.kind != cfg.data.kind:
        raise ConfigError(f"data.kind={cfg.data.kind!r}, but {cfg.data.uri} holds {manifest.kind}: "
                          f"set data.kind={manifest.kind}")
    if manifest.kind == "latents":
        from biflow.data.latents import check_latent_setup

        check_latent_setup(manifest, cfg.flow.channels, cfg.flow.image_size, cfg.data.autoencoder)


def init_ray(address: str | None, cfg: ExperimentConfig | None = None, cpus_needed: float | None = None) -> None:
    """Connect to a cluster (``--address`` / RAY_ADDRESS) or start a small local instance
    with room for ``cpus_needed`` (default: the config's workers) plus Ray Data readers."""
    import ray

    if ray.is_initialized():
        return
    address = address or (cfg.ray.address if cfg else "") or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": worker_env()}
    if address:
        # A cluster (or a submitted job, whose runtime env Ray refuses to merge with a second
        # one) keeps its own environment; the trainer passes worker_env() to its workers.
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Data needs CPU slots beside the training workers, or reading stalls.
    if cpus_needed is None:
        cpus_needed = cfg.ray.workers * cfg.ray.cpus_per_worker if cfg else 1
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed) + 2)
    # The dashboard serves the state API that Ray Train's placement-group cleaner uses to free
    # the CPUs of stopped worker groups. Loopback only; port 0: the dashboard binds a port the OS
    # picks and publishes it to the GCS (8265 may be taken, and a guessed free port can be taken
    # by another process before the dashboard binds it).
    ray.init(address="local", num_cpus=cpus, object_store_memory=512 * 1024**2, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=0, runtime_env=runtime_env, log_to_driver=True)


def _use_gpu(cfg: ExperimentConfig) -> bool:
    """``auto`` asks what the cluster can have (its autoscaler's node types), not what is
    up now: a fleet that scales GPUs from zero has none when the job is submitted."""
    from biflow.fleet import capacity

    if cfg.ray.use_gpu == "no":
        return False
    maxima = capacity.autoscaler_maxima()  # asked once: a GCS, file or Kubernetes API lookup
    gpus = capacity.reachable("GPU", maxima)
    if cfg.ray.use_gpu == "yes":
        if gpus < 1 and maxima is not None:  # known node types, none with a GPU
            raise ConfigError("ray.use_gpu=yes, but no node type of this cluster's autoscaler has a GPU: "
                              "add a GPU node type or set ray.use_gpu=no")
        return True
    return gpus >= 1


def build_trainer(cfg: ExperimentConfig, run: RunInfo, datasets: dict[str, Any] | None = None,
                  callbacks: Callbacks | None = None, report_callbacks: list | None = None):
    """The TorchTrainer for a prepared config (Ray must be initialised). ``callbacks``
    go to the loop on every worker; ``report_callbacks`` are Ray Train callbacks of
    the driver (e.g. Tune's, which forward every report to a trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from biflow.data import storage as storage_mod

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the loop prints its own progress line
    use_gpu = _use_gpu(cfg)
    stats = ""
    if datasets is None:
        from biflow.data.pipeline import STATS_ACTOR, build_dataset, data_stats_actor

        stats = f"{STATS_ACTOR}-{run.name}-{os.getpid()}"  # counts corrupt records skipped by decoding
        data_stats_actor(stats)
        datasets = {"train": build_dataset(cfg.data, cfg.data.split, cfg.flow.image_size, cfg.flow.channels,
                                           train=True, seed=cfg.train.seed, stats=stats)}
    env = {**worker_env(), "DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    for key in cfg.ray.resources_per_worker:
        if key in ("CPU", "GPU"):
            raise ConfigError(f"ray.resources_per_worker.{key}: set ray.cpus_per_worker / ray.use_gpu instead")
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **cfg.ray.resources_per_worker}
    run_config = RunConfig(
        name=run.name,
        **storage_mod.ray_storage(run.storage, run.endpoint, run.region),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                     max_preemption_failures=cfg.ray.max_preemption_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": env},
        callbacks=list(report_callbacks or []) or None,
    )
    loop_config = {"experiment": to_dict(cfg), "run": vars(run).copy(), "callbacks": callbacks or Callbacks(),
                   "data_stats": stats}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     accelerator_type=cfg.ray.accelerator_type or None,
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
    )


def fit(cfg: ExperimentConfig, name: str | None = None, storage: str | None = None, address: str | None = None,
        *, workers: int | None = None, datasets: dict[str, Any] | None = None,
        callbacks: Callbacks | None = None, hooks: dict[str, Any] | None = None,
        report_callbacks: list | None = None, failure_prefix: str = ""):
    """Train one stage. Rerunning with the same name and storage resumes.

    ``datasets`` replaces the Ray Data dataset built from ``cfg.data`` (tests,
    notebooks). ``callbacks`` (:class:`biflow.train.callbacks.Callbacks`) are
    called by the loop; ``hooks`` is the fault tests' shorthand for a
    :class:`~biflow.train.callbacks.FaultInjection`. ``report_callbacks`` are Ray
    Train callbacks of the driver (a Tune trial forwards reports with one);
    ``failure_prefix`` starts the message of a failed run. Returns Ray's
    ``Result`` (``.checkpoint``, ``.metrics``, ``.path``).
    """
    from ray.train import TrainingFailedError

    loop_callbacks = resolve_callbacks(callbacks, hooks)
    cfg, run = prepare(cfg, name, storage, workers)
    if datasets is None:
        check_data(cfg)
    init_ray(address, cfg)
    trainer = build_trainer(cfg, run, datasets, loop_callbacks, report_callbacks)
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingFailed(f"{failure_prefix}{cfg.stage} run {run.name!r} failed: {worker_message(exc)} "
                             f"(checkpoints and logs under {run.uri})") from exc
    finally:
        stats = trainer.train_loop_config.get("data_stats") if isinstance(trainer.train_loop_config, dict) else ""
        if stats:
            from biflow.data.pipeline import release_data_stats

            release_data_stats(stats)


def worker_message(exc: BaseException) -> str:
    """The most useful line of a Ray Train failure: the worker's own exception."""
    failures = getattr(exc, "worker_failures", None) or {}
    for err in failures.values():
        cause = err
        while getattr(cause, "cause", None) is not None and cause is not cause.cause:
            cause = cause.cause
        text = str(cause).strip().splitlines()
        for line in reversed(text):
            if line.strip() and not line.startswith(" "):
                return line.strip()
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
