"""``biflow bench perceptual``: what the perceptual term costs per reverse step.

One optimizer step of the reverse model (loss, backward, AdamW) is timed for a
job's reverse config with the perceptual term off, as the job sets it, and with
the old default (299 px, every Inception tap, every row). Variants are timed in
interleaved rounds (the machine is shared and noisy) and reported as ratios to
the step without the term, measured in the same run. Writes
``perceptual.json`` and ``perceptual.png``. Goal: the job's setting costs at
most 1.5x the step without it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from biflow.bench.sampling import bar_chart
from biflow.config import ExperimentConfig, load_config
from biflow.timing import write_results

GOAL_RATIO = 1.5
from biflow.recipe import JOBS_DIR as JOBS


def _variants(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """off / the job's own perceptual setting / the pre-issue-15 default (299 px, all taps, all rows)."""
    rev = cfg.reverse
    job = rev if rev.perceptual_weight > 0 else dataclasses.replace(rev, perceptual_weight=1.0)
    full = dataclasses.replace(job, perceptual=dataclasses.replace(job.perceptual, resize=299, taps=[], rows=1.0))
    return {name: dataclasses.replace(cfg, reverse=r)
            for name, r in {"off": dataclasses.replace(rev, perceptual_weight=0.0), "job": job,
                            "full-299": full}.items()}


def _step_fn(cfg: ExperimentConfig, batch: int, seed: int = 0) -> Callable[[], float]:
    from biflow.losses import reverse_loss
    from biflow.models import ReverseModel, build_flow
    from biflow.perceptual import build_feature_net

    torch.manual_seed(seed)
    fcfg = cfg.flow
    flow = build_flow(fcfg).eval().requires_grad_(False)
    rev = ReverseModel(cfg.reverse, fcfg)
    opt = torch.optim.AdamW(rev.parameters(), lr=1e-4)
    net = build_feature_net(cfg.reverse.perceptual) if cfg.reverse.perceptual_weight > 0 else None
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, fcfg.channels, fcfg.image_size, fcfg.image_size, generator=g) * 2 - 1
    y = torch.randint(0, max(fcfg.num_classes, 1), (batch,), generator=g) if fcfg.num_classes else None

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = reverse_loss(rev, flow, x, y, cfg.reverse, fcfg, feature_net=net, generator=g)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def bench_perceptual(out_dir: str | Path = "runs/bench", job: str = "quickstart", rounds: int = 5,
                     steps_per_round: int = 3, batch: int = 0, full: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Times each variant of ``jobs/<job>-reverse.yaml`` (flow shape from ``<job>-forward.yaml``);
    ``full=False`` leaves out the slow 299-px variant."""
    rev_cfg = load_config(JOBS / f"{job}-reverse.yaml")
    fwd_cfg = load_config(JOBS / f"{job}-forward.yaml")
    cfg = dataclasses.replace(rev_cfg, flow=fwd_cfg.flow)
    batch = batch or cfg.train.batch_size // max(cfg.ray.workers, 1)  # one rank's micro-batch
    variants = _variants(cfg)
    if not full:
        variants.pop("full-299")
    steps = {name: _step_fn(c, batch) for name, c in variants.items()}
    for fn in steps.values():  # warm-up: allocations, first-call paths
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, fn in steps.items():
            times[name] += [fn() for _ in range(steps_per_round)]
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * statistics.median(t):.0f} ms" for n, t in times.items()))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    p = variants["job"].reverse.perceptual
    results = {
        "job": job, "batch_per_rank": batch, "rounds": rounds, "steps_per_round": steps_per_round,
        "ms_per_step": ms,
        "ratio_vs_off": {name: v / ms["off"] for name, v in ms.items()},
        "job_perceptual": {"network": p.network, "resize": p.resize, "taps": list(p.taps), "rows": p.rows,
                           "crop": p.crop},
        "goal_ratio_max": GOAL_RATIO,
        "goal_met": ms["job"] / ms["off"] <= GOAL_RATIO,
    }
    out = Path(out_dir)
    write_results(out, "perceptual", results)
    bar_chart(out / "perceptual.png", list(ms), [results["ratio_vs_off"][n] for n in ms],
              "step time / step without the term", f"perceptual term cost ({job}, batch {batch} per rank)")
    full_note = (f", {ms['full-299']:.0f} ms at 299 px with every tap ({results['ratio_vs_off']['full-299']:.2f}x)"
                 if "full-299" in ms else "")
    log(f"{job}: step {ms['off']:.0f} ms without the perceptual term, {ms['job']:.0f} ms with the job's "
        f"({results['ratio_vs_off']['job']:.2f}x, goal <= {GOAL_RATIO}x: {'met' if results['goal_met'] else 'MISSED'})"
        f"{full_note} -> {out / 'perceptual.json'}")
    return results
