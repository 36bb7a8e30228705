"""The per-worker training loop: one function for both stages, used unchanged
by ``TorchTrainer`` on a laptop and on a cluster.

Read it top to bottom in :func:`train_loop`:

1. build the stage (forward flow, or reverse model + frozen flow),
2. wrap it in an engine (DeepSpeed ZeRO or DDP) and an EMA,
3. resume from ``ray.train.get_checkpoint()`` if the run has one,
4. step: forward, NaN/inf guard (all ranks agree), backward, optimizer step, EMA,
5. every ``log_every`` steps: TensorBoard + a console line (rank 0),
   every ``sample_every``: a sample grid, every ``checkpoint_every`` and at the
   end: a checkpoint reported by every rank.

``train_loop_config`` is ``{"experiment": to_dict(cfg), "run": {...}, "callbacks": Callbacks}``:
``run`` carries the run name, storage URI and the resolved forward checkpoint;
``callbacks`` (:mod:`biflow.train.callbacks`) are called at fixed points of the
loop (the fault tests inject NaNs and kill workers through them).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from biflow.config import ExperimentConfig, load_config, to_dict
from biflow.data.pipeline import to_device
from biflow.ema import EMA
from biflow.errors import UserError
from biflow.train import checkpoint as ckpt_io
from biflow.train.callbacks import Callbacks
from biflow.train.clock import PhaseTimer, StageClock  # noqa: F401 (StageClock: the loop's public clock)
from biflow.train.engine import (Engine, any_rank, build_engine, mean_over_ranks, rank,
                                 resolve_device, world_size)
from biflow.train.progress import Logger, PreemptionNotice, RunInfo  # RunInfo: imported from here too


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs."""

    step: int = 0  # optimizer updates applied (the global step)
    epoch: int = 0
    batch_in_epoch: int = 0  # data position: batches consumed in ``epoch`` by each worker
    samples_seen: int = 0  # over all workers
    skipped_steps: int = 0  # attempts skipped for a non-finite loss or gradient
    ema_updates: int = 0
    train_seconds: float = 0.0  # wall time of the training loop up to this state, over all resumes
    warmup_end_s: float = -1.0  # train_seconds when the LR warmup ended (time-budgeted cosine); -1: not yet


# ---------------------------------------------------------------------------
# Stages: what is trained, its loss and how to sample it
# ---------------------------------------------------------------------------


