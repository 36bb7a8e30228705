"""``biflow bench flow-ref``: our forward flow against apple/ml-tarflow's own model.

The reference is ml-tarflow's ``transformer_flow.py``, loaded from a checkout the
user gives (``--reference``; its code is not part of biflow). At each shape both
flows get the same unconditional Fashion-MNIST images in the same order, the same
noise draws, the same optimizer (the quickstart forward job's AdamW, warmup +
cosine and clipping) and the same number of steps, in this process. Ours runs as
shipped (``FlowConfig`` defaults, ``flow.clip`` included) through the loss the
training loop uses (:func:`biflow.losses.forward_loss`); the reference through its
own ``Model.forward`` and ``get_loss``, the objective of its ``train.py``. The one
change to the reference is its head size: it is fixed at 64 there, and set here to
ours (width / num_heads) so that the two transformers have the same shape.

Reported per shape and seed: held-out NLL in nats/dim (Gaussian constant included,
the same noisy test images for both, raw weights) and the median step time, with
the differences ours - reference and ours / reference. Writes ``flow-ref.json`` and
``flow-ref.png``. ``--sampling`` times the two exact samplers instead
(``flow-ref-sampling.json``): ours must be no slower than ml-tarflow's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from biflow.config import FlowConfig, OptimConfig, load_config
from biflow.timing import pyplot, write_results

from biflow.recipe import JOBS_DIR as JOBS

# small unconditional Fashion-MNIST shapes: (width, depth per block, blocks, patch, heads)
SHAPES: dict[str, dict[str, int]] = {
    "quickstart": {"width": 96, "depth": 2, "num_blocks": 4, "patch_size": 4, "num_heads": 4},
    "w128-d4": {"width": 128, "depth": 4, "num_blocks": 4, "patch_size": 4, "num_heads": 4},
    "p2-b8": {"width": 64, "depth": 1, "num_blocks": 8, "patch_size": 2, "num_heads": 2},
}


def load_reference(path: str | Path) -> ModuleType:
    """ml-tarflow's ``transformer_flow`` module from a checkout folder (or the file itself)."""
    from biflow.errors import UserError

    p = Path(path).expanduser()
    f = p / "transformer_flow.py" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"--reference {path}: no transformer_flow.py there; clone "
                        "https://github.com/apple/ml-tarflow and give the folder")
    spec = importlib.util.spec_from_file_location("ml_tarflow_transformer_flow", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    for name in ("Model", "MetaBlock"):
        if not hasattr(mod, name):
            raise UserError(f"--reference {f}: no {name} in it; is this ml-tarflow's transformer_flow.py?")
    return mod


def build_reference(mod: ModuleType, cfg: FlowConfig) -> torch.nn.Module:
    """The reference model at ``cfg``'s shape, unconditional, with ``cfg``'s head size."""
    base = mod.MetaBlock
    head_dim = cfg.width // cfg.num_heads

    class SameHeads(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["head_dim"] = head_dim
            super().__init__(*args, **kwargs)

    mod.MetaBlock = SameHeads  # Model looks MetaBlock up in its module when it builds its blocks
    try:
        return mod.Model(in_channels=cfg.channels, img_size=cfg.image_size, patch_size=cfg.patch_size,
                         channels=cfg.width, num_blocks=cfg.num_blocks, layers_per_block=cfg.depth, num_classes=0)
    finally:
        mod.MetaBlock = base


def reference_nll_per_dim(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) NLL in nats/dim of the reference: its ``forward`` returns the log-det as a
    per-dimension mean summed over blocks; the standard normal prior is added here."""
    z, _, logdets = model(x)
    return 0.5 * z.pow(2).flatten(1).mean(1) + 0.5 * math.log(2 * math.pi) - logdets


def flow_config(shape: dict[str, int], noise_std: float) -> FlowConfig:
    """Ours at ``shape``, every other field as shipped, unconditional."""
    return FlowConfig(image_size=28, channels=1, num_classes=0, noise_std=noise_std, **shape)


def train_pair(mod: ModuleType, cfg: FlowConfig, optim: OptimConfig, x_train: torch.Tensor, x_test: torch.Tensor,
               steps: int, batch: int, seed: int) -> dict:
    """Train ours and the reference on the same batches and noise; held-out NLL and step times."""
    from biflow.losses import forward_loss, nll_per_dim
    from biflow.models import TARFlow
    from biflow.train.engine import build_optimizer, warmup_cosine

    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(x_train), (steps, batch), generator=g)
    noise = torch.randn((steps, batch, *x_train.shape[1:]), generator=g) * cfg.noise_std
    test_noisy = x_test + cfg.noise_std * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(10_000))

    pre_noised = dataclasses.replace(cfg, noise_std=0.0)  # the loss's own noise: noise[i], drawn above

    def ours_loss(model, i):
        return forward_loss(model, x_train[order[i]] + noise[i], None, pre_noised)[0]

    def ref_loss(model, i):
        z, _, logdets = model(x_train[order[i]] + noise[i])
        return model.get_loss(z, logdets)

    torch.manual_seed(seed)
    ours = TARFlow(cfg)
    torch.manual_seed(seed)
    ref = build_reference(mod, cfg)
    out = {}
    for name, model, loss_fn, nll_fn in (
            ("reference", ref, ref_loss, lambda m, x: reference_nll_per_dim(m, x)),
            ("ours", ours, ours_loss, lambda m, x: nll_per_dim(m(x)))):
        opt = build_optimizer(model, optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(optim, steps))
        times, losses = [], []
        model.train()
        for i in range(steps):
            t0 = time.perf_counter()
            loss = loss_fn(model, i)
            loss.backward()
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            nll = torch.cat([nll_fn(model, xb) for xb in test_noisy.split(500)]).mean().item()
        out[name] = {"heldout_nll_nats_per_dim": nll, "ms_per_step": 1e3 * statistics.median(times[5:]),
                     "final_train_loss": statistics.fmean(losses[-20:]),
                     "params": sum(p.numel() for p in model.parameters())}
    out["nll_gap_nats_per_dim"] = out["ours"]["heldout_nll_nats_per_dim"] - out["reference"]["heldout_nll_nats_per_dim"]
    out["step_time_ratio"] = out["ours"]["ms_per_step"] / out["reference"]["ms_per_step"]
    return out


def sampling_pair(mod: ModuleType, cfg: FlowConfig, batches: tuple[int, ...] = (1, 16), reps: int = 3,
                  seed: int = 0) -> dict:
    """The exact sampler of each flow at ``cfg``'s shape, same weights scale, same z: ours
    (:func:`biflow.sampling.sample_exact`, KV cache, no Tweedie) against ml-tarflow's
    ``Model.reverse`` (its own KV cache), median seconds per call over ``reps``."""
    from biflow.models import TARFlow
    from biflow.sampling import sample_exact
    from biflow.timing import timeit

    torch.manual_seed(seed)
    ours = TARFlow(cfg).eval()
    torch.manual_seed(seed)
    ref = build_reference(mod, cfg).eval()
    with torch.no_grad():  # non-trivial weights: zero-init output layers would make decoding look cheap
        for model in (ours, ref):
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm) * 0.02)
    out = {}
    for b in batches:
        z = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            t_ours = timeit(lambda: sample_exact(ours, None, z=z, tweedie=False, resample_tries=0), reps)
            t_ref = timeit(lambda: ref.reverse(ref.patchify(z.clone())), reps)
        out[str(b)] = {"ours_ms_per_image": 1e3 * t_ours / b, "reference_ms_per_image": 1e3 * t_ref / b,
                       "time_ratio": t_ours / t_ref}
    return out


def bench_flow_ref_sampling(reference: str | Path, out_dir: str | Path, shapes: list[str] | None = None,
                            batches: tuple[int, ...] = (1, 16), reps: int = 3,
                            log: Callable[[str], None] = print) -> dict:
    """:func:`sampling_pair` at every shape -> ``flow-ref-sampling.json`` (goal: ratio <= 1)."""
    mod = load_reference(reference)
    names = _shape_names(shapes)
    results: dict = {"reference": str(Path(reference).expanduser().resolve()), "batches": list(batches),
                     "reps": reps, "threads": torch.get_num_threads(), "shapes": {}}
    for name in names:
        cfg = flow_config(SHAPES[name], 0.1)
        results["shapes"][name] = r = sampling_pair(mod, cfg, batches, reps)
        log(f"{name}: exact sampler " + "; ".join(
            f"batch {b}: ours {v['ours_ms_per_image']:.1f} vs ml-tarflow {v['reference_ms_per_image']:.1f} ms/img "
            f"({v['time_ratio']:.3f}x)" for b, v in r.items()))
    results["max_time_ratio"] = max(v["time_ratio"] for r in results["shapes"].values() for v in r.values())
    path = write_results(out_dir, "flow-ref-sampling", results)
    log(f"worst: ours at {results['max_time_ratio']:.3f}x ml-tarflow's sampler time -> {path}")
    return results


def _shape_names(shapes: list[str] | None) -> list[str]:
    from biflow.errors import UserError

    names = shapes or list(SHAPES)
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        raise UserError(f"unknown shape(s) {unknown}; allowed: {', '.join(SHAPES)}")
    return names


def bench_flow_reference(reference: str | Path, out_dir: str | Path, shapes: list[str] | None = None,
                         steps: int = 500, batch: int = 32, seeds: int = 1, train_images: int = 20_000,
                         test_images: int = 2000, job: str = "quickstart",
                         log: Callable[[str], None] = print) -> dict:
    """Every shape x seed, ours against the reference; JSON and PNG under ``out_dir``."""
    from biflow.bench.levers import fashion_mnist

    mod = load_reference(reference)
    names = _shape_names(shapes)
    job_cfg = load_config(JOBS / f"{job}-forward.yaml")
    optim = job_cfg.optim
    x_train, _ = fashion_mnist("train", train_images)
    x_test, _ = fashion_mnist("test", test_images)
    results: dict = {"reference": str(Path(reference).expanduser().resolve()), "job": job, "steps": steps,
                     "batch": batch, "seeds": seeds, "train_images": train_images, "test_images": test_images,
                     "noise_std": job_cfg.flow.noise_std, "threads": torch.get_num_threads(),
                     "optim": {"lr": optim.lr, "warmup_steps": optim.warmup_steps, "betas": list(optim.betas),
                               "grad_clip": optim.grad_clip, "weight_decay": optim.weight_decay},
                     "ours_defaults": {"clip": FlowConfig.clip, "out_norm": FlowConfig.out_norm,
                                       "alpha_soft_clip": FlowConfig.alpha_soft_clip},
                     "shapes": {}}
    for name in names:
        cfg = flow_config(SHAPES[name], job_cfg.flow.noise_std)
        runs = []
        for seed in range(seeds):
            t0 = time.time()
            r = train_pair(mod, cfg, optim, x_train, x_test, steps, batch, seed)
            runs.append(r)
            log(f"{name} seed {seed}: held-out NLL ours {r['ours']['heldout_nll_nats_per_dim']:.4f} vs reference "
                f"{r['reference']['heldout_nll_nats_per_dim']:.4f} nats/dim (gap {r['nll_gap_nats_per_dim']:+.4f}); "
                f"step {r['ours']['ms_per_step']:.1f} vs {r['reference']['ms_per_step']:.1f} ms "
                f"({r['step_time_ratio']:.3f}x) [{time.time() - t0:.0f} s]")
        results["shapes"][name] = {
            "shape": SHAPES[name], "runs": runs,
            "mean_nll_gap_nats_per_dim": statistics.fmean(r["nll_gap_nats_per_dim"] for r in runs),
            "mean_step_time_ratio": statistics.fmean(r["step_time_ratio"] for r in runs)}
    results["max_mean_nll_gap_nats_per_dim"] = max(s["mean_nll_gap_nats_per_dim"] for s in results["shapes"].values())
    results["max_mean_step_time_ratio"] = max(s["mean_step_time_ratio"] for s in results["shapes"].values())
    out = Path(out_dir)
    write_results(out, "flow-ref", results)
    _plot(out / "flow-ref.png", results)
    log(f"worst shape: NLL gap {results['max_mean_nll_gap_nats_per_dim']:+.4f} nats/dim, step time "
        f"{results['max_mean_step_time_ratio']:.3f}x the reference's -> {out / 'flow-ref.json'}")
    return results


def _plot(path: Path, results: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(results["shapes"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.38
    for k, who in enumerate(("reference", "ours")):
        nll = [statistics.fmean(r[who]["heldout_nll_nats_per_dim"] for r in results["shapes"][n]["runs"]) for n in names]
        ms = [statistics.fmean(r[who]["ms_per_step"] for r in results["shapes"][n]["runs"]) for n in names]
        xs = [i + (k - 0.5) * w for i in range(len(names))]
        a.bar(xs, nll, w, label=who)
        b.bar(xs, ms, w, label=who)
    for ax, ylabel in ((a, "held-out NLL (nats/dim)"), (b, "ms per step")):
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    lo = min(r[who]["heldout_nll_nats_per_dim"] for n in names for r in results["shapes"][n]["runs"]
             for who in ("ours", "reference"))
    a.set_ylim(bottom=lo - 0.05)
    a.set_title(f"{results['steps']} steps, batch {results['batch']}, {results['seeds']} seed(s)")
    b.set_title(f"{results['threads']} torch threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
