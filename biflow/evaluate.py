"""Evaluate a trained pair: FID of BiFlow 1-NFE samples and of the exact inverse
(+Tweedie) from the same forward flow, bits/dim, reconstruction PSNR of
G(F(x)), ms/img of both samplers, sample grids, one results JSON.

Generation can be spread over Ray workers (``workers > 0``): each worker loads
the checkpoints, generates its share of samples and returns Inception
features, so a 50k-sample FID runs on a cluster. Without Ray it all runs here.
"""

from __future__ import annotations

import hashlib
import os
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from biflow.config import ExperimentConfig, load_config
from biflow.errors import UserError

Log = Callable[[str], None]


# ---------------------------------------------------------------------------
# Loading trained models
# ---------------------------------------------------------------------------


@dataclass
class Loaded:
    model: torch.nn.Module
    config: ExperimentConfig
    stage: str
    step: int
    uri: str


def _clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(ref: str, storage: str = "", endpoint: str = "", region: str = "",
                    device: str | torch.device = "cpu", key: str = "CHECKPOINT") -> Loaded:
    """The EMA model of a checkpoint (run name, run dir or checkpoint dir/URI)."""
    from biflow.models import ReverseModel, TARFlow
    from biflow.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(ref, storage, endpoint, region, key=key)
    meta = ckpt.metadata()
    cfg = load_config(meta["config"])
    stage = meta.get("stage", cfg.stage)
    model = TARFlow(cfg.flow) if stage == "forward" else ReverseModel(cfg.reverse, cfg.flow)
    missing, unexpected = model.load_state_dict(_clean_state(ckpt.ema_state()), strict=False)
    if missing or unexpected:
        raise UserError(f"{key}={ref!r}: weights do not match the {stage} model of its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return Loaded(model.to(device).eval(), cfg, stage, ckpt.step, ckpt.uri)


def load_pair(checkpoint: str, forward: str = "", storage: str = "", endpoint: str = "", region: str = "",
              device: str | torch.device = "cpu") -> tuple[Loaded, Loaded | None]:
    """(forward flow, reverse model or None) from a reverse or forward checkpoint."""
    first = load_checkpoint(checkpoint, storage, endpoint, region, device)
    if first.stage == "forward":
        return first, None
    ref = forward or first.config.train.forward_checkpoint
    store = storage or first.config.ray.storage
    flow = load_checkpoint(ref, store, endpoint or first.config.ray.storage_endpoint, region, device,
                           key="--forward (or the reverse run's train.forward_checkpoint)")
    return flow, first


# ---------------------------------------------------------------------------
# Sampling, timing and features
# ---------------------------------------------------------------------------


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    return torch.arange(seed, seed + n) % num_classes


def generate(flow, rev, sampler: str, n: int, guidance: float, batch_size: int, seed: int,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """n samples in [-1, 1] from ``sampler`` ('biflow' or 'exact'), deterministic in seed."""
    from biflow.sampling import sample_biflow, sample_exact

    cfg = flow.config
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        g = torch.Generator(device).manual_seed(seed + start)
        z = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, generator=g, device=device)
        y = _labels(b, cfg.num_classes, seed + start)
        y = None if y is None else y.to(device)
        if sampler == "biflow":
            x = sample_biflow(rev, y, guidance=guidance, z=z)
        else:
            x = sample_exact(flow, y, guidance=guidance, z=z, tweedie=True)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def time_sampler(flow, rev, sampler: str, guidance: float, batch_size: int, reps: int = 2) -> float:
    """ms per image at ``batch_size`` (median of reps after one warm-up)."""
    from biflow.bench import timeit

    return 1000 * timeit(lambda: generate(flow, rev, sampler, batch_size, guidance, batch_size, 0,
                                          next(flow.parameters()).device), reps) / batch_size


def _remote_features(checkpoint: str, forward: str, storage: str, endpoint: str, sampler: str, n: int,
                     guidance: float, batch_size: int, seed: int) -> np.ndarray:
    from biflow.metrics import inception_features

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flow, rev = load_pair(checkpoint, forward, storage, endpoint, device=device)
    x = generate(flow.model, rev.model if rev else None, sampler, n, guidance, batch_size, seed, device)
    return inception_features(x, device=device)


def sample_features(checkpoint: str, forward: str, storage: str, endpoint: str, sampler: str, n: int,
                    guidance: float, batch_size: int, workers: int, log: Log) -> np.ndarray:
    """Inception features of n samples generated by ``workers`` Ray tasks."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(_remote_features)
    per = math.ceil(n / workers)
    refs = [task.remote(checkpoint, forward, storage, endpoint, sampler, min(per, n - i * per), guidance,
                        batch_size, 10_000_019 * i) for i in range(workers) if n - i * per > 0]
    log(f"{sampler}: {n} samples on {len(refs)} Ray workers ({'GPU' if use_gpu else 'CPU'})")
    return np.concatenate(ray.get(refs))


# ---------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------


@dataclass
class EvalOptions:
    num_samples: int = 1000
    guidance: list[float] = field(default_factory=lambda: [0.0])
    batch_size: int = 100
    num_eval_images: int = 1000  # test images for bpd and reconstruction
    timing_batch: int = 16
    workers: int = 0  # Ray workers for generation; 0 = in this process
    grid: int = 64  # images in each PNG grid
    data_uri: str = ""  # override the run's data.uri (e.g. shards moved)


def evaluate(checkpoint: str, out_dir: str | Path, opts: EvalOptions | None = None, forward: str = "",
             storage: str = "", endpoint: str = "", log: Log = print) -> dict[str, Any]:
    from biflow.data.pipeline import iter_split
    from biflow.losses import bits_per_dim, nll_per_dim
    from biflow.metrics import compute_fid, psnr, reference_stats, save_grid

    opts = opts or EvalOptions()
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flow_l, rev_l = load_pair(checkpoint, forward, storage, endpoint)
    flow, rev = flow_l.model, rev_l.model if rev_l else None
    cfg = (rev_l or flow_l).config
    fcfg = flow.config
    data_cfg = cfg.data
    if opts.data_uri:
        data_cfg.uri = opts.data_uri
    log(f"evaluating {flow_l.uri} (step {flow_l.step})" + (f" + {rev_l.uri} (step {rev_l.step})" if rev_l else ""))

    # held-out images: bpd of the flow and reconstruction of G(F(x))
    held_x, held_y = [], []
    for x, y in iter_split(data_cfg, data_cfg.eval_split, batch_size=opts.batch_size,
                           limit=max(opts.num_eval_images, opts.num_samples)):
        held_x.append(x)
        held_y.append(y)
    if not held_x:
        raise UserError(f"data.eval_split={data_cfg.eval_split!r} of {data_cfg.uri} has no images")
    held_x, held_y = torch.cat(held_x), torch.cat(held_y)
    g = torch.Generator().manual_seed(0)
    nll, recon_psnr = [], []
    y_all = held_y if fcfg.num_classes else None
    with torch.no_grad():
        for i in range(0, min(len(held_x), opts.num_eval_images), opts.batch_size):
            x = held_x[i:i + opts.batch_size]
            y = None if y_all is None else y_all[i:i + opts.batch_size]
            x_noisy = x + fcfg.noise_std * torch.randn(x.shape, generator=g)
            traj = flow(x_noisy, y)
            nll.append(nll_per_dim(traj))
            if rev is not None:
                recon_psnr.append(psnr(rev(traj.z, y).x, x, reduction="none"))
    nll_mean = torch.cat(nll).mean().item()
    results: dict[str, Any] = {
        "checkpoint": {"forward": flow_l.uri, "forward_step": flow_l.step,
                       "reverse": rev_l.uri if rev_l else None, "reverse_step": rev_l.step if rev_l else None},
        "num_samples": opts.num_samples,
        "bpd": float(bits_per_dim(nll_mean)),
        "nll_nats_per_dim": nll_mean,
        "noise_std": fcfg.noise_std,
        "recon_psnr_db": torch.cat(recon_psnr).mean().item() if recon_psnr else None,
        "samplers": {},
    }
    log(f"bpd {results['bpd']:.3f}" + (f" | reconstruction PSNR {results['recon_psnr_db']:.2f} dB" if rev else ""))

    dataset = Path(data_cfg.uri.rstrip("/")).name or "data"
    uri_tag = hashlib.sha256(data_cfg.uri.encode()).hexdigest()[:8]
    ref = reference_stats(f"{dataset}-{uri_tag}", data_cfg.eval_split,
                          held_x[: opts.num_samples], count=min(opts.num_samples, len(held_x)),
                          image_size=fcfg.image_size, batch_size=opts.batch_size)
    samplers = ["biflow", "exact"] if rev is not None else ["exact"]
    for w in opts.guidance:
        for sampler in samplers:
            t0 = time.time()
            if opts.workers > 0:
                feats = sample_features(checkpoint, forward, storage, endpoint, sampler, opts.num_samples, w,
                                        opts.batch_size, opts.workers, log)
                from biflow.metrics import FIDStats, frechet_distance

                st = FIDStats.from_features(feats)
                fid = frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma, method="eigh")
                grid = generate(flow, rev, sampler, opts.grid, w, opts.grid, 0)
            else:
                xs = generate(flow, rev, sampler, opts.num_samples, w, opts.batch_size, 0)
                fid = compute_fid(xs, ref, batch_size=opts.batch_size, method="eigh")
                grid = xs[: opts.grid]
            grid_path = save_grid(grid, out / f"samples-{sampler}-w{w:g}.png", nrow=int(math.sqrt(opts.grid)))
            ms = time_sampler(flow, rev, sampler, w, opts.timing_batch)
            results["samplers"][f"{sampler}@w={w:g}"] = {
                "sampler": sampler, "guidance": w, "fid": fid, "ms_per_image": ms,
                "timing_batch": opts.timing_batch, "grid": str(grid_path), "seconds": time.time() - t0,
            }
            log(f"{sampler:6s} w={w:g}: FID {fid:.2f} | {ms:.2f} ms/img (batch {opts.timing_batch}) | {grid_path}")
        if rev is not None:
            b, e = results["samplers"][f"biflow@w={w:g}"], results["samplers"][f"exact@w={w:g}"]
            results["samplers"][f"biflow@w={w:g}"]["speedup_vs_exact"] = e["ms_per_image"] / b["ms_per_image"]
            results["samplers"][f"biflow@w={w:g}"]["fid_ratio_vs_exact"] = b["fid"] / max(e["fid"], 1e-9)
    save_grid(held_x[: opts.grid], out / "data.png", nrow=int(math.sqrt(opts.grid)))
    results["seconds"] = time.time() - t_start
    from biflow.bench import machine_info

    results["machine"] = machine_info()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {out / 'results.json'}")
    return results
