"""``biflow bench train``: DeepSpeed ZeRO-2 under Ray Train vs a plain PyTorch
loop, ZeRO-3 vs ZeRO-0 per-rank model-state memory, and (on a GPU) bf16 MFU.
Writes ``train.json`` and ``train.png``.

Speed goals are ratios measured in one run on one machine (machines are
shared and noisy): every figure of a benchmark comes from the same process.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from biflow.bench.baseline import bench_images, plain_loop_subprocess
from biflow.bench.flops import embedding_params, flow_train_flops, mfu_section
from biflow.bench.memory import memory_run
from biflow.errors import UserError
from biflow.timing import pyplot, write_results


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
    reverse: dict | None = None  # reverse model of the reverse-stage runs (ReverseConfig fields); None: skipped


def _job_reverse(job: str) -> dict:
    """The ``reverse`` section of ``jobs/<job>-reverse.yaml``, as shipped."""
    from biflow.config import read_yaml
    from biflow.recipe import JOBS_DIR

    return dict(read_yaml(JOBS_DIR / f"{job}-reverse.yaml")["reverse"])


QUICKSTART_FLOW = dict(image_size=28, channels=1, patch_size=4, width=96, depth=2, num_blocks=4, num_heads=4,
                       num_classes=10, label_drop=0.1, noise_std=0.1)  # jobs/quickstart-forward.yaml

TRAIN_PRESETS: dict[str, Callable[[], TrainBenchPreset]] = {
    "quickstart": lambda: TrainBenchPreset(
        flow=dict(QUICKSTART_FLOW), batch_size=32, window=10, windows=4, images=4096,
        memory_flow=dict(QUICKSTART_FLOW, width=256, num_heads=4), memory_batch=4,
        mfu_flow=dict(size="B/2", image_size=32, channels=4, num_classes=1000), mfu_batch=64,
        reverse=_job_reverse("quickstart")),
    "tiny": lambda: TrainBenchPreset(
        flow=dict(QUICKSTART_FLOW, width=32, depth=1, num_blocks=2, num_heads=2), batch_size=8, window=2,
        windows=2, images=256,
        memory_flow=dict(QUICKSTART_FLOW, width=64, depth=1, num_blocks=2, num_heads=2), memory_batch=2,
        mfu_flow=dict(QUICKSTART_FLOW, width=32, depth=1, num_blocks=2, num_heads=2), mfu_batch=8,
        reverse=dict(_job_reverse("quickstart"), width=32, depth=2, num_heads=2)),
}


def _bench_experiment(flow: dict, batch: int, steps: int, log_every: int, engine: str, zero_stage: int,
                      workers: int, storage: str = "runs", cpus_per_worker: float = 1, reverse: dict | None = None,
                      forward_checkpoint: str = "") -> dict:
    """An experiment dict (``load_config`` input) for the bench runs: the forward stage, or with
    ``reverse`` the reverse stage against the flow at ``forward_checkpoint``."""
    stage = {"stage": "forward"} if reverse is None else {"stage": "reverse", "reverse": dict(reverse)}
    return {
        "name": "bench-train", **stage, "flow": dict(flow),
        "data": {"shuffle_buffer": 0, "prefetch_batches": 2},
        "optim": {"lr": 0.002, "warmup_steps": min(50, max(1, steps // 5)), "ema_decay": 0.995, "grad_clip": 1.0},
        "train": {"steps": steps, "batch_size": batch, "engine": engine, "zero_stage": zero_stage,
                  "log_every": log_every, "checkpoint_every": steps, "keep_checkpoints": 1, "sample_every": 0,
                  "forward_checkpoint": forward_checkpoint},
        "ray": {"workers": workers, "cpus_per_worker": cpus_per_worker, "max_failures": 0, "storage": storage},
    }


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


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _reverse_runs(p: TrainBenchPreset, workers: int, window: int, windows: int, steps: int, storage: str, dataset,
                  x, y, plain_sessions: Callable, log: Callable[[str], None]) -> dict:
    """The reverse stage at the preset's shape: a forward flow (2 steps: its weights do not
    change the cost of a step) is trained and checkpointed, then the reverse stage runs in the
    quickstart's layout (``workers`` x 1 CPU, DDP), bracketed by plain single-process
    sessions of the same stage (the same loss, curriculum included, on the global batch)."""
    from biflow.bench.baseline import step_breakdown

    fwd = _bench_experiment(p.flow, p.batch_size, 2, 1, "ddp", 0, workers, storage)
    _ray_train_run(fwd, storage, "bench-forward-for-reverse", dataset, 1)
    exp = _bench_experiment(p.flow, p.batch_size, steps, window, "ddp", 0, workers, storage, reverse=p.reverse,
                            forward_checkpoint="bench-forward-for-reverse")
    plain: dict[int, list[dict]] = {}
    plain_sessions(0, exp, plain, "reverse")
    run = _ray_train_run(exp, storage, "bench-reverse-ddp", dataset, window)
    log(f"reverse stage, DDP under Ray Train: {_median(run['window_samples_per_s']):.1f} samples/s")
    plain_sessions(1, exp, plain, "reverse")
    bracket = {f"{t}_threads": statistics.fmean(_median(s["window_samples_per_s"]) for s in v) for t, v in plain.items()}
    ddp = _median(run["window_samples_per_s"])
    return {
        "reverse": {k: p.reverse[k] for k in ("width", "depth", "num_heads", "z_skip", "guidance_max",
                                               "guidance_start", "perceptual_weight") if k in p.reverse},
        "samples_per_s": {"plain_pytorch": bracket[f"{workers}_threads"], "ddp_ray": ddp,
                          **({"plain_pytorch_1thread": bracket["1_threads"]} if "1_threads" in bracket else {})},
        "ratio_ddp_vs_plain": ddp / bracket[f"{workers}_threads"],
        "goal_ratio": 0.90,
        "meets_goal": ddp / bracket[f"{workers}_threads"] >= 0.90,
        "ratio_method": "the Ray run / mean of the medians of the plain sessions right before and after it",
        "plain_sessions": {f"{k}_threads": v for k, v in plain.items()},
        "ray_run": run,
        "step_breakdown": step_breakdown(exp, p.batch_size * workers, x, y, steps=max(4, window), threads=workers,
                                         storage=storage),
    }


def bench_train(out_dir: str | Path = "runs/bench", preset: str = "quickstart", workers: int = 2,
                window: int | None = None, windows: int | None = None, memory: bool = True, mfu: bool = True,
                peak_tflops: float | None = None, layouts: bool = True, log: Callable[[str], None] = print) -> dict:
    """Training throughput and memory; writes ``train.json`` and ``train.png`` under ``out_dir``.

    Throughput, same model, same per-worker batch, same precision (fp32 on CPU):
      (a) DeepSpeed ZeRO-2, ``workers`` Ray Train workers x 1 CPU (the real
          ``train_loop`` via ``fit`` on an in-memory Ray dataset),
      (b) the plain single-process PyTorch loop on the global batch with
          ``workers`` threads (same cores in total; 1 thread for reference), timed
          before, between and after the Ray runs; each Ray run is compared with
          the plain sessions right before and after it (the machine is shared),
      (c) the DDP engine under Ray Train, for reference,
      (d) with ``layouts``: one Ray Train worker with all ``workers`` cores, DDP and DeepSpeed
          ZeRO-2, on the same global batch (the quickstart's layout on a small machine is (c):
          :func:`biflow.recipe.auto_layout`),
      (e) where a plain step's time goes (:func:`~biflow.bench.baseline.step_breakdown`).
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
    x, y, data_source = bench_images(max(p.images, 2 * steps * p.batch_size * workers // 2 + 64),
                                      cfg.flow.channels, cfg.flow.image_size)
    log(f"bench train ({preset}): flow {cfg.flow.width}w x {cfg.flow.num_blocks}x{cfg.flow.depth}, "
        f"batch {p.batch_size}/worker x {workers}, {windows} windows of {window} steps after 1 warm-up window")

    def plain_sessions(seed: int, exp: dict = exp_z2, into: dict | None = None, stage: str = "") -> None:
        # (b) with `workers` threads (same cores as the Ray workers), and 1 thread for reference
        for threads in dict.fromkeys((workers, 1)):
            r = plain_loop_subprocess(exp, p.batch_size * workers, len(x), window, windows, threads, seed,
                                      storage)
            (plain if into is None else into).setdefault(threads, []).append(r)
            log(f"plain loop{f' ({stage})' if stage else ''}, {threads} thread(s): "
                f"{_median(r['window_samples_per_s']):.1f} samples/s")
        loads[f"after_plain{f'_{stage}' if stage else ''}_{seed}"] = list(os.getloadavg())

    storage = tempfile.mkdtemp(prefix="biflow-bench-train-")
    plain: dict[int, list[dict]] = {}
    plain_sessions(0)

    reverse = None
    try:
        from biflow.train.launch import init_ray

        init_ray(None, cfg)
        dataset = ray.data.from_items([{"x": x[i], "y": int(y[i])} for i in range(len(x))]).materialize()
        runs = {}
        # plain, ZeRO-2, plain, DDP, plain: each Ray run is compared with the plain sessions
        # right before and after it (the machine is shared and its load drifts by minutes)
        # (d): one worker with every core on the global batch (the quickstart's layout), both engines
        layout_runs = [(f"1x{workers}cpu_ddp", "ddp", 0, 1), (f"1x{workers}cpu_deepspeed_zero2", "deepspeed", 2, 1)]
        plan = [("deepspeed_zero2", "deepspeed", 2, workers), ("ddp", "ddp", 0, workers)]
        for i, (key, engine, zero, n) in enumerate(plan + (layout_runs if layouts else [])):
            if n == 1:
                exp = _bench_experiment(p.flow, p.batch_size * workers, steps, window, engine, zero, 1, storage,
                                        cpus_per_worker=workers)
            else:
                exp = _bench_experiment(p.flow, p.batch_size, steps, window, engine, zero, workers, storage)
            runs[key] = _ray_train_run(exp, storage, f"bench-{key}", dataset, window)
            runs[key]["bracketing_plain_sessions"] = [i, i + 1]
            log(f"{key} under Ray Train: {_median(runs[key]['window_samples_per_s']):.1f} samples/s")
            loads[f"after_{key}"] = list(os.getloadavg())
            plain_sessions(i + 1)
        if p.reverse is not None:
            reverse = _reverse_runs(p, workers, window, windows, steps, storage, dataset, x, y, plain_sessions, log)
            loads["after_reverse"] = list(os.getloadavg())
        del dataset

        mem = None
        if memory:
            mem = memory_run({str(s): _bench_experiment(p.memory_flow, p.memory_batch, 2, 1, "deepspeed", s, workers)
                              for s in (0, 3)}, workers)
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
    if layouts:
        throughput["layouts"] = {
            key: {"workers": 1, "cpus_per_worker": workers, "batch_per_worker": p.batch_size * workers,
                  "samples_per_s": _median(runs[key]["window_samples_per_s"]),
                  "ratio_vs_plain": _median(runs[key]["window_samples_per_s"]) / brackets[key][f"{workers}_threads"]}
            for key in runs if key.startswith("1x")}
    # the quickstart's layout on a small machine (biflow.recipe.auto_layout): the ranks at 1 CPU each, DDP
    throughput["quickstart_layout"] = "ddp"
    throughput["quickstart_layout_meets_goal"] = throughput["ratio_ddp_vs_plain"] >= 0.90
    from biflow.bench.baseline import step_breakdown

    throughput["step_breakdown"] = step_breakdown(exp_z2, p.batch_size * workers, x, y, steps=max(4, window),
                                                  threads=workers)
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
            "params": flops["dense_params"] + embedding_params(cfg.flow),
            "batch_per_worker": p.batch_size,
            "global_batch": p.batch_size * workers,
            "data": f"in-memory Ray dataset of {len(x)} {data_source} images (shuffle buffer 0); the plain loop "
                    f"indexes the same images in memory",
            "plain_loop_work": "forward_loss, backward, clip_grad_norm, AdamW, LR schedule, EMA (as train_loop)",
            "optimizer": "AdamW (torch), grad_clip 1.0, warmup + cosine",
        },
        "throughput": throughput,
    }
    if reverse is not None:
        results["reverse"] = reverse
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

    results["mfu"] = mfu_section(p.mfu_flow, p.mfu_batch, peak_tflops) if mfu else {"mfu": None, "reason": "disabled (--no-mfu)"}
    loads["end"] = list(os.getloadavg())

    out = Path(out_dir)
    path = write_results(out, "train", results)
    _train_chart(path.with_suffix(".png"), results)
    t = throughput
    log(f"samples/s: plain {sps['plain_pytorch']:.1f} | ZeRO-2/Ray {sps['deepspeed_zero2_ray']:.1f} "
        f"(ratio {t['ratio_zero2_vs_plain']:.3f}, goal >= 0.90) | DDP/Ray {sps['ddp_ray']:.1f} "
        f"(ratio {t['ratio_ddp_vs_plain']:.3f})")
    for key, v in t.get("layouts", {}).items():
        log(f"  {key} under Ray Train: {v['samples_per_s']:.1f} samples/s (ratio {v['ratio_vs_plain']:.3f})")
    if reverse is not None:
        log(f"reverse stage: plain {reverse['samples_per_s']['plain_pytorch']:.1f} | DDP/Ray (the quickstart's "
            f"layout) {reverse['samples_per_s']['ddp_ray']:.1f} samples/s (ratio {reverse['ratio_ddp_vs_plain']:.3f}, "
            f"goal >= 0.90)")
    b = t["step_breakdown"]
    log("plain step {:.1f} ms: ".format(b["ms_per_step"]) + ", ".join(f"{k} {v:.1f}" for k, v in b["ms_per_phase"].items()))
    if "memory" in results:
        m = results["memory"]
        log(f"model states per rank: ZeRO-0 {max(m['model_state_bytes_per_rank']['zero0']) / 2**20:.1f} MiB | "
            f"ZeRO-3 {max(m['model_state_bytes_per_rank']['zero3']) / 2**20:.1f} MiB "
            f"(ratio {m['ratio_zero3_vs_zero0']:.3f}, goal <= 0.55)")
    log(f"MFU: {results['mfu'].get('mfu')} ({results['mfu'].get('reason', 'bf16 on ' + str(results['mfu'].get('device')))})")
    log(f"load average (1/5/15 min): start {loads['start']} end {loads['end']}")
    log(f"wrote {path} and {path.with_suffix('.png')}")
    return results



def _train_chart(path: Path, results: dict) -> None:
    plt = pyplot()
    if plt is None:
        return

    has_mem = "memory" in results
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 7, 4.6))
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
    for key, v in t.get("layouts", {}).items():
        labels.append(key.replace("_", "\n", 1) + "\nRay Train")
        values.append(v["samples_per_s"])
        colors.append("#8172B2")
    if "reverse" in results:
        r = results["reverse"]["samples_per_s"]
        labels += ["reverse: plain\n(1 proc x %d thr)" % results["setup"]["workers"], "reverse: DDP\nRay Train"]
        values += [r["plain_pytorch"], r["ddp_ray"]]
        colors += ["#999999", "#C44E52"]
    bars = axes[0].bar(labels, values, color=colors)
    plt.setp(axes[0].get_xticklabels(), fontsize=7, rotation=35, ha="right")
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