class ForwardStage:
    """Stage 1: the forward flow F by maximum likelihood."""

    name = "forward"

    def __init__(self, cfg: ExperimentConfig, run: RunInfo, device: torch.device):
        self.cfg, self.device = cfg, device
        self.codec = None  # latent data: the frozen autoencoder that turns samples into images
        if cfg.data.kind == "latents":
            from biflow.data.latents import LatentCodec

            self.codec = LatentCodec.from_data_config(cfg.data, device)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1] (latents decoded through the frozen autoencoder)."""
        return self.codec.decode(x) if self.codec is not None else x

    def build(self) -> nn.Module:
        from biflow.models import build_flow

        flow = build_flow(self.cfg.flow)
        if hasattr(flow, "set_generator"):  # a stochastic log-det (resflow): its draws follow the run's seed
            flow.set_generator(torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 7919 + 17
                                                                                + rank()))
        return flow

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, generator=None, step=None,
             progress=None):
        from biflow.losses import forward_loss

        return forward_loss(model, x, y, self.cfg.flow, generator=generator)

    def init_from_data(self, module: nn.Module, batches: Iterator, generator=None) -> str:
        """Weights fitted to data before the first step, before the engine copies them: a flow
        with data-dependent init (Glow's actnorm) sees the first batch, noised as in training,
        and takes rank 0's values on every rank. A log line or ""."""
        if not hasattr(module, "data_init"):
            return ""
        _, _, x, y = next(batches)
        x = to_device(x, self.device, torch.float32)
        x = x + self.cfg.flow.noise_std * torch.randn(x.shape, device=x.device, generator=generator)
        y = y.to(self.device) if self.cfg.flow.num_classes > 0 else None
        module.data_init(x, y)
        return f"{self.cfg.flow.family}: data-dependent init from the first batch of {len(x)} (rank 0's on every rank)"

    def sample(self, module: nn.Module, y: torch.Tensor | None, generator=None) -> torch.Tensor:
        from biflow.sampling import sample_exact

        return sample_exact(module, y, tweedie=True, num=16, generator=generator)


class ReverseStage(ForwardStage):
    """Stage 2: the reverse model G against the frozen forward flow (EMA weights)."""

    name = "reverse"

    def __init__(self, cfg: ExperimentConfig, run: RunInfo, device: torch.device):
        super().__init__(cfg, run, device)
        from biflow.train.checkpoint import load_checkpoint

        loaded = load_checkpoint(run.forward_checkpoint, run.storage, run.endpoint, run.region, device,
                                 key="train.forward_checkpoint", check=False)
        if loaded.stage != "forward":
            raise UserError(f"train.forward_checkpoint={run.forward_checkpoint!r} is a {loaded.stage} checkpoint "
                            f"({loaded.uri}); give a stage-1 (forward) run")
        self.flow = loaded.model.requires_grad_(False)
        self.flow_cfg = flow_cfg = loaded.config.flow
        cfg.flow = flow_cfg  # checkpoints record the flow G was trained against, not the job's flow defaults
        self.feature_net = None
        if cfg.reverse.perceptual_weight > 0:
            from biflow.perceptual import build_feature_net

            net = build_feature_net(cfg.reverse.perceptual)
            if net is not None and device.type == "cuda":
                net = net.to(memory_format=torch.channels_last)  # bf16 convolutions' layout (perceptual_distance)
            self.feature_net = net.to(device).eval().requires_grad_(False) if net is not None else None

    def build(self) -> nn.Module:
        from biflow.models import ReverseModel

        return ReverseModel(self.cfg.reverse, self.flow_cfg)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, generator=None, step=None,
             progress=None):
        from biflow.losses import reverse_loss

        decode = self.codec.decode if self.codec is not None else None
        return reverse_loss(model, self.flow, x.float(), y, self.cfg.reverse, self.flow_cfg,
                            feature_net=self.feature_net, generator=generator, decode=decode, step=step,
                            progress=progress)

    def init_from_data(self, module: nn.Module, batches: Iterator, generator=None) -> str:
        """``reverse.z_skip_init: ridge``: before the first step, set G's linear z skip to the
        ridge fit of its target (clean x; x~ under Tweedie) from z over the first
        ``z_skip_init_batches`` batches of every rank (statistics summed over ranks, so all
        ranks start from the same weights). Returns a line for the log ("" = nothing done)."""
        rcfg = self.cfg.reverse
        if rcfg.z_skip == "none" or rcfg.z_skip_init != "ridge":
            return ""
        from biflow.losses import make_pairs

        def pairs():
            for _ in range(rcfg.z_skip_init_batches):
                _, _, x, y = next(batches)
                x = to_device(x, self.device, torch.float32)
                y = y.to(self.device) if self.flow_cfg.num_classes > 0 else None
                pair = make_pairs(self.flow, x, y, self.flow_cfg, generator)
                yield pair.states[-1], pair.target(rcfg)

        def reduce(t: torch.Tensor) -> torch.Tensor:
            if world_size() > 1:
                torch.distributed.all_reduce(t)
            return t

        t0 = time.perf_counter()
        rows = module.fit_z_skip(pairs(), reduce=reduce)
        return (f"z skip ({rcfg.z_skip}) set to the ridge fit of G's target from z over "
                f"{rows * world_size()} pairs in {time.perf_counter() - t0:.1f} s")

    def sample(self, module: nn.Module, y: torch.Tensor | None, generator=None) -> torch.Tensor:
        from biflow.sampling import sample_biflow

        w = self.cfg.reverse.guidance_max / 2 if y is not None else 0.0
        return sample_biflow(module, y, guidance=w, num=16, generator=generator)


