"""Evaluate a trained pair: FID and KID of BiFlow 1-NFE samples and of the exact
inverse (+Tweedie) from the same forward flow, each beside the real-vs-real floor
at the same sample count; bits/dim (Gaussian-noised as trained, and uniformly
dequantised, with the excess over the noise floor); inversion and denoising PSNR
of G(F(x~)); ms/img of both samplers; sample grids; one results JSON.

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

from biflow.errors import UserError
from biflow.train.checkpoint import Loaded, load_checkpoint, load_pair  # noqa: F401 (loading lives with the format)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------
# Sampling, timing and features
# ---------------------------------------------------------------------------


def content_key(x: torch.Tensor) -> str:
    """8 hex digits that name a set of images by content, whatever their order: the sha256 of
    the sorted per-image sha256 digests (the key of the cached real-image features)."""
    rows = x.reshape(len(x), -1).contiguous().numpy()
    digests = sorted(hashlib.sha256(r.tobytes()).digest() for r in rows)
    return hashlib.sha256(b"".join(digests)).hexdigest()[:8]


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    return torch.arange(seed, seed + n) % num_classes


def class_grid(n: int, num_classes: int) -> tuple[int, int]:
    """(images, columns) of a sample grid: with a few classes, one column per class (sample i
    has label i mod num_classes), so each class reads down its column; else a square grid."""
    if 1 < num_classes <= 16:
        return num_classes * max(1, math.ceil(n / num_classes)), num_classes
    return n, max(1, int(math.sqrt(n)))


def device_option(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; ``cpu``, ``cuda`` or ``cuda:N``."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: allowed values: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: allowed values: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here (torch {torch.__version__}); use auto or cpu")
    return dev


def generate(flow, rev, sampler: str, n: int, guidance: float, batch_size: int, seed: int,
             device: str | torch.device = "cpu", codec=None, annealed: bool = False,
             progress: bool = False, labels: torch.Tensor | None = None, flow_config=None) -> torch.Tensor:
    """n samples from ``sampler`` ('biflow' or 'exact'), deterministic in seed: images in
    [-1, 1], latents decoded through ``codec`` (a :class:`~biflow.data.latents.LatentCodec`)
    when given, else the model's own space (latents stay unclamped). ``annealed``: the
    exact sampler's guidance ramps over the decode steps (ml-tarflow's option). ``labels``:
    one class per sample (default: seed, seed + 1, ... modulo the classes). ``flow`` may be
    None for the 1-NFE sampler without a Tweedie step, given ``flow_config``."""
    from biflow.sampling import sample_biflow, sample_biflow_cfg, sample_exact, tweedie_denoise

    cfg = flow_config or flow.config
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"{sampler} samples", unit="img")
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        g = torch.Generator().manual_seed(seed + start)  # on the CPU: the same samples on any device
        z = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device)
        y = _labels(b, cfg.num_classes, seed + start) if labels is None or not cfg.num_classes \
            else labels[start:start + b]
        y = None if y is None else y.to(device)
        if sampler in ("biflow", "biflow-cfg2"):
            if sampler == "biflow":
                x = sample_biflow(rev, y, guidance=guidance, z=z)
            else:  # inference-time CFG: 2 NFE
                x = sample_biflow_cfg(rev, y, guidance=guidance, z=z)
            if rev.config.denoise == "tweedie":  # G was trained to land on x~: F's Tweedie step denoises
                x = tweedie_denoise(flow, x, y, cfg.noise_std)
        else:
            x = sample_exact(flow, y, guidance=guidance, z=z, tweedie=True, annealed=annealed,
                             generator=torch.Generator(device).manual_seed(seed + start + 1))
        if codec is not None:
            x = codec.decode(x)
        elif cfg.channels in (1, 3):
            x = x.clamp(-1, 1)
        out.append(x.float().cpu())
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    return torch.cat(out)


def time_sampler(flow, rev, sampler: str, guidance: float, batch_size: int, reps: int = 2, codec=None,
                 annealed: bool = False) -> float:
    """ms per image at ``batch_size`` (median of reps after one warm-up); with ``codec``
    the autoencoder decode is included."""
    from biflow.timing import timeit

    return 1000 * timeit(lambda: generate(flow, rev, sampler, batch_size, guidance, batch_size, 0,
                                          next(flow.parameters()).device, codec, annealed), reps) / batch_size


def _remote_features(checkpoint: str, forward: str, storage: str, endpoint: str, sampler: str, n: int,
                     guidance: float, batch_size: int, seed: int, latent_data: dict | None = None,
                     annealed: bool = False) -> np.ndarray:
    from biflow.metrics import inception_features

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flow, rev = load_pair(checkpoint, forward, storage, endpoint, device=device)
    codec = None
    if latent_data is not None:
        from biflow.config import DataConfig, from_dict
        from biflow.data.latents import LatentCodec

        codec = LatentCodec.from_data_config(from_dict(DataConfig, latent_data), device)
    x = generate(flow.model, rev.model if rev else None, sampler, n, guidance, batch_size, seed, device, codec,
                 annealed)
    return inception_features(x, device=device)


def sample_features(checkpoint: str, forward: str, storage: str, endpoint: str, sampler: str, n: int,
                    guidance: float, batch_size: int, workers: int, log: Log,
                    latent_data: dict | None = None, annealed: bool = False) -> np.ndarray:
    """Inception features of n samples generated by ``workers`` Ray tasks."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    from biflow.fleet.capacity import reachable

    use_gpu = reachable("GPU") > 0  # a fleet scaled to zero launches GPU nodes for the tasks
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(_remote_features)
    per = math.ceil(n / workers)
    refs = [task.remote(checkpoint, forward, storage, endpoint, sampler, min(per, n - i * per), guidance,
                        batch_size, 10_000_019 * i, latent_data, annealed)
            for i in range(workers) if n - i * per > 0]
    log(f"{sampler}: {n} samples on {len(refs)} Ray workers ({'GPU' if use_gpu else 'CPU'})")
    return np.concatenate(ray.get(refs))


