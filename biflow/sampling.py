"""Sampling: BiFlow 1-NFE, the exact inverse of the forward flow (+ Tweedie), inpainting,
and :func:`generate`, the batched, seeded sampler every command and export uses.

The EMA of weights used for sampling is :class:`biflow.ema.EMA`.

The exact inverse is the baseline users would otherwise run, so it is a fair
one: batched, KV-cached, conditional and unconditional streams batched
together under guidance, and no work beyond one Tweedie gradient.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn


def _prior(shape: tuple[int, ...], device, dtype, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def _draw_latents(model: nn.Module, cfg, y: Tensor | None, num: int | None, z: Tensor | None,
                  generator: torch.Generator | None) -> Tensor:
    """z as given, else N(0, I) noise for len(y) (or num) images, on the model's device and dtype."""
    if z is not None:
        return z
    batch = y.shape[0] if y is not None else num
    if batch is None:
        raise ValueError("sampling needs labels y, a count num, or latents z")
    p = next(model.parameters())
    return _prior((batch, cfg.channels, cfg.image_size, cfg.image_size), p.device, p.dtype, generator)


@torch.no_grad()
def sample_biflow(rev: nn.Module, y: Tensor | None, guidance: float = 0.0, num: int | None = None,
                  z: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One network evaluation: z ~ N(0, I), x = G(z | y, w)."""
    z = _draw_latents(rev, rev.flow_config, y, num, z, generator)
    return rev(z, y, guidance=guidance).x


@torch.no_grad()
def sample_biflow_cfg(rev: nn.Module, y: Tensor, guidance: float, num: int | None = None, z: Tensor | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """Inference-time CFG, 2 NFE (the ablation of training-time CFG): the conditional and the
    null-label outputs at w = 0, mixed as x_c + w (x_c - x_null)."""
    z = _draw_latents(rev, rev.flow_config, y, num, z, generator)
    w0 = torch.zeros(z.shape[0], device=z.device)
    cond = rev(z, y, guidance=w0).x
    if guidance == 0 or y is None:
        return cond
    uncond = rev(z, torch.full_like(y, rev.flow_config.num_classes), guidance=w0).x
    return cond + guidance * (cond - uncond)


def tweedie_denoise(flow: nn.Module, x_noisy: Tensor, y: Tensor | None, sigma: float) -> Tensor:
    """x <- x~ + sigma^2 * grad log p(x~): one forward and one backward pass."""
    if sigma == 0:
        return x_noisy
    with torch.enable_grad():
        x = x_noisy.detach().requires_grad_(True)
        logp = flow.log_prob(x, y)
        (score,) = torch.autograd.grad(logp.sum(), x)
    return (x_noisy + sigma**2 * score).detach()


def _bad_rows(x: Tensor) -> Tensor:
    return (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten()


@torch.no_grad()
def sample_exact(flow: nn.Module, y: Tensor | None, guidance: float = 0.0, tweedie: bool = True,
                 num: int | None = None, z: Tensor | None = None, noise_std: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 annealed: bool = False, resample_tries: int = 3) -> Tensor:
    """The exact inverse F^-1(z) (N-1 sequential steps per block), then Tweedie.

    As in ml-tarflow's sampler, rows that come out non-finite (a guided decode can
    overflow) are drawn again from fresh noise, up to ``resample_tries`` times; rows
    still non-finite after that are left as they are, for the caller to see."""
    z = _draw_latents(flow, flow.config, y, num, z, generator)

    def run(z_: Tensor, y_: Tensor | None) -> Tensor:
        x_ = flow.inverse(z_, y_, guidance=guidance, use_cache=use_cache, annealed=annealed)
        if tweedie:
            x_ = tweedie_denoise(flow, x_, y_, flow.config.noise_std if noise_std is None else noise_std)
        return x_

    x = run(z, y)
    for _ in range(resample_tries):
        bad = _bad_rows(x)
        if not bad.numel():
            break
        z_new = _prior((bad.numel(), *z.shape[1:]), z.device, z.dtype, generator)
        x[bad] = run(z_new, None if y is None else y[bad])
    return x


@torch.no_grad()
def inpaint(flow: nn.Module, rev: nn.Module, x: Tensor, mask: Tensor, y: Tensor | None, guidance: float = 0.0,
            generator: torch.Generator | None = None) -> Tensor:
    """Keep z of the known region (mask = 1), resample the rest, decode with G once.

    The known pixels are pasted back into the result.
    """
    mask = mask.to(x.dtype).expand_as(x)
    z_known = flow(x, y).z
    z = mask * z_known + (1 - mask) * _prior(x.shape, x.device, x.dtype, generator)
    x_hat = rev(z, y, guidance=guidance).x
    return mask * x + (1 - mask) * x_hat


@torch.no_grad()
def inpaint_images(flow: nn.Module, rev: nn.Module, images: Tensor, mask: Tensor, y: Tensor | None,
                   codec=None, guidance: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """:func:`inpaint` for images, in pixel or latent space.

    ``images`` (B, C, H, W) in [-1, 1], ``mask`` (B or 1, 1, H, W) with 1 = known pixel.
    With a latent ``codec`` (:class:`biflow.data.latents.LatentCodec`) the images are
    encoded, a latent cell counts as known only where every pixel it covers is known,
    G fills the rest in latent space, the result is decoded and the known pixels are
    pasted back."""
    if codec is None:
        return inpaint(flow, rev, images, mask, y, guidance, generator)
    z = codec.encode(images)
    factor = images.shape[-1] // z.shape[-1]
    known = 1 - torch.nn.functional.max_pool2d(1 - mask.to(z.dtype), factor)  # all pixels of the cell known
    latent = inpaint(flow, rev, z, known, y, guidance, generator)
    out = codec.decode(latent).to(images.dtype)
    m = mask.to(images.dtype).expand_as(images)
    return m * images + (1 - m) * out


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    return torch.arange(seed, seed + n) % num_classes


def generate(flow, rev, sampler: str, n: int, guidance: float, batch_size: int, seed: int,
             device: str | torch.device = "cpu", codec=None, annealed: bool = False,
             progress: bool = False, labels: torch.Tensor | None = None, flow_config=None) -> torch.Tensor:
    """n samples from ``sampler`` ('biflow' or 'exact'), deterministic in seed: images in
    [-1, 1], latents decoded through ``codec`` (a :class:`~biflow.data.latents.LatentCodec`)
    when given, else the model's own space (latents stay unclamped). ``annealed``: the
    exact sampler's guidance ramps over the decode steps (ml-tarflow's option). ``labels``:
    one class per sample (default: seed, seed + 1, ... modulo the classes). ``flow`` may be
    None for the 1-NFE sampler without a Tweedie step, given ``flow_config``."""
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
