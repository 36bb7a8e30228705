"""Training objectives.

Stage 1 (forward flow): negative log-likelihood of noise-augmented data.
Stage 2 (reverse model): hidden alignment to the frozen flow's trajectory,
learned denoising, perceptual distance, each adaptively weighted, with
training-time classifier-free guidance.

Both entry points take a batch and return ``(loss, metrics)``: the loss is a
scalar tensor to backpropagate, the metrics are plain floats for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from biflow.config import FlowConfig, ReverseConfig
from biflow.models.tarflow import LOG_2PI, FlowOutput, log_likelihood  # noqa: F401 (LOG_2PI re-exported)


# ---------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------


def nll_per_dim(out: FlowOutput) -> Tensor:
    """Negative log-likelihood in nats per dimension, (B,), Gaussian constant included."""
    return -log_likelihood(out) / out.z[0].numel()


def bits_per_dim(nll_nats_per_dim: Tensor | float) -> Tensor | float:
    """Bits per dimension of 8-bit data scaled to [-1, 1] (256 bins of width
    2/256), the figure papers report."""
    from biflow.metrics import bits_per_dim as to_bits

    return to_bits(nll_nats_per_dim, num_bins=256, data_range=2.0)


def drop_labels(y: Tensor | None, p: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor | None:
    """Replace labels by the null class ``num_classes`` with probability p."""
    if y is None or num_classes == 0:
        return None
    if p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def forward_loss(flow, x: Tensor, y: Tensor | None, cfg: FlowConfig,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-1 objective: NLL per dim of x + sigma * eps, with label drop. The metrics are
    detached 0-dim tensors (read them with ``float``: each read is a host sync)."""
    x_noisy = x + cfg.noise_std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    y_in = drop_labels(y, cfg.label_drop, cfg.num_classes, generator)
    out = flow(x_noisy, y_in)
    nll = nll_per_dim(out)
    loss = nll.mean()
    with torch.no_grad():  # 0-dim tensors: no host sync here (the loop reads them on log steps)
        nll_mean = loss.detach()
        metrics = {
            "loss": nll_mean,
            "nll": nll_mean,
            "bpd": bits_per_dim(nll_mean),
            "logdet_per_dim": out.logdet.detach().mean() / x[0].numel(),
            "z_rms": out.z.detach().float().pow(2).mean().sqrt(),
        }
    return loss, metrics


# ---------------------------------------------------------------------------
# Reverse-model terms
# ---------------------------------------------------------------------------


def adaptive_weight(per_sample: Tensor, p: float, eps: float) -> Tensor:
    """loss * sg((loss + eps)^-p): every sample's term has gradient scale ~1."""
    if p == 0:
        return per_sample
    return per_sample * (per_sample.detach() + eps).pow(-p)


def rms(x: Tensor, eps: float) -> Tensor:
    """Per-sample root mean square, shaped to broadcast against x."""
    return x.pow(2).flatten(1).mean(1).add(eps).sqrt().reshape(-1, *([1] * (x.dim() - 1)))


def alignment_distance(pred: Tensor, target: Tensor, norm_control: bool, eps: float = 1e-6,
                       mask: Tensor | None = None) -> Tensor:
    """Per-sample MSE between a projected hidden state and its forward-trajectory target.

    With norm control both sides are divided by their own per-sample RMS first (the
    prediction's RMS keeps its gradient), so the term compares directions and every
    depth counts alike, whatever the scale of its state. Dividing the error by a
    stop-gradient constant instead would be undone by the adaptive weight (p = 1): only
    normalising the prediction itself changes the gradient.

    ``mask`` (C, H, W), from a multi-scale flow: only the dimensions the state still
    transforms count (the factored-out ones already hold their final z values).
    """
    pred, target = pred.float(), target.detach().float()
    if mask is not None:
        keep = mask.to(pred.device).bool()
        pred, target = pred[:, keep], target[:, keep]
    if norm_control:
        pred, target = pred / rms(pred, eps), target / rms(target, eps)
    return (pred - target).pow(2).flatten(1).mean(1)


def cfg_combine(guided: Tensor, uncond: Tensor, w: Tensor) -> Tensor:
    """Recover the conditional state from the guided and unconditional ones:
    h = (G(h|c, w) + w * G(h|null)) / (1 + w). With w = 0 it is G(h|c, 0)."""
    w = w.reshape(-1, *([1] * (guided.dim() - 1))).to(guided.dtype)
    return (guided + w * uncond) / (1 + w)