def latent_codec(data_cfg, manifest=None, device: str | torch.device = "cpu", info: dict | None = None):
    """The frozen autoencoder of a latent data set, or None for pixel data. ``info``, the record
    a checkpoint or an export keeps (:func:`~biflow.data.latents.latent_info`), spares reading
    the shards' manifest; pixel runs read nothing."""
    from biflow.data.latents import LatentCodec
    from biflow.data.shards import read_manifest

    if info is not None:
        return LatentCodec.from_info(info, data_cfg.autoencoder, device)
    if manifest is None and data_cfg.kind != "latents":
        return None
    manifest = manifest or read_manifest(data_cfg.uri, data_cfg.endpoint, data_cfg.region)
    if manifest.kind != "latents":
        return None
    return LatentCodec.from_manifest(manifest, data_cfg.autoencoder, device)


def default_out(kind: str, name: str, step: int) -> Path:
    """Where `biflow evaluate` / `biflow sample` write without --out: one folder per run and
    step (``runs/eval/<run>/step-<N>``), so evaluating another run never overwrites this one."""
    return Path("runs") / kind / (name or "model") / (f"step-{step}" if step >= 0 else "latest")


def reference_data(data_cfg, manifest, reference_uri: str = ""):
    """The real pixel images FID compares against: the data itself for pixel shards; for
    latent shards, the image shard set the latents were made from (or ``reference_uri``)."""
    import dataclasses

    if manifest.kind != "latents":
        return data_cfg
    uri = reference_uri or (manifest.data.get("source") or {}).get("path", "")
    if not uri:
        raise UserError(f"{manifest.uri}: the latent manifest does not name its source image shards; "
                        "give the real images with --reference-uri")
    return dataclasses.replace(data_cfg, uri=uri, kind="pixels")


