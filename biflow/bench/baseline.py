"""The plain single-process PyTorch baseline of ``biflow bench train``: the same
per-step work as the training loop, run in a fresh process (``python -c``) so
that OpenMP reads its settings at start."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def bench_images(n: int, channels: int, size: int, seed: int = 0):
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


def _plain_setup(exp: dict, total_steps: int, seed: int, storage: str = "runs"):
    """(stage, model, optimizer, LR schedule, EMA, generator) of the plain loop, as train_loop
    builds them: the stage (:data:`biflow.train.loop.STAGES`) gives the model and its loss; a
    reverse stage loads its frozen flow from ``train.forward_checkpoint`` under ``storage``."""
    from biflow.config import load_config
    from biflow.ema import EMA
    from biflow.train.engine import build_optimizer, warmup_cosine
    from biflow.train.loop import STAGES, RunInfo

    cfg = load_config(exp)
    run = RunInfo(name="bench-plain", storage=storage, forward_checkpoint=cfg.train.forward_checkpoint)
    stage = STAGES[cfg.stage](cfg, run, torch.device("cpu"))
    torch.manual_seed(seed)
    model = stage.build()
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim, total_steps))
    return stage, model, opt, sched, EMA(model, cfg.optim.ema_decay), torch.Generator().manual_seed(seed)


def _plain_batch(stage, x_all, y_all, global_batch: int, gen):
    """One batch drawn from the in-memory images, in [-1, 1] (labels only for a conditional flow)."""
    idx = torch.randint(0, len(x_all), (global_batch,), generator=gen)
    x = x_all[idx].float().div_(127.5).sub_(1.0)
    y = y_all[idx] if stage.cfg.flow.num_classes > 0 else None
    return x, y


def plain_loop(exp: dict, global_batch: int, x_all, y_all, window: int, windows: int, threads: int,
               seed: int = 0, storage: str = "runs") -> dict:
    """The single-process baseline: the same per-step work as ``train_loop`` (the stage's
    loss, backward, clipping, AdamW, LR schedule, EMA) on ``global_batch`` images, without
    Ray, DeepSpeed or collectives. Returns samples/s of each timed window."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        total = window * (windows + 1)
        stage, model, opt, sched, ema, gen = _plain_setup(exp, total, seed, storage)
        x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
        rates, step = [], 0
        for _ in range(windows + 1):
            t0 = time.perf_counter()
            for _ in range(window):
                x, y = _plain_batch(stage, x_all, y_all, global_batch, gen)
                loss, _ = stage.loss(model, x, y, generator=gen, step=step, progress=step / total)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), stage.cfg.optim.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                ema.update()
                step += 1
            rates.append(window * global_batch / (time.perf_counter() - t0))
        return {"warmup_samples_per_s": rates[0], "window_samples_per_s": rates[1:]}
    finally:
        torch.set_num_threads(old_threads)


def plain_loop_main() -> None:
    """``python -c`` entry of :func:`plain_loop_subprocess`: JSON args on stdin, JSON result on stdout."""
    import sys

    from biflow.config import load_config

    a = json.loads(sys.stdin.read())
    flow = load_config(a["exp"]).flow
    x, y, _ = bench_images(a["images"], flow.channels, flow.image_size)
    res = plain_loop(a["exp"], a["global_batch"], x, y, a["window"], a["windows"], a["threads"], a["seed"],
                     a["storage"])
    res["torch_threads"] = torch.get_num_threads()
    print("BENCH_JSON " + json.dumps(res), flush=True)


def plain_loop_subprocess(exp: dict, global_batch: int, images: int, window: int, windows: int, threads: int,
                          seed: int = 0, storage: str = "runs") -> dict:
    """Run :func:`plain_loop` in a fresh process with ``threads`` torch threads.

    A fresh process lets OpenMP read ``OMP_WAIT_POLICY=PASSIVE`` at start: on a
    shared, oversubscribed machine the default spin-waiting at every parallel
    region made a 2-thread loop 20-40x slower than a 1-thread one (measured),
    which would flatter any comparison against it."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = {"exp": exp, "global_batch": global_batch, "images": images, "window": window, "windows": windows,
            "threads": threads, "seed": seed, "storage": storage}
    proc = subprocess.run([sys.executable, "-c", "from biflow.bench.baseline import plain_loop_main; plain_loop_main()"],
                          input=json.dumps(args), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"plain training loop failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    res = json.loads(lines[-1][len("BENCH_JSON "):])
    res.update(threads=threads, omp_wait_policy=env["OMP_WAIT_POLICY"])
    return res


def step_breakdown(exp: dict, global_batch: int, x_all, y_all, steps: int, threads: int, seed: int = 0,
                   storage: str = "runs") -> dict:
    """Where one training step's time goes, in this process with ``threads`` torch threads:
    batch assembly (data), the stage's loss (forward), backward, clipping + AdamW + LR schedule
    (optimizer), EMA, and host syncs (the loop's ``.item()`` reads: the finite-loss check and
    the logged metrics). Median ms per phase over ``steps`` steps after 2 warm-up steps; on a
    CPU every op is synchronous, so wall time per phase is the phase's cost."""
    import statistics

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stage, model, opt, sched, ema, gen = _plain_setup(exp, steps + 2, seed, storage)
        x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
        phases: dict[str, list[float]] = {k: [] for k in ("data", "forward", "host_sync", "backward", "optimizer",
                                                           "ema")}
        for i in range(steps + 2):
            t = [time.perf_counter()]
            x, y = _plain_batch(stage, x_all, y_all, global_batch, gen)
            t.append(time.perf_counter())
            loss, _ = stage.loss(model, x, y, generator=gen, step=i, progress=i / (steps + 2))
            t.append(time.perf_counter())
            bool(torch.isfinite(loss).item())
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            ema.update()
            t.append(time.perf_counter())
            if i >= 2:
                for k, a, b in zip(phases, t, t[1:]):
                    phases[k].append(b - a)
        ms = {k: 1e3 * statistics.median(v) for k, v in phases.items()}
        total = sum(ms.values())
        return {"ms_per_phase": ms, "ms_per_step": total, "share": {k: v / total for k, v in ms.items()},
                "steps": steps, "threads": threads, "global_batch": global_batch,
                "stage": stage.name, "note": "forward includes the loss's metric reads (.item() on its scalars)"}
    finally:
        torch.set_num_threads(old_threads)