def guidance_ceiling(rcfg: ReverseConfig, step: int | None) -> float:
    """w_max at a training step: ramped linearly from 0 over ``guidance_warmup_steps``
    (the warm start), then ``guidance_max``. ``step=None`` means after the warm start."""
    if rcfg.guidance_warmup_steps <= 0 or step is None:
        return rcfg.guidance_max
    return rcfg.guidance_max * min(1.0, step / rcfg.guidance_warmup_steps)


def sample_guidance(y: Tensor | None, w_max: float, num_classes: int, batch: int, device: torch.device,
                    generator: torch.Generator | None = None, p_zero: float = 0.0, shape: float = 1.0) -> Tensor:
    """Training guidance per row: 0 for null-class (unconditional) rows; for conditional rows
    0 with probability ``p_zero``, else ``w_max * u ** shape`` with u ~ U[0, 1] (shape 1 is
    uniform on [0, w_max]; shape > 1 puts more mass near 0).

    The rows that may be guided are the first :func:`guided_rows` of the batch (rows come in
    random order, so this is a random subset of size round(batch * (1 - p_zero))): the
    unconditional stream then runs on a slice whose size the host knows, with no
    variable-size ``nonzero`` (a host sync) per step."""
    k = guided_rows(batch, w_max, p_zero, y)
    if k == 0:
        return torch.zeros(batch, device=device)
    u = torch.rand(batch, device=device, generator=generator)
    w = w_max * u.pow(shape)
    w[k:] = 0.0
    return torch.where(y == num_classes, torch.zeros_like(w), w)


def guided_rows(batch: int, w_max: float, p_zero: float, y: Tensor | None) -> int:
    """How many leading rows of a batch :func:`sample_guidance` may guide."""
    if w_max <= 0 or y is None:
        return 0
    return min(batch, round(batch * (1.0 - p_zero)))


@dataclass
class TrainingPair:
    """One batch of stage-2 training data: clean x, the flow's noisy input x~ = x + sigma*eps,
    the (label-dropped) labels it saw, and its trajectory x~ = x^0 -> ... -> x^B = z."""

    x: Tensor
    x_noisy: Tensor
    y: Tensor | None
    states: list[Tensor]
    masks: list[Tensor | None] | None = None  # multi-scale flows: per state, the dims still active

    def mask(self, k: int) -> Tensor | None:
        return self.masks[k] if self.masks else None

    def target(self, rcfg: ReverseConfig) -> Tensor:
        """What G's output is supervised with: the clean x (learned denoising), or x~ itself
        (``reverse.denoise: tweedie``: G inverts F exactly and F's Tweedie step denoises)."""
        return self.x_noisy if rcfg.denoise == "tweedie" else self.x


def make_pairs(flow, x: Tensor, y: Tensor | None, fcfg: FlowConfig,
               generator: torch.Generator | None = None) -> TrainingPair:
    """Noise, label drop and the frozen flow's trajectory. The flow always runs in fp32, outside
    any autocast: its trajectory is the target, and bf16 rounding would move it."""
    x_noisy = x + fcfg.noise_std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    y_in = drop_labels(y, fcfg.label_drop, fcfg.num_classes, generator)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        traj = flow.trajectory(x_noisy.float(), y_in) if hasattr(flow, "trajectory") else flow(x_noisy.float(), y_in)
    return TrainingPair(x=x, x_noisy=x_noisy, y=y_in, states=[s.detach() for s in traj.states],
                        masks=getattr(traj, "masks", None))


