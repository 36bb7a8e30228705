"""Training engines: DeepSpeed ZeRO and plain PyTorch DDP behind one interface.

The loop only talks to :class:`Engine`:

    with engine.accumulate():               # no grad sync until the boundary
        loss = loss_fn(engine.model, ...)   # engine.model is callable like the module
    engine.backward(loss)
    applied = engine.step()                 # call every micro-step; True when an update happened

Both engines use the same optimizer (torch AdamW), the same warmup + cosine
schedule and the same clipping, so they can be compared step for step
(``biflow bench train``). The process group is the one Ray Train created; Ray
itself appears only in :func:`resolve_device` (the GPU Ray Train assigned).

The EMA of the weights lives in :mod:`biflow.ema` (ZeRO-3 aware: each rank
averages its own partition, so it costs 1/world of the model per rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from biflow.config import ExperimentConfig, OptimConfig
from biflow.ema import dist_on, rank, world_size  # noqa: F401 (rank, world_size: used by the loop too)

DS_TAG = "deepspeed"
DDP_STATE = "ddp_state.pt"


# ---------------------------------------------------------------------------
# Device, precision, schedule
# ---------------------------------------------------------------------------


def resolve_device() -> torch.device:
    """The worker's device: the GPU Ray assigned, else the CPU."""
    if torch.cuda.is_available():
        try:
            import ray.train.torch

            device = ray.train.torch.get_device()
        except Exception:  # outside Ray Train
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        enable_tf32()
        return device
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def warmup_cosine(optim: OptimConfig, total_steps: int, clock: Any = None) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``optim.warmup_steps``, then cosine down to
    ``min_lr_ratio``.

    With a time budget (``clock``: a :class:`biflow.train.loop.StageClock`, whose ``elapsed``
    is the same on every rank) the cosine follows whichever of steps and time is further
    along, and the time axis is the budget *left after warmup*: the clock records when the
    warmup ended (``clock.warmup_end``, kept in checkpoints), so slow first steps (data and
    kernels warming up) cannot eat the decay, and a budget-limited stage still ends at the
    floor."""
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))
    floor = optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if clock is not None and clock.budget > 0:
            if clock.warmup_end is None:
                clock.warmup_end = clock.elapsed
            left = clock.budget - clock.warmup_end
            progress = max(progress, (clock.elapsed - clock.warmup_end) / left if left > 0 else 1.0)
        progress = min(1.0, progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(module: nn.Module, optim: OptimConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D tensors). ``fused`` (None:
    on CUDA) is torch's one-kernel update, which also reads no step counter back to the host."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel for the whole update (not ~2,000 small ops per B/2 step); unfused,
    # foreach=False, for DeepSpeed on a CPU, whose ZeRO wrappers replace the param lists
    if fused is None:
        fused = bool(decay or no_decay) and (decay or no_decay)[0].is_cuda
    kind = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), **kind)


def enable_tf32() -> None:
    """TF32 tensor cores for the fp32 islands on CUDA (the frozen flow's trajectory, the
    affine math, a VAE decode outside autocast): ~10 mantissa bits, like bf16 autocast's
    matmuls but with fp32 range and accumulation. A no-op on CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_module(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` in place (``nn.Module.compile``: the engines and DeepSpeed keep
    the same module and parameters). Compiling happens at the first call;
    :func:`first_call` falls back to eager if it fails. ``aot_eager`` traces the same
    graphs (forward and backward) without generating kernels: the CPU dry runs' choice."""
    module.compile(backend=backend)
    return module


def first_call(module: nn.Module, fn: Callable[[], Any], say: Callable[[str], None] = print) -> str | None:
    """Run ``fn`` (the first training step) once. If ``module`` was compiled and the
    step raises, switch the module back to eager, say so, and run the step again.
    Returns the compile error (one line) or None."""
    if getattr(module, "_compiled_call_impl", None) is None:
        fn()
        return None
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        module._compiled_call_impl = None
        torch._dynamo.reset()
        say(f"torch.compile failed at the first step ({error}); running eager")
        fn()
        return error


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A world-size-1 process group (NCCL on CUDA, gloo on CPU) for engines outside Ray
    Train (benchmarks); reuses one that exists, and destroys only its own."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # what DeepSpeed reads from a launcher
    saved = {k: os.environ.get(k) for k in launcher}
    os.environ.update(launcher)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_config(cfg: ExperimentConfig, world_size: int, precision: str, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed JSON config, derived from the typed config only."""
    train = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # overlap the gradient reduce-scatter with backward on GPUs; gloo (CPU) gains nothing from it
    overlap = device_type == "cuda"
    if train.zero_stage in (1, 2):
        ds["zero_optimization"].update(overlap_comm=overlap, contiguous_gradients=True)
    if train.zero_stage == 3:
        # gather small parameters too, so ZeRO-3 really partitions small models
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, overlap_comm=overlap)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


# ---------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# ---------------------------------------------------------------------------


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (all ranks agree)."""
    return max_over_ranks(1.0 if flag else 0.0, device) > 0


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` of any rank, on every rank."""
    if not dist_on() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce for all of them)."""
    if not dist_on() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------


class Engine:
    """What the loop needs from an engine. Subclasses: DeepSpeed and DDP."""

    model: nn.Module  # call this for the forward pass (wrapped; attribute access falls through)
    module: nn.Module  # the bare module (for EMA, export)
    device: torch.device
    precision: str
    grad_accum: int

    def __init__(self) -> None:
        self.micro_step = 0
        self.overflow_steps = 0  # updates skipped because gradients were not finite
        self.last_grad_norm: float | torch.Tensor = float("nan")  # DDP: a 0-dim tensor (no host sync)
        self.compile_pending = False  # the module was compiled and has not run yet

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, the step's forward; the first one of a compiled module falls back to eager
        mode if compiling fails (:func:`first_call`)."""
        if not self.compile_pending:
            return fn()
        self.compile_pending = False
        out: list[Any] = []
        first_call(self.module, lambda: out.append(fn()))
        return out[-1]

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32

    def is_boundary(self) -> bool:
        """True when the next ``step()`` applies an optimizer update."""
        return (self.micro_step + 1) % self.grad_accum == 0

    def accumulate(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Collective: every rank calls it with the directory it will report."""
        raise NotImplementedError

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Collective: restore model, optimizer, schedule; return client_state."""
        raise NotImplementedError


class _AttrDict(dict):
    """A dict (visible to DeepSpeed's tensor walk) read like the dataclass it replaces."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Zero3Outputs(nn.Module):
    """ZeRO-3 re-gathers a module's own parameters for backward through hooks on
    its output tensors, and it cannot see tensors inside a dataclass output
    (``FlowOutput``, ``ReverseOutput``). The root model's direct parameters
    (position embeddings) would then still be partitioned when their gradients
    arrive. This wrapper owns them as external parameters and returns the
    dataclass fields as a dict, so DeepSpeed's hooks fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def register_root_params(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in self.model.parameters(recurse=False):
            register_external_parameter(self, p)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        if dataclasses.is_dataclass(out):
            return _AttrDict((f.name, getattr(out, f.name)) for f in dataclasses.fields(out))
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


@contextlib.contextmanager
def _no_update(*objects: Any) -> Iterator[None]:
    """Make ``obj.step()`` a no-op for the duration (skipping one update)."""
    saved = [(obj, obj.__dict__.get("step")) for obj in objects]  # torch may wrap step per instance
    for obj in objects:
        obj.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for obj, own in saved:
            if own is None:
                del obj.step
            else:
                obj.step = own


class DeepSpeedEngine(Engine):
    def __init__(self, module: nn.Module, cfg: ExperimentConfig, device: torch.device, precision: str,
                 clock: Any = None):
        super().__init__()
        import deepspeed

        if device.type == "cpu" and world_size() == 1:
            # one CPU rank has no peer to share memory with: skip the shared-memory comm op's JIT build (~80 s)
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.device, self.precision, self.grad_accum = device, precision, cfg.train.grad_accum
        self.ds_config = deepspeed_config(cfg, world_size(), precision, device.type)
        # from the engine's device: the module is still on the CPU here (DeepSpeed moves it below)
        optimizer = build_optimizer(module, cfg.optim, fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim, cfg.train.steps, clock))
        wrapped = _Zero3Outputs(module) if cfg.train.zero_stage == 3 else module
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=wrapped.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        if isinstance(wrapped, _Zero3Outputs):
            wrapped.register_root_params()
        self.model = self.ds
        self.module = module

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> bool:
        boundary = self.is_boundary()
        stage0_bad = False
        if boundary and self.ds_config["zero_optimization"]["stage"] == 0:
            # ZeRO 1-3 skip non-finite updates themselves. Stage 0 has plain (all-reduced, so
            # identical on every rank) .grad tensors: check them, and on a bad step let
            # DeepSpeed count the step with the optimizer and schedule updates switched off.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            stage0_bad = bool(grads) and not bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all())
            if stage0_bad:
                for g in grads:
                    g.zero_()
        with _no_update(self.ds.optimizer, self.scheduler) if stage0_bad else contextlib.nullcontext():
            self.ds.step()
        self.micro_step += 1
        if not boundary:
            return False
        if stage0_bad:
            self.overflow_steps += 1
            self.last_grad_norm = float("inf")
            return False
        norm = self.ds.get_global_grad_norm()
        self.last_grad_norm = float(norm) if norm is not None else float("nan")
        applied = bool(self.ds.was_step_applied())
        if not applied:
            self.overflow_steps += 1
        return applied

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state=client_state, save_latest=False)

    def load(self, directory: str | Path) -> dict[str, Any]:
        path, client_state = self.ds.load_checkpoint(str(directory), tag=DS_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}/{DS_TAG}")
        return client_state or {}


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP whose attributes fall through to the wrapped module (like DeepSpeed's)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DDPEngine(Engine):
    """Plain PyTorch data parallel with the same optimizer, schedule and clipping (one
    worker: no wrapper, no collective; the fastest layout on a small machine)."""

    def __init__(self, module: nn.Module, cfg: ExperimentConfig, device: torch.device, precision: str,
                 clock: Any = None):
        super().__init__()
        self.device, self.precision, self.grad_accum = device, precision, cfg.train.grad_accum
        self.module = module.to(device)
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = build_optimizer(self.module, cfg.optim, fused=True)  # torch's fused kernel, CPU too
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(cfg.optim, cfg.train.steps,
                                                                                         clock))
        if world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = _DDP(self.module, device_ids=ids)
        else:
            self.model = self.module

    def accumulate(self) -> contextlib.AbstractContextManager:
        if isinstance(self.model, _DDP) and not self.is_boundary():
            return self.model.no_sync()
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> bool:
        boundary = self.is_boundary()
        self.micro_step += 1
        if not boundary:
            return False
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.last_grad_norm = norm.detach()  # a tensor: read on log steps only
        # the step's one host sync: grads are all-reduced, so every rank agrees (a non-finite
        # loss on any rank makes them non-finite everywhere)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.overflow_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        if rank() == 0:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "client_state": client_state}
            torch.save(state, Path(directory) / DDP_STATE)

    def load(self, directory: str | Path) -> dict[str, Any]:
        state = torch.load(Path(directory) / DDP_STATE, map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]


def build_engine(module: nn.Module, cfg: ExperimentConfig, device: torch.device | None = None,
                 clock: Any = None) -> Engine:
    """DeepSpeed (``train.engine: deepspeed``) or plain DDP (``ddp``); ``clock`` (a time
    budget's :class:`~biflow.train.loop.StageClock`): see :func:`warmup_cosine`."""
    device = device or resolve_device()
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.compile:
        compile_module(module)  # in place, before any wrapper: the engines keep the same module
    if cfg.train.engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        engine: Engine = DeepSpeedEngine(module, cfg, device, precision, clock)
    else:
        engine = DDPEngine(module, cfg, device, precision, clock)
    engine.compile_pending = cfg.train.compile
    return engine