STAGES = {"forward": ForwardStage, "reverse": ReverseStage}


def sample_grid(stage: ForwardStage, ema_state: dict[str, torch.Tensor], labels: torch.Tensor | None, seed: int,
                step: int, logger: "Logger") -> None:
    """Sample 16 images from the EMA weights (decoded when latent) into TensorBoard and a PNG.
    A failure is reported and training goes on: grids are a view, not the run's product."""
    try:
        module = stage.build().to(stage.device)
        module.load_state_dict(ema_state)
        gen = torch.Generator(device=stage.device).manual_seed(seed)
        with torch.no_grad():
            images = stage.to_images(stage.sample(module.eval(), labels, generator=gen))
        logger.image(step, images)
    except Exception as exc:  # noqa: BLE001 - any sampling bug must not kill (and re-kill) the run
        print(f"[{stage.name}] warning: sample grid at step {step} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Logging (rank 0)
# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _batches(cfg: ExperimentConfig, state: TrainState) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(epoch, index, x, y)`` forever, epoch after epoch, from this worker's shard.

    A resumed run restarts its interrupted epoch (the shard stream cannot seek);
    ``state.batch_in_epoch`` records how far it had got.
    """
    import ray.train

    from biflow.data.pipeline import iter_worker_batches

    shard = ray.train.get_dataset_shard("train")
    gpu = torch.cuda.is_available()  # uint8 images in pinned memory: 4x fewer bytes, converted on the GPU
    epoch = state.epoch
    while True:
        n = -1
        for n, (x, y) in enumerate(iter_worker_batches(shard, cfg.train.batch_size, epoch=epoch,
                                                       seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                                       prefetch_batches=cfg.data.prefetch_batches, device="cpu",
                                                       keep_uint8=gpu, pin_memory=gpu)):
            yield epoch, n, x, y
        if n < 0:
            raise RuntimeError(f"the training data gave this worker no batch of train.batch_size="
                               f"{cfg.train.batch_size}; use a smaller batch or more data")
        epoch += 1


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_checkpoint(engine: Engine, ema: EMA, state: TrainState, cfg: ExperimentConfig, run: RunInfo,
                    metrics: dict[str, float], ema_full: dict[str, torch.Tensor] | None = None,
                    callbacks: Callbacks | None = None, stage: ForwardStage | None = None) -> None:
    """Collective: every rank saves engine state to a local dir and reports it."""
    import ray.train

    directory = tempfile.mkdtemp(prefix=f"biflow-ckpt-{state.step:08d}-")
    state.ema_updates = ema.num_updates
    engine.save(directory, {"biflow": dataclasses.asdict(state), "world_size": world_size()})
    ema_full = ema_full if ema_full is not None else ema.full_state_dict()
    if rank() == 0:
        meta = {"stage": cfg.stage, "run": run.name, "world_size": world_size(), "engine": cfg.train.engine,
                "zero_stage": cfg.train.zero_stage, "config": to_dict(cfg), **dataclasses.asdict(state),
                "commit_marker": True,
                # latent runs: the codec's record, so sampling a checkpoint needs no shards
                **({"latents": stage.codec.info()} if stage is not None and stage.codec is not None else {}),
                "data_position": {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                                  "samples_seen": state.samples_seen}}
        ckpt_io.write_rank0_files(directory, ema_full, meta)
    if callbacks is not None:
        callbacks.on_checkpoint_phase("save", state.step)
    ray.train.report({**metrics, "step": state.step, "skipped_steps": state.skipped_steps},
                     checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_dir_name=ckpt_io.checkpoint_dir_name(state.step),
                     delete_local_checkpoint_after_upload=True)
    # report() syncs ranks before the upload, not after it: wait for every rank's
    # upload, then mark the checkpoint complete (a partial one is never "latest").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if callbacks is not None:
        callbacks.on_checkpoint_phase("commit", state.step)
    if rank() == 0:
        from biflow.data import storage

        fs, path = storage.resolve(run.uri, run.endpoint, run.region, check=False)
        ckpt_io.commit(fs, storage.join(path, ckpt_io.checkpoint_dir_name(state.step)))


def newest_checkpoint(checkpoint: Any, run: RunInfo) -> tuple[Any, str]:
    """Ray's latest checkpoint, or a newer committed one in the run directory.

    Ray registers a checkpoint on the controller some time after every rank
    reported it; a worker or driver killed in between leaves a complete,
    committed checkpoint that Ray does not know about. Resuming from Ray's
    older one would repeat committed steps."""
    import ray.train

    ray_step = -1
    if checkpoint is not None:
        m = ckpt_io.CHECKPOINT_RE.match(Path(str(checkpoint.path)).name)
        ray_step = int(m.group(1)) if m else -1
        if not ckpt_io.is_committed(checkpoint.filesystem, str(checkpoint.path)):
            ray_step = -1  # registered by Ray but never committed (e.g. killed mid-upload): not a checkpoint
            checkpoint = None
    ours = ckpt_io.latest_checkpoint(run.uri, run.endpoint, run.region)
    if ours is not None and ours.step > ray_step:
        return ray.train.Checkpoint(path=ours.path, filesystem=ours.fs), (
            f"checkpoint {ours.step} (committed; Ray had registered {ray_step if ray_step >= 0 else 'none'})")
    return checkpoint, f"checkpoint {ray_step}"


def restore(engine: Engine, ema: EMA, checkpoint: Any) -> TrainState:
    """Load engine state, EMA and the train state from the run's latest checkpoint."""
    import json

    from safetensors.torch import load_file

    with checkpoint.as_directory() as directory:
        meta = json.loads((Path(directory) / ckpt_io.METADATA).read_text())
        ckpt_io.check_world_size(meta.get("world_size", world_size()), world_size(), meta.get("run", "?"))
        client = engine.load(directory)
        ema.load_full_state_dict(load_file(str(Path(directory) / ckpt_io.EMA_FILE)))
    state = TrainState(**client["biflow"])
    ema.num_updates = state.ema_updates
    return state


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function for both stages."""
    import ray.train

    cfg: ExperimentConfig = load_config(config["experiment"])
    run = RunInfo(**config.get("run", {}))
    callbacks: Callbacks = config.get("callbacks") or Callbacks()
    stopped = ckpt_io.diverged(run.uri, run.endpoint, run.region)
    if stopped:  # a FailureConfig restart after a divergence would only diverge again
        raise TrainingDiverged(f"{stopped} (not restarted)")
    device = resolve_device()
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank())

    stage = STAGES[cfg.stage](cfg, run, device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    module = stage.build()
    torch.manual_seed(cfg.train.seed + 1000 * (rank() + 1))  # anything random beyond the losses differs per rank
    is_rank0 = rank() == 0
    say = (lambda msg: print(f"[{cfg.stage}] {msg}", flush=True)) if is_rank0 else (lambda msg: None)
    checkpoint, source = newest_checkpoint(ray.train.get_checkpoint(), run)
    batches = None
    if checkpoint is None:  # data-fitted weights, before the engine copies them
        batches = _batches(cfg, TrainState())
        done = stage.init_from_data(module.to(device), batches, generator)
        if done:
            say(done)
    clock = StageClock(cfg.train.time_budget_s)
    engine = build_engine(module, cfg, device, clock=clock)
    ema = EMA(engine.module, cfg.optim.ema_decay)

    state = TrainState()
    if checkpoint is not None:
        state = restore(engine, ema, checkpoint)
        clock.warmup_end = state.warmup_end_s if state.warmup_end_s >= 0 else None
        say(f"resumed {run.name} at step {state.step} from {source} "
            f"(epoch {state.epoch}, {state.samples_seen} samples seen)")
    start_step = state.step
    total = cfg.train.steps
    clock.resume(state.train_seconds)  # a run resumed with its budget spent takes no step
    nparams = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    say(f"{run.name}: {nparams / 1e6:.2f}M params, {world_size()} workers, engine {cfg.train.engine}"
        f"{' ZeRO-' + str(cfg.train.zero_stage) if cfg.train.engine == 'deepspeed' else ''}, {engine.precision}, "
        f"device {device.type}" + (f" ({torch.get_num_threads()} torch threads)" if device.type == "cpu" else "")
        + f", batch {cfg.train.batch_size}x{cfg.train.grad_accum}x{world_size()}"
        + (", torch.compile" if cfg.train.compile else ""))

    if cfg.train.time_budget_s > 0:
        say(f"time budget {cfg.train.time_budget_s:g} s of training ({state.train_seconds:.0f} s spent): "
            f"the stage ends at step {total} or when it is spent")
    logger = Logger(run, cfg.stage, total, enabled=is_rank0, clock=clock)
    notice = PreemptionNotice(cfg.train.preemption_check_every, say)
    batches = batches or _batches(cfg, state)
    window: dict[str, float] = collections.defaultdict(float)
    window_steps, window_wait, window_start, window_pause = 0, 0.0, time.perf_counter(), 0.0
    phases = PhaseTimer()
    consecutive_bad = 0
    clock_started = False
    last_metrics: dict[str, float] = {}
    sample_labels = None
    if cfg.flow.num_classes > 0:
        sample_labels = torch.arange(16, device=device) % cfg.flow.num_classes

    def bad_step(reason: str) -> None:
        nonlocal consecutive_bad
        state.skipped_steps += 1
        consecutive_bad += 1
        say(f"step {state.step + 1}: {reason}; skipped (consecutive {consecutive_bad}, total {state.skipped_steps})")
        if consecutive_bad >= cfg.train.max_bad_steps:
            kept = f"step {state.step - state.step % cfg.train.checkpoint_every}" if state.step >= cfg.train.checkpoint_every else "none yet"
            message = (
                f"stopping: {consecutive_bad} consecutive non-finite steps at step {state.step + 1} "
                f"(train.max_bad_steps={cfg.train.max_bad_steps}); the last checkpoint ({kept}) is kept. "
                f"Try a lower optim.lr, a smaller optim.grad_clip or a larger optim.warmup_steps.")
            if is_rank0:
                ckpt_io.mark_diverged(run.uri, run.endpoint, run.region, message)
            raise TrainingDiverged(message)

    while state.step < total and not clock.expired:
        # one optimizer step = grad_accum micro-batches; metrics stay on the device (no host
        # sync) until a log step, and the step's one sync is the engine's finite-gradient check
        pending: dict[str, torch.Tensor] = {}
        loss_ok = None
        while True:
            t_wait = time.perf_counter()
            epoch, index, x, y = next(batches)
            window_wait += time.perf_counter() - t_wait
            if not clock_started:  # the clock starts at the first batch: data start-up is not training time
                clock.resume(state.train_seconds)
                clock_started = True
            state.epoch, state.batch_in_epoch = epoch, index + 1
            x = to_device(x, device, engine.input_dtype)
            y = y.to(device, non_blocking=True) if cfg.flow.num_classes > 0 else None
            t_phase = time.perf_counter()
            with engine.accumulate(), engine.autocast():
                loss, metrics = engine.call(lambda: stage.loss(engine.model, x, y, generator, step=state.step,
                                                               progress=clock.progress(state.step, total)))
            t_phase = phases.lap("loss", t_phase)
            loss = callbacks.corrupt_loss(state.step + 1, loss)
            finite = torch.isfinite(loss.detach())
            loss_ok = finite if loss_ok is None else loss_ok & finite
            engine.backward(loss)  # a non-finite loss makes the (all-reduced) gradients non-finite: skipped below
            t_phase = phases.lap("backward", t_phase)
            boundary = engine.is_boundary()
            applied = engine.step()
            phases.lap("optimizer", t_phase)
            for k, v in metrics.items():
                pending[k] = pending.get(k, 0.0) + v / cfg.train.grad_accum
            state.samples_seen += x.shape[0] * world_size()
            if boundary:
                break
        if not applied:
            bad_step("non-finite loss" if any_rank(not bool(loss_ok), device) else "non-finite gradient norm")
            continue
        for k, v in pending.items():
            window[k] += v
        consecutive_bad = 0
        state.step += 1
        t_phase = time.perf_counter()
        ema.update()
        phases.lap("ema", t_phase)
        window_steps += 1
        window["grad_norm"] += engine.last_grad_norm

        step = state.step
        clock.sync(device)
        state.train_seconds = clock.elapsed
        state.warmup_end_s = clock.warmup_end if clock.warmup_end is not None else -1.0
        last = step == total or clock.expired
        callbacks.on_step(step)
        log_now = step % cfg.train.log_every == 0 or last
        if log_now:
            elapsed = time.perf_counter() - window_start - window_pause
            means = mean_over_ranks({k: float(v) / window_steps for k, v in window.items()}, device)  # log steps only
            wait = mean_over_ranks({"w": window_wait / max(elapsed, 1e-9)}, device)["w"]
            steps_per_s = window_steps / max(elapsed, 1e-9)
            samples_per_s = steps_per_s * cfg.train.batch_size * cfg.train.grad_accum * world_size()
            last_metrics = {**means, "lr": engine.lr, "samples_per_s": samples_per_s, "steps_per_s": steps_per_s,
                            "data_wait_frac": wait}
            scalars = {f"train/{k}": v for k, v in means.items()}
            scalars.update({"train/lr": engine.lr, "train/skipped_steps": float(state.skipped_steps),
                            "perf/samples_per_s": samples_per_s, "perf/steps_per_s": steps_per_s,
                            "perf/data_wait_frac": wait,
                            "perf/ms_data_wait": 1e3 * window_wait / window_steps,
                            **{f"perf/ms_{k}": v for k, v in phases.per_step(window_steps).items()}})
            last_metrics.update({f"ms_{k}": v for k, v in phases.per_step(window_steps).items()},
                                ms_data_wait=1e3 * window_wait / window_steps)
            phases.clear()
            corrupt = None
            if is_rank0 and config.get("data_stats"):
                from biflow.data.pipeline import corrupt_records

                corrupt = corrupt_records(config["data_stats"])
                if corrupt is not None:
                    scalars["data/corrupt_records"] = float(corrupt)
            logger.scalars(step, scalars)
            extra = f" | bpd {means['bpd']:.3f}" if "bpd" in means else ""
            extra += f" | corrupt records skipped {corrupt}" if corrupt else ""
            extra += f" | lr {engine.lr:.2e} | skipped {state.skipped_steps}" if state.skipped_steps else f" | lr {engine.lr:.2e}"
            logger.console(step, means.get("loss", float("nan")), extra, samples_per_s, steps_per_s)
            window.clear()
            window_steps, window_wait, window_start, window_pause = 0, 0.0, time.perf_counter(), 0.0

        sample_now = cfg.train.sample_every > 0 and (step % cfg.train.sample_every == 0 or last)
        # a drained (preempted) node: checkpoint now, keep training until Ray restarts the group elsewhere
        ckpt_now = notice.due(step) or step % cfg.train.checkpoint_every == 0 or last
        t_pause = time.perf_counter()
        ema_full = ema.full_state_dict() if (sample_now or ckpt_now) else None
        if ckpt_now:  # before sampling: a grid that fails can never cost committed work
            save_checkpoint(engine, ema, state, cfg, run,
                            {**last_metrics, "start_step": float(start_step), "train_seconds": state.train_seconds},
                            ema_full=ema_full, callbacks=callbacks, stage=stage)
        if sample_now and is_rank0:
            sample_grid(stage, ema_full, sample_labels, cfg.train.seed, step, logger)
        if ckpt_now:
            logger.sync()
        window_pause += time.perf_counter() - t_pause  # sampling and checkpoints are not training throughput
    logger.close()
    budget = (f", time budget of {cfg.train.time_budget_s:g} s spent ({clock.elapsed:.0f} s)"
              if clock.expired and state.step < total else "")
    say(f"done: step {state.step}, {state.skipped_steps} skipped steps{budget}")