def sample_images(checkpoint: str, out_dir: str | Path | None = None, num: int = 64, guidance: float = 0.0,
                  sampler: str = "biflow", forward: str = "", storage: str = "", endpoint: str = "",
                  batch_size: int = 64, seed: int = 0, log: Log = print, device: str = "auto",
                  progress: bool = False, autoencoder: str = "") -> dict[str, Any]:
    """``biflow sample``: images from a trained run, checkpoint or export folder (latents
    decoded), as a PNG grid and an .npz of uint8 images with their labels, generated on
    ``device`` (:func:`device_option`). No training data is read. ``out_dir`` defaults to
    :func:`default_out`."""
    import dataclasses

    from biflow.metrics import save_grid

    if sampler not in ("biflow", "exact"):
        raise UserError(f"--sampler {sampler!r}: allowed values: biflow, exact")
    dev = device_option(device)
    flow_l, rev_l = load_pair(checkpoint, forward, storage, endpoint, device=dev)
    if sampler == "biflow" and rev_l is None:
        raise UserError(f"{checkpoint!r} is a forward (stage-1) run: use --sampler exact, or give a reverse run")
    main = rev_l or flow_l
    if flow_l.model is None and (sampler == "exact" or rev_l.config.reverse.denoise == "tweedie"):
        raise UserError(f"--sampler {sampler}: {checkpoint} holds no forward flow weights (exported with "
                        "--no-flow); export it again with the flow, or use --sampler biflow")
    data = dataclasses.replace(main.config.data, autoencoder=autoencoder) if autoencoder else main.config.data
    codec = latent_codec(data, device=dev, info=main.latents)
    t0 = time.perf_counter()
    x = generate(flow_l.model, rev_l.model if rev_l else None, sampler, num, guidance, batch_size, seed, dev, codec,
                 progress=progress, flow_config=flow_l.config.flow)
    seconds = time.perf_counter() - t0
    out = Path(out_dir) if out_dir else default_out("samples", main.name, main.step)
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(x, out / f"samples-{sampler}-w{guidance:g}.png", nrow=max(1, int(math.sqrt(num))))
    labels = _labels(num, flow_l.config.flow.num_classes, seed)
    images = torch.round((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    npz = out / f"samples-{sampler}-w{guidance:g}.npz"
    np.savez_compressed(npz, images=images, labels=labels.numpy() if labels is not None else np.zeros(0))
    log(f"{num} {sampler} samples (w={guidance:g}, {'decoded latents' if codec else 'pixels'}) on {dev} in {seconds:.1f}s "
        f"-> {grid}, {npz}")
    return {"grid": str(grid), "npz": str(npz), "num": num, "seconds": seconds, "shape": list(x.shape[1:])}


# ---------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------


@dataclass
class EvalOptions:
    num_samples: int = 2000  # per sampler and guidance; the real-vs-real floor uses as many train images
    num_reference: int = 10_000  # held-out images the FID/KID reference is computed from (cached); 0 = all
    guidance: list[float] = field(default_factory=lambda: [0.0])
    batch_size: int = 100
    num_eval_images: int = 1000  # test images for bpd and reconstruction
    exact_annealed: bool = False  # the exact sampler ramps its guidance over the decode (ml-tarflow)
    kid_subsets: int = 100
    # samplers scored: biflow (1 NFE), biflow-cfg2 (inference-time CFG, 2 NFE), exact; [] = biflow + exact
    samplers: list[str] = field(default_factory=list)
    timing_batch: int = 16
    workers: int = 0  # Ray workers for generation; 0 = in this process
    grid: int = 64  # images in each PNG grid
    data_uri: str = ""  # override the run's data.uri (e.g. shards moved)
    reference_uri: str = ""  # latent runs: real image shards for FID (default: the latents' source)
    eval_split: str = ""  # override the run's data.eval_split (held-out images)


def evaluate(checkpoint: str, out_dir: str | Path | None = None, opts: EvalOptions | None = None, forward: str = "",
             storage: str = "", endpoint: str = "", log: Log = print, device: str = "auto",
             progress: bool = False) -> dict[str, Any]:
    """Latent runs are evaluated in pixel space: samples and reconstructions are decoded
    through the frozen autoencoder, FID is against the real images the latents were made
    from, PSNR compares decoded images; bits/dim stays in latent space. Models, sampling and
    Inception features run on ``device`` (:func:`device_option`; the same noise is drawn on
    the CPU whatever the device); ``progress`` shows bars over generation and features."""
    import dataclasses

    from biflow.data.pipeline import iter_split
    from biflow.data.shards import read_manifest
    from biflow.losses import bits_per_dim, nll_per_dim, rms
    from biflow.metrics import (FIDStats, frechet_distance, gaussian_noise_floor_nats, inception_features,
                                kid_from_features, psnr, reference_stats, reference_stats_path,
                                save_grid)

    opts = opts or EvalOptions()
    t_start = time.time()
    dev = device_option(device)
    flow_l, rev_l = load_pair(checkpoint, forward, storage, endpoint, device=dev)
    if flow_l.model is None:
        raise UserError(f"{checkpoint} holds no forward flow weights (exported with --no-flow): evaluation needs the "
                        "flow (bits/dim, the exact sampler); export it again with the flow, or evaluate the run")
    flow, rev = flow_l.model, rev_l.model if rev_l else None
    cfg = (rev_l or flow_l).config
    out = Path(out_dir) if out_dir else default_out("eval", (rev_l or flow_l).name, (rev_l or flow_l).step)
    out.mkdir(parents=True, exist_ok=True)
    fcfg = flow.config
    data_cfg = cfg.data
    if opts.data_uri:
        data_cfg = dataclasses.replace(data_cfg, uri=opts.data_uri)
    if opts.eval_split:
        data_cfg = dataclasses.replace(data_cfg, eval_split=opts.eval_split)
    manifest = read_manifest(data_cfg.uri, data_cfg.endpoint, data_cfg.region)
    codec = latent_codec(data_cfg, manifest, device=dev)
    ref_cfg = reference_data(data_cfg, manifest, opts.reference_uri)
    log(f"evaluating {flow_l.uri} (step {flow_l.step})" + (f" + {rev_l.uri} (step {rev_l.step})" if rev_l else "")
        + (f"; latents decoded by {manifest.data.get('autoencoder') if not data_cfg.autoencoder else data_cfg.autoencoder},"
           f" FID against {ref_cfg.uri}" if codec else ""))

    def held_out(dcfg, limit, **kw) -> torch.Tensor:
        xs, ys = [], []
        for x, y in iter_split(dcfg, dcfg.eval_split, batch_size=opts.batch_size, limit=limit, **kw):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise UserError(f"data.eval_split={dcfg.eval_split!r} of {dcfg.uri} has no images")
        return torch.cat(xs), torch.cat(ys)

    # held-out data (latents for latent runs): bpd of the flow and reconstruction of G(F(x))
    held_x, held_y = held_out(data_cfg, opts.num_eval_images)
    g = torch.Generator().manual_seed(0)
    nll, nll_deq, recon_psnr, recon_psnr_model, inv_psnr = [], [], [], [], []
    y_all = held_y if fcfg.num_classes else None
    bin_width = 2.0 / 256  # the grid bits_per_dim re-expresses densities on
    with torch.no_grad():
        for i in range(0, len(held_x), opts.batch_size):
            x = held_x[i:i + opts.batch_size].to(dev)
            y = None if y_all is None else y_all[i:i + opts.batch_size].to(dev)
            x_noisy = x + fcfg.noise_std * torch.randn(x.shape, generator=g).to(dev)
            traj = flow(x_noisy, y)
            nll.append(nll_per_dim(traj))
            if codec is None:  # uniform dequantisation, as likelihood papers report
                nll_deq.append(nll_per_dim(flow(x + bin_width * torch.rand(x.shape, generator=g).to(dev), y)))
            if rev is not None:
                out_rev = rev(traj.z, y)
                if rev.config.denoise == "tweedie":
                    from biflow.sampling import tweedie_denoise

                    out_rev.x = tweedie_denoise(flow, out_rev.x, y, fcfg.noise_std)
                recon_psnr_model.append(psnr(out_rev.x, x, reduction="none"))
                x0 = out_rev.states[0]  # G's x^0 vs x~; under norm control the alignment is scale-free,
                if rev.config.norm_control:  # so the state is compared at the target's per-sample RMS
                    x0 = x0 * rms(x_noisy, 1e-12) / rms(x0, 1e-12)
                inv_psnr.append(psnr(x0, x_noisy, reduction="none"))
                if codec is not None:  # in pixel space: decoded reconstruction vs the decoded original
                    recon_psnr.append(psnr(codec.decode(out_rev.x), codec.decode(x), reduction="none"))
    if codec is None:
        recon_psnr = recon_psnr_model
    nll_mean = torch.cat(nll).mean().item()
    floor_bpd = float(bits_per_dim(gaussian_noise_floor_nats(fcfg.noise_std)))
    mean_db = (lambda xs: torch.cat(xs).mean().item() if xs else None)
    results: dict[str, Any] = {
        "checkpoint": {"forward": flow_l.uri, "forward_step": flow_l.step,
                       "reverse": rev_l.uri if rev_l else None, "reverse_step": rev_l.step if rev_l else None},
        "num_samples": opts.num_samples,
        "space": "latents" if codec else "pixels",
        "bpd": float(bits_per_dim(nll_mean)),  # of x + sigma * eps, the density the flow was trained on
        "bpd_noise_floor": floor_bpd,  # entropy of the sigma-noise alone: no model of x~ goes below
        "bpd_excess_over_floor": float(bits_per_dim(nll_mean)) - floor_bpd,
        "bpd_dequantized": float(bits_per_dim(torch.cat(nll_deq).mean().item())) if nll_deq else None,
        "nll_nats_per_dim": nll_mean,
        "noise_std": fcfg.noise_std,
        "recon_psnr_db": mean_db(recon_psnr),  # denoising: G(F(x~)) vs the clean x
        "denoise_psnr_db": mean_db(recon_psnr),
        "inversion_psnr_db": mean_db(inv_psnr),  # inversion: G's aligned x^0 vs x~ itself
        "samplers": {},
    }
    if codec is not None:
        results["autoencoder"] = data_cfg.autoencoder or manifest.data.get("autoencoder")
        results["fid_reference"] = ref_cfg.uri
        results["recon_psnr_latent_db"] = mean_db(recon_psnr_model)
    log(f"bpd {results['bpd']:.3f} ({results['bpd_excess_over_floor']:.3f} over the noise floor"
        + (f", dequantised {results['bpd_dequantized']:.3f}" if nll_deq else "") + ")"
        + (" (latent space)" if codec else "")
        + (f" | PSNR: denoising {results['recon_psnr_db']:.2f} dB, inversion {results['inversion_psnr_db']:.2f} dB"
           if rev else ""))

    # FID/KID reference: real pixel images of the eval split (latent runs: at the decoded size), cached
    side = codec.decode(held_x[:1].to(dev)).shape[-1] if codec is not None else fcfg.image_size
    pix = dict(image_size=side, channels=3) if codec is not None else {}
    ref_x, _ = held_out(ref_cfg, opts.num_reference, **pix)
    if opts.num_reference and len(ref_x) < opts.num_reference:
        log(f"note: {ref_cfg.uri} split {ref_cfg.eval_split!r} has {len(ref_x)} images, fewer than "
            f"num_reference={opts.num_reference}: the reference uses all of them")
    dataset = Path(ref_cfg.uri.rstrip("/")).name or "data"

    def cached_features(split: str, x: torch.Tensor):
        """Inception statistics and features of real images, cached by their content: runs that
        read the same images (in any order) from other shard directories share one cache file."""
        tag = content_key(x)
        path = reference_stats_path(f"{dataset}-{tag}", split, len(x), side)
        if not path.is_file():
            log(f"Inception features of {len(x)} real {split} images (cached afterwards: {path})")
        return reference_stats(f"{dataset}-{tag}", split, x, count=len(x), image_size=side,
                               batch_size=opts.batch_size, keep_features=True)

    ref = cached_features(ref_cfg.eval_split, ref_x)
    results["num_reference"] = len(ref_x)

    def scores(feats: np.ndarray) -> dict[str, float]:
        st = FIDStats.from_features(feats)
        kid, kid_se = kid_from_features(feats, ref.features, subsets=opts.kid_subsets)
        return {"fid": frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma, method="eigh"), "kid": kid,
                "kid_se": kid_se}

    # the floor: real training images, as many as the samples, scored the same way
    train_cfg = dataclasses.replace(ref_cfg, eval_split=ref_cfg.split)
    real_x, _ = held_out(train_cfg, opts.num_samples, **pix)
    results["real_vs_real"] = {**scores(cached_features(ref_cfg.split, real_x).features),
                               "num": len(real_x), "split": ref_cfg.split}
    floor = results["real_vs_real"]
    log(f"real vs real ({len(real_x)} {ref_cfg.split} images vs {len(ref_x)} {ref_cfg.eval_split}): "
        f"FID {floor['fid']:.2f} | KID {1e3 * floor['kid']:.2f}e-3 +- {1e3 * floor['kid_se']:.2f}e-3")
    latent_data = dataclasses.asdict(data_cfg) if codec is not None else None  # workers rebuild the codec
    samplers = opts.samplers or (["biflow", "exact"] if rev is not None else ["exact"])
    bad = [x for x in samplers if x not in ("biflow", "biflow-cfg2", "exact") or (x != "exact" and rev is None)]
    if bad:
        raise UserError(f"samplers {bad}: allowed: biflow, biflow-cfg2 (both need a reverse run), exact")
    grid_n, grid_cols = class_grid(opts.grid, fcfg.num_classes)
    for w in opts.guidance:
        for sampler in samplers:
            t0 = time.time()
            annealed = opts.exact_annealed and sampler == "exact"
            if opts.workers > 0:
                feats = sample_features(checkpoint, forward, storage, endpoint, sampler, opts.num_samples, w,
                                        opts.batch_size, opts.workers, log, latent_data, annealed)
                grid = generate(flow, rev, sampler, grid_n, w, grid_n, 0, dev, codec=codec, annealed=annealed)
            else:
                xs = generate(flow, rev, sampler, opts.num_samples, w, opts.batch_size, 0, dev, codec=codec,
                              annealed=annealed, progress=progress)
                feats = inception_features(xs, batch_size=opts.batch_size, device=dev, progress=progress)
                grid = xs[:grid_n]
            entry = {"sampler": sampler, "guidance": w, **scores(feats)}
            grid_path = save_grid(grid, out / f"samples-{sampler}-w{w:g}.png", nrow=grid_cols)
            ms = time_sampler(flow, rev, sampler, w, opts.timing_batch, annealed=annealed)
            entry.update({"annealed_guidance": annealed, "ms_per_image": ms, "timing_batch": opts.timing_batch,
                          "grid": str(grid_path), "seconds": time.time() - t0})
            timing = f"{ms:.2f} ms/img"
            if codec is not None:  # the paper reports both: the generator alone, and with the VAE decode
                entry["ms_per_image_with_decode"] = time_sampler(flow, rev, sampler, w, opts.timing_batch,
                                                                 codec=codec, annealed=annealed)
                timing += f" ({entry['ms_per_image_with_decode']:.2f} with decode)"
            results["samplers"][f"{sampler}@w={w:g}"] = entry
            log(f"{sampler:6s} w={w:g}: FID {entry['fid']:.2f} | KID {1e3 * entry['kid']:.2f}e-3 "
                f"+- {1e3 * entry['kid_se']:.2f}e-3 | {timing} (batch {opts.timing_batch}) | {grid_path}")
        if {"biflow", "exact"} <= set(samplers):
            b, e = results["samplers"][f"biflow@w={w:g}"], results["samplers"][f"exact@w={w:g}"]
            b["speedup_vs_exact"] = e["ms_per_image"] / b["ms_per_image"]
            if codec is not None:
                b["speedup_vs_exact_with_decode"] = e["ms_per_image_with_decode"] / b["ms_per_image_with_decode"]
            b["fid_ratio_vs_exact"] = b["fid"] / max(e["fid"], 1e-9)
            b["kid_ratio_vs_exact"] = b["kid"] / e["kid"] if e["kid"] > 0 else None
    save_grid(ref_x[: opts.grid], out / "data.png", nrow=int(math.sqrt(opts.grid)))
    results["seconds"] = time.time() - t_start
    from biflow.timing import machine_info

    results["machine"] = machine_info()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {out / 'results.json'}")
    return results