def reverse_loss(rev, flow, x: Tensor, y: Tensor | None, rcfg: ReverseConfig, fcfg: FlowConfig,
                 feature_net: Callable | None = None,
                 generator: torch.Generator | None = None,
                 decode: Callable[..., Tensor] | None = None,
                 step: int | None = None,
                 progress: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-2 objective for the reverse model G given a frozen forward flow F.

    Pairs are made on the fly (:func:`make_pairs`): x_noisy = x + sigma * eps, and F's
    trajectory x_noisy = x^0 -> ... -> x^B = z. G(z | c, w) must reproduce each x^k at
    its aligned depth and the clean x at the output (:func:`reverse_objective`).
    """
    pair = make_pairs(flow, x, y, fcfg, generator)
    return reverse_objective(rev, pair, rcfg, fcfg, feature_net=feature_net, generator=generator,
                             decode=decode, step=step, progress=progress)


def reverse_objective(rev, pair: TrainingPair, rcfg: ReverseConfig, fcfg: FlowConfig,
                      feature_net: Callable | None = None,
                      generator: torch.Generator | None = None,
                      decode: Callable[..., Tensor] | None = None,
                      step: int | None = None,
                      progress: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The stage-2 loss of G on a batch of pairs (made on the fly, or cached by the bench).

    ``decode`` (latent data: :meth:`biflow.data.latents.LatentCodec.decode`) maps
    latents to images for the perceptual term, with gradients through the frozen
    decoder.

    Training-time guidance draws w per row (:func:`sample_guidance`; ``step`` drives
    the warm start) and runs the unconditional stream only on rows with w > 0: for the
    others the CFG combination is the guided output itself.

    ``progress`` (the stage's progress in [0, 1]; None = done) drives the curriculum: the
    guidance and the perceptual term are off before ``guidance_start`` / ``perceptual_start``.
    """
    x, y_in, states = pair.x, pair.y, pair.states
    b = x.shape[0]
    z = states[-1]
    w_max = guidance_ceiling(rcfg, step)
    if progress is not None and progress < rcfg.guidance_start:
        w_max = 0.0
    w = sample_guidance(y_in, w_max, fcfg.num_classes, b, x.device, generator,
                        p_zero=rcfg.guidance_p_zero, shape=rcfg.guidance_shape)
    out = rev(z, y_in, guidance=w)
    preds, x_hat = out.states, out.x

    k = guided_rows(b, w_max, rcfg.guidance_p_zero, y_in)  # rows k.. have w = 0: CFG leaves them as they are
    if k:
        null = torch.full_like(y_in[:k], fcfg.num_classes)
        with torch.set_grad_enabled(rcfg.guidance_grad_uncond and torch.is_grad_enabled()):
            unc = rev(z[:k], null, guidance=torch.zeros_like(w[:k]))

        def combine(full: Tensor, part: Tensor) -> Tensor:  # CFG on the first k rows (w = 0: unchanged)
            return torch.cat([cfg_combine(full[:k], part, w[:k]), full[k:]])

        if rcfg.guidance_mix == "all":
            preds = [combine(p, u) for p, u in zip(preds, unc.states)]
        x_hat = combine(x_hat, unc.x)

    p, eps = rcfg.adaptive_p, rcfg.adaptive_eps
    align_terms = [alignment_distance(pred, states[k], rcfg.norm_control, mask=pair.mask(k))
                   for k, pred in enumerate(preds)]
    align = torch.stack([adaptive_weight(t, p, eps) for t in align_terms])
    align = align.sum(0) if rcfg.align_reduce == "sum" else align.mean(0)
    target = pair.target(rcfg)
    mse = (x_hat.float() - target.float()).pow(2).flatten(1).mean(1)
    total = rcfg.align_weight * align + rcfg.denoise_weight * adaptive_weight(mse, p, rcfg.output_eps)
    perc = None
    perceptual_on = progress is None or progress >= rcfg.perceptual_start
    if feature_net is not None and rcfg.perceptual_weight > 0 and perceptual_on:
        from biflow.perceptual import perceptual_distance

        k = max(1, math.ceil(rcfg.perceptual.rows * b))  # rows are in random order: the first k are a subset
        img_hat, img = x_hat[:k], target[:k]
        if decode is not None:
            img_hat = decode(img_hat, grad=True, clamp=False)
            img = decode(img, grad=False)
        perc = perceptual_distance(feature_net, img_hat, img, crop=rcfg.perceptual.crop, generator=generator)
        term = rcfg.perceptual_weight * adaptive_weight(perc, p, rcfg.output_eps)
        total = total + torch.cat([term, term.new_zeros(b - k)]) * (b / k)  # unbiased for the batch mean
    loss = total.mean()
    from biflow.metrics import psnr

    with torch.no_grad():  # 0-dim tensors: no host sync here (the loop reads them on log steps)
        metrics = {
            "loss": loss.detach(),
            "align": torch.stack(align_terms).mean(),
            "align_first": align_terms[-1].mean(),  # the deepest state x^(B-1)
            "align_last": align_terms[0].mean(),  # x^0, the noisy image
            "denoise_mse": mse.detach().mean(),
            "psnr": psnr(x_hat.detach(), target),
            "guided_rows": (w > 0).float().mean(),
        }
        if perc is not None:
            metrics["perceptual"] = perc.detach().mean()
    return loss, metrics
