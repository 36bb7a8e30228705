"""Benchmarks that write JSON (and a PNG) under an output directory.

Speed goals are ratios measured in one run on one machine (machines are
shared and noisy): every figure of a benchmark comes from the same process.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from biflow.config import FlowConfig, ReverseConfig
from biflow.errors import UserError
from biflow.timing import machine_info, timeit, write_results  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------
# Shared helpers (used by every `biflow bench ...`)
# ---------------------------------------------------------------------------


def bar_chart(path: str | Path, labels: list[str], values: list[float], ylabel: str, title: str,
              log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    bars = ax.bar(labels, values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Sampling: BiFlow 1-NFE vs the exact inverse on the same forward flow
# ---------------------------------------------------------------------------


@dataclass
class SamplingPreset:
    flow: FlowConfig
    reverse: ReverseConfig
    batch_sizes: tuple[int, ...]
    dtype: str


PRESETS: dict[str, Callable[[], SamplingPreset]] = {
    # 64x64x3, patch 4 -> 256 tokens, 8 blocks: the CPU comparison of the issue
    "cpu-256tok": lambda: SamplingPreset(
        FlowConfig(image_size=64, channels=3, patch_size=4, width=256, depth=2, num_blocks=8, num_heads=4,
                   num_classes=10, noise_std=0.05),
        ReverseConfig(width=256, depth=16, num_heads=4, denoise_depth=1),
        (1, 16), "fp32"),
    # the paper's shape: ImageNet-256 VAE latents 32x32x4, patch 2, B/2 models
    "b2-latent": lambda: SamplingPreset(
        FlowConfig.from_size("B/2", image_size=32, channels=4, num_classes=1000, noise_std=0.05),
        ReverseConfig.from_size("B/2"),
        (1, 16, 256), "bf16"),
    # a seconds-long smoke run for tests
    "tiny": lambda: SamplingPreset(
        FlowConfig(image_size=16, channels=1, patch_size=4, width=32, depth=1, num_blocks=2, num_heads=2,
                   num_classes=10, noise_std=0.05),
        ReverseConfig(width=32, depth=2, num_heads=2, denoise_depth=1),
        (1, 4), "fp32"),
}


def bench_sampling(out_dir: str | Path = "runs/bench", preset: str = "cpu-256tok", guidance: float = 1.0,
                   batch_sizes: tuple[int, ...] | None = None, reps: int = 3, naive_blocks: int = 1,
                   log: Callable[[str], None] = print) -> dict:
    """Time BiFlow 1-NFE against the exact inverse (KV-cached, +Tweedie, with and
    without guidance) and the cached decode against naive prefix recompute.

    The naive decode costs O(N^2) token passes per block, so it is timed on
    ``naive_blocks`` of the flow's (identical-cost) blocks and scaled to all of
    them, and compared with the cached decode timed on the same blocks.
    """
    from biflow.models import ReverseModel, TARFlow
    from biflow.sampling import sample_biflow, sample_exact

    if preset not in PRESETS:
        raise UserError(f"unknown sampling preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (p.dtype == "bf16" and device == "cuda") else torch.float32
    torch.manual_seed(0)
    flow = TARFlow(p.flow).to(device, dtype).eval()
    rev = ReverseModel(p.reverse, p.flow).to(device, dtype).eval()
    with torch.no_grad():  # non-trivial weights: the zero-init heads would make decoding look cheap
        for prm in list(flow.parameters()) + list(rev.parameters()):
            prm.add_(torch.randn_like(prm) * 0.02)
    fcfg = p.flow
    rows = []
    for b in batch_sizes or p.batch_sizes:
        g = torch.Generator(device).manual_seed(b)
        y = torch.randint(0, fcfg.num_classes, (b,), device=device, generator=g)
        z = torch.randn(b, fcfg.channels, fcfg.image_size, fcfg.image_size, device=device, dtype=dtype, generator=g)
        slow_reps = max(1, reps // 2) if b > 1 or device == "cuda" else reps
        t = {
            "biflow_1nfe": timeit(lambda: sample_biflow(rev, y, guidance=guidance, z=z), reps),
            "exact_kv": timeit(lambda: sample_exact(flow, y, z=z, tweedie=False), slow_reps),
            "exact_kv_tweedie": timeit(lambda: sample_exact(flow, y, z=z, tweedie=True), slow_reps),
            "exact_kv_cfg_tweedie": timeit(lambda: sample_exact(flow, y, z=z, guidance=guidance, tweedie=True),
                                           slow_reps),
        }
        tokens = flow.to_tokens(z)
        k = min(naive_blocks, len(flow.blocks))
        blocks = list(flow.blocks)[:k]
        scale = len(flow.blocks) / k

        def decode(use_cache: bool):
            with torch.no_grad():
                for blk in blocks:
                    blk.inverse(tokens, y, use_cache=use_cache)

        t["decode_cached_scaled"] = timeit(lambda: decode(True), slow_reps) * scale
        t["decode_naive_scaled"] = timeit(lambda: decode(False), 1, warmup=0) * scale
        ms = {key: 1000 * v / b for key, v in t.items()}
        row = {
            "batch": b,
            "ms_per_image": ms,
            "speedup_biflow_vs_exact_kv": t["exact_kv"] / t["biflow_1nfe"],
            "speedup_biflow_vs_exact_tweedie": t["exact_kv_tweedie"] / t["biflow_1nfe"],
            "speedup_biflow_vs_exact_cfg_tweedie": t["exact_kv_cfg_tweedie"] / t["biflow_1nfe"],
            "speedup_kv_cache_vs_naive": t["decode_naive_scaled"] / t["decode_cached_scaled"],
        }
        rows.append(row)
        log(f"batch {b:4d}: biflow {ms['biflow_1nfe']:.2f} ms/img | exact+cfg+tweedie "
            f"{ms['exact_kv_cfg_tweedie']:.1f} ms/img ({row['speedup_biflow_vs_exact_cfg_tweedie']:.1f}x) | "
            f"kv cache vs naive {row['speedup_kv_cache_vs_naive']:.1f}x")
    results = {
        "preset": preset,
        "dtype": str(dtype).replace("torch.", ""),
        "guidance": guidance,
        "flow": {"tokens": fcfg.num_tokens, "blocks": fcfg.num_blocks, "width": fcfg.width, "depth": fcfg.depth,
                 "image": [fcfg.channels, fcfg.image_size, fcfg.image_size],
                 "params": sum(q.numel() for q in flow.parameters())},
        "reverse": {"width": p.reverse.width, "depth": p.reverse.depth,
                    "params": sum(q.numel() for q in rev.parameters())},
        "naive_blocks_timed": naive_blocks,
        "rows": rows,
    }
    path = write_results(out_dir, f"sampling-{preset}", results)
    labels, values = [], []
    for r in rows:
        for key in ("biflow_1nfe", "exact_kv", "exact_kv_tweedie", "exact_kv_cfg_tweedie"):
            labels.append(f"{key}\nB={r['batch']}")
            values.append(r["ms_per_image"][key])
    bar_chart(path.with_suffix(".png"), labels, values, "ms / image (log)",
              f"Sampling on {machine_info()['device_name'][:40]} ({preset})", log=True)
    log(f"wrote {path} and {path.with_suffix('.png')}")
    return results


# ---------------------------------------------------------------------------
# Training: DeepSpeed ZeRO-2 under Ray Train vs a plain PyTorch loop,
# ZeRO-3 vs ZeRO-0 per-rank model-state memory, and (on a GPU) bf16 MFU
# ---------------------------------------------------------------------------

# bf16 dense tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name()
GPU_BF16_PEAK: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.4e12),
    (("H100", "PCIE"), 756.0e12),
    (("H100",), 989.4e12),  # SXM / HBM3
    (("A100",), 312.0e12),
    (("L40S",), 362.05e12),
    (("L4",), 121.0e12),
]


def gpu_bf16_peak(device_name: str) -> float | None:
    name = device_name.upper()
    for keys, peak in GPU_BF16_PEAK:
        if all(k in name for k in keys):
            return peak
    return None


def flow_train_flops(cfg: FlowConfig, batch: int) -> dict:
    """Model FLOPs of one forward-flow training step (forward + backward), PaLM-style.

    Every one of the ``B * N`` tokens of a batch (N = ``cfg.num_tokens``) passes
    through every flow block, so with P the dense parameters of all blocks
    (everything except the position-embedding and label-embedding tables, which
    are lookups) and L = ``num_blocks * depth`` attention layers of width W::

        flops = B * N * (6 * P + 12 * L * W * N)

    ``6 * P`` per token is 2 FLOPs per multiply-add times 3 (forward, and the
    backward's input and weight gradients). ``12 * L * W * N`` per token is the
    attention scores ``Q K^T`` and ``A V`` (2 * 2 * W * N per token and layer),
    times 3 for training. Causal attention is counted in full, as in PaLM's MFU;
    elementwise work (softmax, GELU, norms, the affine coupling) is not counted.
    """
    from biflow.models import TARFlow

    flow = TARFlow(cfg)
    dense = sum(p.numel() for n, p in flow.named_parameters()
                if not n.endswith("pos_embed") and ".label_embed." not in n)
    n_tok, layers = cfg.num_tokens, cfg.num_blocks * cfg.depth
    per_token = 6 * dense + 12 * layers * cfg.width * n_tok
    return {"dense_params": dense, "tokens_per_step": batch * n_tok, "attention_layers": layers,
            "flops_per_token": per_token, "flops_per_step": batch * n_tok * per_token,
            "formula": "B*N*(6*P_dense + 12*L*W*N)"}


def measure_mfu(cfg: FlowConfig, batch: int, steps: int = 20, warmup: int = 5, precision: str = "bf16",
                peak_flops: float | None = None, compile_model: bool = False, device: str | None = None) -> dict:
    """Forward-flow training speed in one process (the DDP engine at world size 1:
    AdamW, clipping, ``precision`` autocast) and its model-FLOP utilisation.

    Runs on any device; MFU needs ``peak_flops`` (looked up for known GPUs)."""
    from biflow.config import ExperimentConfig, OptimConfig, TrainConfig
    from biflow.losses import forward_loss
    from biflow.models import TARFlow
    from biflow.train.engine import build_engine

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    exp = ExperimentConfig(flow=cfg, optim=OptimConfig(warmup_steps=0),
                           train=TrainConfig(steps=steps + warmup, batch_size=batch, engine="ddp",
                                             precision=precision))
    torch.manual_seed(0)
    engine = build_engine(TARFlow(cfg), exp, dev)
    model = engine.model
    compiled = False
    if compile_model:
        try:
            model = torch.compile(engine.model)
            compiled = True
        except Exception:  # fall back to eager; recorded in the result
            model = engine.model
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev, generator=gen) * 2 - 1
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=dev, generator=gen) if cfg.num_classes else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        with engine.autocast():
            loss, _ = forward_loss(model, x, y, cfg, generator=gen)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    flops = flow_train_flops(cfg, batch)
    achieved = flops["flops_per_step"] / seconds
    return {"device": str(dev), "precision": engine.precision, "compiled": compiled, "batch": batch,
            "steps_timed": steps, "step_s": seconds, "samples_per_s": batch / seconds, **flops,
            "achieved_flops_per_s": achieved, "peak_flops_per_s": peak_flops,
            "mfu": achieved / peak_flops if peak_flops else None}


@dataclass
class TrainBenchPreset:
    flow: dict  # forward flow of the throughput runs (FlowConfig fields)
    batch_size: int  # per worker; the plain loop uses batch_size * workers
    window: int  # optimizer steps per timing window (the loop's log_every)
    windows: int  # timed windows, after one warm-up window
    images: int  # rows of the in-memory dataset
    memory_flow: dict  # a model whose states dominate memory (a few M params)
    memory_batch: int
    mfu_flow: dict  # GPU only
    mfu_batch: int


QUICKSTART_FLOW = dict(image_size=28, channels=1, patch_size=4, width=96, depth=2, num_blocks=4, num_heads=4,
                       num_classes=10, label_drop=0.1, noise_std=0.1)  # jobs/quickstart-forward.yaml

TRAIN_PRESETS: dict[str, Callable[[], TrainBenchPreset]] = {
    "quickstart": lambda: TrainBenchPreset(
        flow=dict(QUICKSTART_FLOW), batch_size=32, window=10, windows=4, images=4096,
        memory_flow=dict(QUICKSTART_FLOW, width=256, num_heads=4), memory_batch=4,
        mfu_flow=dict(size="B/2", image_size=32, channels=4, num_classes=1000), mfu_batch=64),
    "tiny": lambda: TrainBenchPreset(
        flow=dict(QUICKSTART_FLOW, width=32, depth=1, num_blocks=2, num_heads=2), batch_size=8, window=2,
        windows=2, images=256,
        memory_flow=dict(QUICKSTART_FLOW, width=64, depth=1, num_blocks=2, num_heads=2), memory_batch=2,
        mfu_flow=dict(QUICKSTART_FLOW, width=32, depth=1, num_blocks=2, num_heads=2), mfu_batch=8),
}


def _bench_experiment(flow: dict, batch: int, steps: int, log_every: int, engine: str, zero_stage: int,
                      workers: int, storage: str = "runs") -> dict:
    """A forward-stage experiment dict (``load_config`` input) for the bench runs."""
    return {
        "name": "bench-train", "stage": "forward", "flow": dict(flow),
        "data": {"shuffle_buffer": 0, "prefetch_batches": 2},
        "optim": {"lr": 0.002, "warmup_steps": min(50, max(1, steps // 5)), "ema_decay": 0.995, "grad_clip": 1.0},
        "train": {"steps": steps, "batch_size": batch, "engine": engine, "zero_stage": zero_stage,
                  "log_every": log_every, "checkpoint_every": steps, "keep_checkpoints": 1, "sample_every": 0},
        "ray": {"workers": workers, "cpus_per_worker": 1, "max_failures": 0, "storage": storage},
    }


def _bench_images(n: int, channels: int, size: int, seed: int = 0):
    """Fashion-MNIST when it is installed and fits the flow, else random uint8 images."""
    import gzip

    import numpy as np

    src = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    if channels == 1 and size == 28 and src.exists():
        with gzip.open(src) as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n].copy()
        with gzip.open(src.with_name("train-labels-idx1-ubyte.gz")) as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
        if len(x) == n:
            return x, y, "fashion-mnist"
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8), rng.integers(0, 10, n),
            "random")


def _plain_loop(flow_cfg: FlowConfig, optim_cfg, global_batch: int, x_all, y_all, window: int, windows: int,
                threads: int, seed: int = 0) -> dict:
    """The single-process baseline: the same per-step work as ``train_loop`` (forward_loss,
    backward, clipping, AdamW, LR schedule, EMA) on ``global_batch`` images, without
    Ray, DeepSpeed or collectives. Returns samples/s of each timed window."""
    from biflow.losses import forward_loss
    from biflow.models import TARFlow
    from biflow.ema import EMA
    from biflow.train.engine import build_optimizer, warmup_cosine

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = TARFlow(flow_cfg)
        opt = build_optimizer(model, optim_cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(optim_cfg, window * (windows + 1)))
        ema = EMA(model, optim_cfg.ema_decay)
        gen = torch.Generator().manual_seed(seed)
        x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
        rates = []
        for _ in range(windows + 1):
            t0 = time.perf_counter()
            for _ in range(window):
                idx = torch.randint(0, len(x_all), (global_batch,), generator=gen)
                x = x_all[idx].float().div_(127.5).sub_(1.0)
                loss, _ = forward_loss(model, x, y_all[idx], flow_cfg, generator=gen)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                ema.update()
            rates.append(window * global_batch / (time.perf_counter() - t0))
        return {"warmup_samples_per_s": rates[0], "window_samples_per_s": rates[1:]}
    finally:
        torch.set_num_threads(old_threads)


def _plain_loop_main() -> None:
    """``python -c`` entry of :func:`_plain_loop_subprocess`: JSON args on stdin, JSON result on stdout."""
    import sys

    from biflow.config import OptimConfig, from_dict

    a = json.loads(sys.stdin.read())
    flow = from_dict(FlowConfig, a["flow"], "flow")
    optim = from_dict(OptimConfig, a["optim"], "optim")
    x, y, _ = _bench_images(a["images"], flow.channels, flow.image_size)
    res = _plain_loop(flow, optim, a["global_batch"], x, y, a["window"], a["windows"], a["threads"], a["seed"])
    res["torch_threads"] = torch.get_num_threads()
    print("BENCH_JSON " + json.dumps(res), flush=True)


def _plain_loop_subprocess(flow: FlowConfig, optim, global_batch: int, images: int, window: int, windows: int,
                           threads: int, seed: int = 0) -> dict:
    """Run :func:`_plain_loop` in a fresh process with ``threads`` torch threads.

    A fresh process lets OpenMP read ``OMP_WAIT_POLICY=PASSIVE`` at start: on a
    shared, oversubscribed machine the default spin-waiting at every parallel
    region made a 2-thread loop 20-40x slower than a 1-thread one (measured),
    which would flatter any comparison against it."""
    import dataclasses
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = {"flow": dataclasses.asdict(flow), "optim": dataclasses.asdict(optim), "global_batch": global_batch,
            "images": images, "window": window, "windows": windows, "threads": threads, "seed": seed}
    proc = subprocess.run([sys.executable, "-c", "from biflow.bench import _plain_loop_main; _plain_loop_main()"],
                          input=json.dumps(args), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"plain training loop failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    res = json.loads(lines[-1][len("BENCH_JSON "):])
    res.update(threads=threads, omp_wait_policy=env["OMP_WAIT_POLICY"])
    return res


def _tb_scalar(logdir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def _ray_train_run(exp: dict, storage: str, name: str, dataset, window: int) -> dict:
    """One real ``fit`` (train_loop under Ray Train); samples/s per logging window from
    rank 0's TensorBoard scalars, the first (warm-up) window dropped."""
    from biflow.config import load_config
    from biflow.train.launch import fit

    t0 = time.perf_counter()
    result = fit(load_config(exp), name=name, storage=storage, datasets={"train": dataset})
    wall = time.perf_counter() - t0
    tb = Path(storage) / name / "tensorboard"
    rates = _tb_scalar(tb, "perf/samples_per_s")
    waits = _tb_scalar(tb, "perf/data_wait_frac")
    steady = [rates[s] for s in sorted(rates) if s > window]
    if not steady:  # no TensorBoard: the last window the loop reported
        steady = [float(result.metrics["samples_per_s"])]
    return {"window_samples_per_s": steady, "warmup_samples_per_s": rates.get(window),
            "data_wait_frac": [waits[s] for s in sorted(waits) if s > window],
            "steps": int(result.metrics["step"]), "wall_s": wall}


def _tensor_bytes_walk(root: object, max_depth: int = 5) -> list[torch.Tensor]:
    """Tensors reachable from a DeepSpeed object through attributes, lists and dicts."""
    found, seen = [], set()

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > max_depth:
            return
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found.append(obj)
            if obj.grad is not None:
                found.append(obj.grad)
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(k, depth + 1)
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                visit(v, depth + 1)

    visit(root, 0)
    return found


def model_state_bytes(engine) -> dict:
    """Bytes of model state this rank holds, from the engine's own tensors.

    Counted once per storage (views into DeepSpeed's flat buffers count their
    buffer once), in this order: ``params`` (ZeRO-3: the rank's ``ds_tensor``
    partitions; else the full parameters), ``master_params`` (fp32 partitions of
    ZeRO 1-3 that are separate from the parameters), ``grads`` (``.grad`` of the
    parameters and master partitions, ZeRO-3's gradient partition buffer, ZeRO-1/2
    averaged gradients), ``optimizer_states`` (AdamW moments of the torch
    optimizer). ``model_states`` is their sum. ``other_buffers``: everything else
    the ZeRO optimizer object holds (communication buckets sized by
    ``reduce_bucket_size``, allocated with ``torch.empty``), reported apart.
    Call after ``backward`` and before ``step`` so that gradients exist.
    """
    out = dict.fromkeys(("params", "master_params", "grads", "optimizer_states", "other_buffers"), 0)
    seen: set[int] = set()

    def add(cat: str, t) -> None:
        if not torch.is_tensor(t):
            return
        s = t.untyped_storage()
        if s.nbytes() == 0 or s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        out[cat] += s.nbytes()

    params = list(engine.module.parameters())
    zero3 = any(hasattr(p, "ds_tensor") for p in params)
    for p in params:
        add("params", p.ds_tensor if zero3 else p.data)
    ds = getattr(engine, "ds", None)
    opt = ds.optimizer if ds is not None else engine.optimizer
    inner = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
    masters = [t for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
               for t in (getattr(opt, name, None) or [])]
    for t in masters:
        add("master_params", t)
    for p in params:
        add("grads", p.grad)
    for t in masters:
        add("grads", t.grad)
    add("grads", getattr(opt, "grad_partitions_flat_buffer", None))
    averaged = getattr(opt, "averaged_gradients", None) or {}
    for group in (averaged.values() if isinstance(averaged, dict) else averaged):
        for t in group or []:
            add("grads", t)
    for state in inner.state.values():
        for v in state.values():
            add("optimizer_states", v)
    if not isinstance(opt, torch.optim.Optimizer):
        for t in _tensor_bytes_walk(opt):
            add("other_buffers", t)
    out["model_states"] = out["params"] + out["master_params"] + out["grads"] + out["optimizer_states"]
    return out


def _live_tensor_bytes() -> int:
    """All tensor storages alive in this process (a cross-check; includes data and buffers)."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj):
                s = obj.untyped_storage()
                if s.nbytes() and s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:
            continue
    return total


def _memory_worker(config: dict) -> None:
    """Ray Train worker: build each DeepSpeed engine on the same model, take two
    steps (AdamW states exist after the first), measure after the second backward."""
    import gc
    import tempfile

    import ray.train
    import torch.distributed as dist

    from biflow.config import load_config
    from biflow.losses import forward_loss
    from biflow.models import TARFlow
    from biflow.train.engine import build_engine, rank

    rows = {"torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    for stage, exp in config["experiments"].items():
        cfg = load_config(exp)
        torch.manual_seed(0)
        module = TARFlow(cfg.flow)
        nparams = sum(p.numel() for p in module.parameters())
        engine = build_engine(module, cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank())
        b, f = cfg.train.batch_size, cfg.flow
        x = torch.rand(b, f.channels, f.image_size, f.image_size, generator=gen) * 2 - 1
        y = torch.randint(0, f.num_classes, (b,), generator=gen)
        for i in range(2):
            loss, _ = forward_loss(engine.model, x, y, f, generator=gen)
            engine.backward(loss)
            if i == 1:
                stats = model_state_bytes(engine)
                stats["live_tensor_bytes"] = _live_tensor_bytes()
            engine.step()
        stats["params_total"] = nparams
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, stats)
        rows[f"zero{stage}"] = gathered
        del engine, module, loss
        gc.collect()
    # Ray Train V2 keeps metrics with a checkpoint: every rank reports a dir, rank 0 writes the file
    directory = tempfile.mkdtemp(prefix="biflow-bench-mem-report-")
    if rank() == 0:
        (Path(directory) / "memory.json").write_text(json.dumps(rows))
    ray.train.report({"ranks": len(gathered)}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _memory_run(flow: dict, batch: int, workers: int, stages: tuple[int, ...]) -> dict:
    import shutil
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from biflow.train.launch import worker_env

    tmp = tempfile.mkdtemp(prefix="biflow-bench-mem-")
    exps = {str(s): _bench_experiment(flow, batch, 2, 1, "deepspeed", s, workers, tmp) for s in stages}
    trainer = TorchTrainer(
        _memory_worker, train_loop_config={"experiments": exps},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="bench-train-memory", storage_path=tmp,
                             worker_runtime_env={"env_vars": {**worker_env(), "DS_ACCELERATOR": "cpu"}}),
        torch_config=TorchConfig(backend="gloo"),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            return json.loads((Path(directory) / "memory.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def bench_train(out_dir: str | Path = "runs/bench", preset: str = "quickstart", workers: int = 2,
                window: int | None = None, windows: int | None = None, memory: bool = True, mfu: bool = True,
                peak_tflops: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Training throughput and memory; writes ``train.json`` and ``train.png`` under ``out_dir``.

    Throughput, same model, same per-worker batch, same precision (fp32 on CPU):
      (a) DeepSpeed ZeRO-2, ``workers`` Ray Train workers x 1 CPU (the real
          ``train_loop`` via ``fit`` on an in-memory Ray dataset),
      (b) the plain single-process PyTorch loop on the global batch with
          ``workers`` threads (same cores in total; 1 thread for reference), timed
          before, between and after the Ray runs; each Ray run is compared with
          the plain sessions right before and after it (the machine is shared),
      (c) the DDP engine under Ray Train, for reference.
    Each figure is the median over timing windows of ``window`` steps, after one
    warm-up window. Goal: (a)/(b) >= 0.90.

    Memory: per-rank model-state bytes of ZeRO-3 vs ZeRO-0 with ``workers``
    ranks (see :func:`model_state_bytes`). Goal: <= 0.55.

    MFU: bf16 forward-flow training on a CUDA device (goal >= 45%); ``null`` with
    the reason elsewhere.
    """
    import shutil
    import tempfile

    import ray

    from biflow.config import load_config

    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown train preset {preset!r}; choose from {', '.join(TRAIN_PRESETS)}")
    if workers < 2:
        raise UserError("--workers must be >= 2 (ZeRO partitions over data-parallel ranks)")
    p = TRAIN_PRESETS[preset]()
    window, windows = window or p.window, windows or p.windows
    if window < 1 or windows < 1:
        raise UserError("--window and --windows must be >= 1")
    steps = window * (windows + 1)
    loads: dict[str, list[float]] = {"start": list(os.getloadavg())}
    started_ray = not ray.is_initialized()
    exp_z2 = _bench_experiment(p.flow, p.batch_size, steps, window, "deepspeed", 2, workers)
    cfg = load_config(exp_z2)
    x, y, data_source = _bench_images(max(p.images, 2 * steps * p.batch_size * workers // 2 + 64),
                                      cfg.flow.channels, cfg.flow.image_size)
    log(f"bench train ({preset}): flow {cfg.flow.width}w x {cfg.flow.num_blocks}x{cfg.flow.depth}, "
        f"batch {p.batch_size}/worker x {workers}, {windows} windows of {window} steps after 1 warm-up window")

    def plain_sessions(seed: int) -> None:
        # (b) with `workers` threads (same cores as the Ray workers), and 1 thread for reference
        for threads in dict.fromkeys((workers, 1)):
            r = _plain_loop_subprocess(cfg.flow, cfg.optim, p.batch_size * workers, len(x), window, windows,
                                       threads, seed)
            plain.setdefault(threads, []).append(r)
            log(f"plain loop, {threads} thread(s): {_median(r['window_samples_per_s']):.1f} samples/s")
        loads[f"after_plain_{seed}"] = list(os.getloadavg())

    plain: dict[int, list[dict]] = {}
    plain_sessions(0)

    storage = tempfile.mkdtemp(prefix="biflow-bench-train-")
    try:
        from biflow.train.launch import init_ray

        init_ray(None, cfg)
        dataset = ray.data.from_items([{"x": x[i], "y": int(y[i])} for i in range(len(x))]).materialize()
        runs = {}
        # plain, ZeRO-2, plain, DDP, plain: each Ray run is compared with the plain sessions
        # right before and after it (the machine is shared and its load drifts by minutes)
        for i, (key, engine, zero) in enumerate((("deepspeed_zero2", "deepspeed", 2), ("ddp", "ddp", 0))):
            exp = _bench_experiment(p.flow, p.batch_size, steps, window, engine, zero, workers, storage)
            runs[key] = _ray_train_run(exp, storage, f"bench-{key}", dataset, window)
            runs[key]["bracketing_plain_sessions"] = [i, i + 1]
            log(f"{key} under Ray Train: {_median(runs[key]['window_samples_per_s']):.1f} samples/s")
            loads[f"after_{key}"] = list(os.getloadavg())
            plain_sessions(i + 1)
        del dataset

        mem = None
        if memory:
            mem = _memory_run(p.memory_flow, p.memory_batch, workers, (0, 3))
            loads["after_memory"] = list(os.getloadavg())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()

    def pooled(threads: int) -> float:
        return _median([r for sess in plain[threads] for r in sess["window_samples_per_s"]])

    def bracket(key: str, threads: int) -> float:
        """Mean of the medians of the plain sessions right before and after run ``key``."""
        return statistics.fmean(_median(plain[threads][i]["window_samples_per_s"])
                                for i in runs[key]["bracketing_plain_sessions"])

    sps = {"plain_pytorch": pooled(workers),
           "deepspeed_zero2_ray": _median(runs["deepspeed_zero2"]["window_samples_per_s"]),
           "ddp_ray": _median(runs["ddp"]["window_samples_per_s"])}
    if workers != 1:
        sps["plain_pytorch_1thread"] = pooled(1)
    brackets = {key: {f"{t}_threads": bracket(key, t) for t in plain} for key in runs}
    throughput = {
        "samples_per_s": sps,
        "plain_samples_per_s_bracketing": brackets,
        "ratio_zero2_vs_plain": sps["deepspeed_zero2_ray"] / brackets["deepspeed_zero2"][f"{workers}_threads"],
        "ratio_ddp_vs_plain": sps["ddp_ray"] / brackets["ddp"][f"{workers}_threads"],
        "ratio_zero2_vs_best_plain": sps["deepspeed_zero2_ray"] / max(brackets["deepspeed_zero2"].values()),
        "ratio_zero2_vs_plain_pooled": sps["deepspeed_zero2_ray"] / sps["plain_pytorch"],
        "goal_ratio_zero2_vs_plain": 0.90,
        "ratio_method": "each Ray run / mean of the medians of the plain sessions right before and after it "
                        f"({workers} threads; 'best' takes the faster thread count); samples_per_s.plain_* pool "
                        "all plain sessions",
        "plain_sessions": {f"{k}_threads": v for k, v in plain.items()},
        "ray_runs": runs,
        "statistic": f"median samples/s over {windows} windows of {window} optimizer steps, after 1 warm-up "
                     f"window",
    }
    throughput["meets_goal"] = throughput["ratio_zero2_vs_plain"] >= 0.90
    flops = flow_train_flops(cfg.flow, p.batch_size * workers)
    throughput["model_flops_per_step"] = flops["flops_per_step"]
    throughput["achieved_flops_per_s"] = {k: v / (p.batch_size * workers) * flops["flops_per_step"]
                                          for k, v in sps.items()}

    results: dict = {
        "preset": preset,
        "load_average": loads,
        "setup": {
            "workers": workers,
            "threads": {"ray_worker": "1 CPU per Ray Train worker; Ray sets OMP_NUM_THREADS=1, so torch uses 1 "
                                      "thread per worker (probed below in the memory run's workers)",
                        "plain_loop": f"1 fresh process, torch.set_num_threads({workers}) (and 1 for reference), "
                                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}",
                        "total": workers},
            "precision": cfg.train.precision if cfg.train.precision != "auto" else
            ("bf16" if torch.cuda.is_available() else "fp32"),
            "flow": {k: getattr(cfg.flow, k) for k in ("image_size", "channels", "patch_size", "width", "depth",
                                                        "num_blocks", "num_heads", "num_classes")},
            "params": flops["dense_params"] + _embedding_params(cfg.flow),
            "batch_per_worker": p.batch_size,
            "global_batch": p.batch_size * workers,
            "data": f"in-memory Ray dataset of {len(x)} {data_source} images (shuffle buffer 0); the plain loop "
                    f"indexes the same images in memory",
            "plain_loop_work": "forward_loss, backward, clip_grad_norm, AdamW, LR schedule, EMA (as train_loop)",
            "optimizer": "AdamW (torch), grad_clip 1.0, warmup + cosine",
        },
        "throughput": throughput,
    }
    if mem is not None:
        z0, z3 = mem["zero0"], mem["zero3"]
        per_rank = {"zero0": [r["model_states"] for r in z0], "zero3": [r["model_states"] for r in z3]}
        ratio = max(per_rank["zero3"]) / max(per_rank["zero0"])
        mcfg = load_config(_bench_experiment(p.memory_flow, p.memory_batch, 2, 1, "deepspeed", 3, workers))
        results["memory"] = {
            "flow": {k: getattr(mcfg.flow, k) for k in ("width", "depth", "num_blocks", "num_heads")},
            "params": z0[0]["params_total"],
            "ranks": workers,
            "precision": "fp32",
            "model_state_bytes_per_rank": per_rank,
            "breakdown_per_rank": {"zero0": z0, "zero3": z3},
            "ratio_zero3_vs_zero0": ratio,
            "goal_ratio": 0.55,
            "meets_goal": ratio <= 0.55,
            # derived, not measured: what the ratio would be if ZeRO-3 shared its fp32 parameter
            # partitions with the master copy (as DeepSpeed intends for fp32 params, see note)
            "ratio_zero3_vs_zero0_without_separate_fp32_master":
                max(r["model_states"] - r["master_params"] for r in z3) / max(per_rank["zero0"]),
            "note": "DeepSpeed 0.19 ZeRO-3 keeps a separate fp32 master copy of the rank's partition even when "
                    "the parameters are fp32: stage3.py compares tensor.device with the string device name "
                    "('cpu' / 'cuda:0'), which is never equal, so the 'share the fp32 partition' branch is not "
                    "taken. fp32 bytes per parameter per rank: ZeRO-0 4+4+8 = 16; ZeRO-3 (4+4+4+8)/N, i.e. "
                    "a ratio of 1.25/N (0.625 at N=2, below 0.55 from N=3). In bf16 DeepSpeed's stage-0 path "
                    "(BF16_Optimizer) already partitions master weights and moments, so fp32 is the "
                    "unpartitioned baseline.",
            "worker_threads": {"torch_threads": mem["torch_threads"], "OMP_NUM_THREADS": mem["omp_num_threads"]},
            "method": "sum of the rank's own tensor storages (params / ds_tensor partitions, fp32 master "
                      "partitions, gradients and gradient partitions, AdamW moments), measured after the second "
                      "backward; ratio = max over ranks ZeRO-3 / max over ranks ZeRO-0. other_buffers (DeepSpeed "
                      "communication buckets) and live_tensor_bytes (every tensor in the process) are reported "
                      "but not in the ratio",
        }
        results["setup"]["threads"]["ray_worker_probe"] = results["memory"]["worker_threads"]

    results["mfu"] = _mfu_section(p, peak_tflops) if mfu else {"mfu": None, "reason": "disabled (--no-mfu)"}
    loads["end"] = list(os.getloadavg())

    out = Path(out_dir)
    path = write_results(out, "train", results)
    _train_chart(path.with_suffix(".png"), results)
    t = throughput
    log(f"samples/s: plain {sps['plain_pytorch']:.1f} | ZeRO-2/Ray {sps['deepspeed_zero2_ray']:.1f} "
        f"(ratio {t['ratio_zero2_vs_plain']:.3f}, goal >= 0.90) | DDP/Ray {sps['ddp_ray']:.1f} "
        f"(ratio {t['ratio_ddp_vs_plain']:.3f})")
    if "memory" in results:
        m = results["memory"]
        log(f"model states per rank: ZeRO-0 {max(m['model_state_bytes_per_rank']['zero0']) / 2**20:.1f} MiB | "
            f"ZeRO-3 {max(m['model_state_bytes_per_rank']['zero3']) / 2**20:.1f} MiB "
            f"(ratio {m['ratio_zero3_vs_zero0']:.3f}, goal <= 0.55)")
    log(f"MFU: {results['mfu'].get('mfu')} ({results['mfu'].get('reason', 'bf16 on ' + str(results['mfu'].get('device')))})")
    log(f"load average (1/5/15 min): start {loads['start']} end {loads['end']}")
    log(f"wrote {path} and {path.with_suffix('.png')}")
    return results


def _embedding_params(cfg: FlowConfig) -> int:
    per_block = cfg.num_tokens * cfg.width + ((cfg.num_classes + 1) * cfg.width if cfg.num_classes > 0 else 0)
    return per_block * cfg.num_blocks


def _mfu_section(p: TrainBenchPreset, peak_tflops: float | None) -> dict:
    if not torch.cuda.is_available():
        return {"mfu": None, "reason": "no CUDA device: MFU is measured in bf16 on a GPU only (a CPU has no "
                                       "comparable bf16 peak); the FLOP formula is documented in "
                                       "flow_train_flops and unit-tested",
                "formula": flow_train_flops(FlowConfig(), 1)["formula"], "goal": 0.45}
    cfg = FlowConfig.from_size(p.mfu_flow["size"], **{k: v for k, v in p.mfu_flow.items() if k != "size"}) \
        if "size" in p.mfu_flow else FlowConfig(**p.mfu_flow)
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops * 1e12 if peak_tflops else gpu_bf16_peak(name)
    res = measure_mfu(cfg, p.mfu_batch, precision="bf16", peak_flops=peak, compile_model=True)
    res.update(device_name=name, goal=0.45)
    if peak is None:
        res["reason"] = f"unknown bf16 peak for {name!r}: pass --peak-tflops"
    else:
        res["meets_goal"] = res["mfu"] >= 0.45
    return res


def _train_chart(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_mem = "memory" in results
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4))
    axes = list(axes) if has_mem else [axes]
    t = results["throughput"]
    sps = t["samples_per_s"]
    labels = ["plain PyTorch\n(1 proc x %d thr)" % results["setup"]["workers"],
              "DeepSpeed ZeRO-2\nRay Train", "DDP\nRay Train"]
    values = [sps["plain_pytorch"], sps["deepspeed_zero2_ray"], sps["ddp_ray"]]
    colors = ["#999999", "#4C72B0", "#55A868"]
    if "plain_pytorch_1thread" in sps:
        labels.append("plain PyTorch\n(1 proc x 1 thr)")
        values.append(sps["plain_pytorch_1thread"])
        colors.append("#CCCCCC")
    bars = axes[0].bar(labels, values, color=colors)
    plt.setp(axes[0].get_xticklabels(), fontsize=7)
    axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[0].set_ylabel("samples / s")
    axes[0].set_title(f"Throughput (ZeRO-2/plain = {t['ratio_zero2_vs_plain']:.2f}, goal >= 0.90)", fontsize=9)
    if has_mem:
        m = results["memory"]
        z0, z3 = m["breakdown_per_rank"]["zero0"], m["breakdown_per_rank"]["zero3"]
        cats = ["params", "master_params", "grads", "optimizer_states"]
        x_labels = [f"ZeRO-0\nrank {i}" for i in range(len(z0))] + [f"ZeRO-3\nrank {i}" for i in range(len(z3))]
        bottom = [0.0] * len(x_labels)
        for cat in cats:
            vals = [r[cat] / 2**20 for r in z0 + z3]
            axes[1].bar(x_labels, vals, bottom=bottom, label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, b in enumerate(bottom):
            axes[1].text(i, b, f"{b:.1f}", ha="center", va="bottom", fontsize=8)
        axes[1].set_ylabel("model-state MiB per rank")
        axes[1].set_title(f"Memory (ZeRO-3/ZeRO-0 = {m['ratio_zero3_vs_zero0']:.2f}, goal <= 0.55)", fontsize=9)
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
