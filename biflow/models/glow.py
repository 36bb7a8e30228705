"""Forward flow F: Glow (Kingma & Dhariwal 2018), a multi-scale stack of steps.

Structure, with L = ``glow.levels`` levels and K = num_blocks / L steps per level:

    level l:  squeeze (C, H, W) -> (4C, H/2, W/2), K steps, then (all but the last
              level) a split that factors half the channels out as final latents
    step:     actnorm -> invertible 1x1 convolution (LU) -> coupling

A step is one block of the protocol. The coupling keeps the first half of the
channels x_a and maps the second with parameters computed from x_a (and the label):

    affine:    z_b = (x_b + t) * s,  s = sigmoid(h + 2)  (openai/glow),  log|det| = sum(log s)
    additive:  z_b = x_b + t,                                            log|det| = 0
    rqs:       z_b = spline(x_b; theta), theta: 3K - 1 numbers per dimension (flow.transform: rqs,
               biflow.models.splines; the Neural Spline Flows coupling)

The factored-out halves are final: they go to z as they are, under the same standard
normal prior as the rest (no learned prior, to keep the flow simple).

States are in the data layout (C, H, W): state k un-squeezes the current tensor and
writes the parts factored out so far back in place (their final z values), so x -> z
is a bijection of data-layout tensors and ``inverse(z)`` returns x. ``masks[k]`` is 1
on the dimensions of state k not yet factored out: a split belongs to the step that
ends its level, so outside ``masks[k]`` state k already equals z, and step k + 1
changes only dimensions inside ``masks[k]``. The last mask covers C*H*W / 2^(L-1).

Actnorm starts from the data: every actnorm has an ``initialized`` buffer (0/1, in
the state dict, so loaded weights stay loaded). :meth:`Glow.data_init` runs one
forward pass that sets each uninitialised actnorm from its input's per-channel
batch statistics, then, under torch.distributed with more than one rank, broadcasts
every actnorm from rank 0 so all ranks start alike. ``forward`` calls it lazily in
training mode; a distributed trainer should call ``data_init`` itself on the first
batch, before wrapping the model in DDP / DeepSpeed (the lazy call would run inside
the wrapped forward). The affine, actnorm and 1x1 math runs in at least fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from biflow.config import FlowConfig, SplineConfig
from biflow.models.flow import FlowOutput, ForwardFlow
from biflow.models.layers import LabelEmbedding, squeeze, unsqueeze  # noqa: F401 (squeeze: tests import it here)
from biflow.models.layers import affine_dtype as _affine_dtype
from biflow.models.splines import num_params, rqs


def _mix(p: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance on stacked (conditional, unconditional) parameters."""
    cond, uncond = p.chunk(2)
    return cond + guidance * (cond - uncond)


def _forget_init(module: "Glow", incompatible_keys: Any) -> None:
    module._init_known = False  # loaded ``initialized`` buffers are read again on the next training step


class ActNorm(nn.Module):
    """Per-channel affine y = (x + bias) * exp(logs), initialised from the first batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor, init: bool = False) -> tuple[Tensor, Tensor]:
        if init and not self.initialized:
            self.initialize(x)
        logdet = x.shape[2] * x.shape[3] * self.logs.to(x.dtype).sum()
        return (x + self.bias.to(x.dtype)) * torch.exp(self.logs.to(x.dtype)), logdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * torch.exp(-self.logs.to(z.dtype)) - self.bias.to(z.dtype)


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution W = P L (U + diag(sign(s) exp(log|s|))), from a random rotation:
    P and sign(s) fixed, L unit lower triangular, U strictly upper, log|s| learned."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = upper.diagonal()
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", s.sign())
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        self.log_s = nn.Parameter(s.abs().log())

    def weight(self, dtype: torch.dtype) -> Tensor:
        eye = torch.eye(self.log_s.numel(), dtype=dtype, device=self.log_s.device)
        lower = self.lower.to(dtype).tril(-1) + eye
        upper = self.upper.to(dtype).triu(1) + torch.diag(self.sign_s.to(dtype) * torch.exp(self.log_s.to(dtype)))
        return self.perm.to(dtype) @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # an invertible map: never in bf16
            z = F.conv2d(x, self.weight(x.dtype)[:, :, None, None])
        logdet = x.shape[2] * x.shape[3] * self.log_s.to(x.dtype).sum()
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight(torch.float64)).to(z.dtype)
        with torch.autocast(z.device.type, enabled=False):
            return F.conv2d(z, w_inv[:, :, None, None])


class Coupling(nn.Module):
    """Coupling: the first half of the channels (and the label) parameterise the second.
    Network: conv3x3 (+ label embedding) -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3."""

    def __init__(self, channels: int, hidden: int, num_classes: int, affine: bool,
                 spline: SplineConfig | None = None):
        super().__init__()
        self.affine, self.num_classes, half = affine, num_classes, channels // 2
        self.spline = spline  # flow.spline with flow.transform: rqs, else None
        per_dim = num_params(spline.bins) if spline is not None else 2 if affine else 1
        self.conv_in = nn.Conv2d(half, hidden, 3, padding=1)
        self.label_embed = LabelEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.conv_mid = nn.Conv2d(hidden, hidden, 1)
        self.conv_out = nn.Conv2d(hidden, per_dim * (channels - half), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # every coupling starts as the identity map
        nn.init.zeros_(self.conv_out.bias)

    def params(self, xa: Tensor, y: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """(shift, log scale) for x_b; the log scale is None for the additive coupling; with a
        spline, (spline parameters, None)."""
        h = self.conv_in(xa.to(self.conv_in.weight.dtype))
        if self.label_embed is not None:
            h = h + self.label_embed(y, xa.shape[0], xa.device)[:, :, None, None].to(h.dtype)
        h = self.conv_out(F.relu(self.conv_mid(F.relu(h)))).to(dtype)
        if self.spline is not None:  # (B, Cb * P, H, W) -> spline parameters (B, Cb, H, W, P)
            b, _, height, width = h.shape
            return h.view(b, -1, num_params(self.spline.bins), height, width).permute(0, 1, 3, 4, 2), None
        if not self.affine:
            return h, None
        shift, raw = h.chunk(2, dim=1)
        return shift, F.logsigmoid(raw + 2.0)

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        xa, xb = x.chunk(2, dim=1)
        shift, log_scale = self.params(xa, y, x.dtype)
        if self.spline is not None:
            zb, ld = rqs(xb, shift, self.spline.bound)
            return torch.cat([xa, zb], dim=1), ld.sum(dim=(1, 2, 3))
        if log_scale is None:
            return torch.cat([xa, xb + shift], dim=1), x.new_zeros(x.shape[0])
        return torch.cat([xa, (xb + shift) * torch.exp(log_scale)], dim=1), log_scale.sum(dim=(1, 2, 3))

    def inverse(self, z: Tensor, y: Tensor | None, guidance: float = 0.0) -> Tensor:
        za, zb = z.chunk(2, dim=1)
        if guidance != 0.0 and self.label_embed is not None and y is not None:
            # classifier-free guidance on the coupling parameters (cond first, uncond second)
            y_all = torch.cat([y, torch.full_like(y, self.num_classes)])
            shift, log_scale = self.params(za.repeat(2, 1, 1, 1), y_all, z.dtype)
            shift, log_scale = _mix(shift, guidance), None if log_scale is None else _mix(log_scale, guidance)
        else:
            shift, log_scale = self.params(za, y, z.dtype)
        if self.spline is not None:
            return torch.cat([za, rqs(zb, shift, self.spline.bound, inverse=True)[0]], dim=1)
        xb = zb if log_scale is None else zb * torch.exp(-log_scale)
        return torch.cat([za, xb - shift], dim=1)


class GlowStep(nn.Module):
    """One step (one protocol block): actnorm -> invertible 1x1 conv -> coupling."""

    def __init__(self, channels: int, cfg: FlowConfig):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = Coupling(channels, cfg.glow.hidden, cfg.num_classes, cfg.glow.coupling == "affine",
                                 cfg.spline if cfg.transform == "rqs" else None)

    def forward(self, x: Tensor, y: Tensor | None, init: bool = False) -> tuple[Tensor, Tensor]:
        x, ld_norm = self.actnorm(x, init)
        x, ld_conv = self.invconv(x)
        x, ld_coupling = self.coupling(x, y)
        return x, ld_norm + ld_conv + ld_coupling

    def inverse(self, z: Tensor, y: Tensor | None, guidance: float = 0.0) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(z, y, guidance)))


class Glow(ForwardFlow):
    """Multi-scale Glow over image (or latent) tensors (B, C, H, W); see the module docstring."""

    family = "glow"

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        self.levels = cfg.glow.levels
        self.steps_per_level = cfg.num_blocks // self.levels
        # level l works on C * 2^(l+2) channels: squeezes quadruple, splits halve
        self.blocks = nn.ModuleList(GlowStep(cfg.channels * 2 ** (level + 2), cfg)
                                    for level in range(self.levels) for _ in range(self.steps_per_level))
        self._init_known = False  # all actnorms known to be initialised (saves a host sync per step)
        self.register_load_state_dict_post_hook(_forget_init)

    def level_steps(self, level: int) -> list[GlowStep]:
        k = self.steps_per_level
        return list(self.blocks[level * k : (level + 1) * k])

    def actnorms(self) -> list[ActNorm]:
        return [step.actnorm for step in self.blocks]

    @staticmethod
    def _assemble(t: Tensor, factored: list[Tensor]) -> Tensor:
        """Data layout of the input ``t`` of level len(factored) with the parts factored out before it."""
        for part in reversed(factored):
            t = unsqueeze(torch.cat([t, part], dim=1))
        return t

    @staticmethod
    def _factor(z: Tensor, splits: int) -> tuple[Tensor, list[Tensor]]:
        """Inverse of :meth:`_assemble`: the input of level ``splits`` and the parts factored out before it."""
        parts = []
        for _ in range(splits):
            z, part = squeeze(z).chunk(2, dim=1)
            parts.append(part)
        return z, parts

    def state_masks(self, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """masks[k] (C, H, W): 1 on the dimensions of state k not yet factored out."""
        c = self.config
        ones = torch.ones(1, c.channels, c.image_size, c.image_size, device=device, dtype=dtype)
        by_splits = []
        for splits in range(self.levels):
            t, parts = self._factor(ones, splits)
            by_splits.append(self._assemble(t, [torch.zeros_like(p) for p in parts])[0])
        k = self.steps_per_level
        return [by_splits[0]] + [by_splits[min((i + 1) // k, self.levels - 1)] for i in range(self.num_blocks)]

    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """States, z and logdet in the affine dtype (fp32 for bf16/fp16 inputs, fp64 for fp64)."""
        self._check(x)
        if self.training and not self._initialized():
            self.data_init(x, y)
        return self._run(x, y)

    def _run(self, x: Tensor, y: Tensor | None, init: bool = False) -> FlowOutput:
        dtype = _affine_dtype(x.dtype)
        x = x.to(dtype)
        states, block_logdets, factored = [x], [], []
        logdet = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        h = squeeze(x)
        for level in range(self.levels):
            steps = self.level_steps(level)
            for i, step in enumerate(steps):
                h, ld = step(h, y, init)
                logdet = logdet + ld
                block_logdets.append(ld)
                if i == len(steps) - 1 and level < self.levels - 1:  # split: half the channels are final
                    t, part = h.chunk(2, dim=1)
                    factored.append(part)
                    states.append(self._assemble(t, factored))
                    h = squeeze(t)
                else:
                    states.append(self._assemble(unsqueeze(h), factored))
        return FlowOutput(z=states[-1], logdet=logdet, states=states, block_logdets=block_logdets,
                          masks=self.state_masks(x.device, dtype))

    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, annealed: bool = False,
                **options: Any) -> Tensor:
        """Exact inverse F^-1(z), steps in reverse order. With ``guidance`` (and a label) every
        coupling mixes its conditional and null-label parameters, p_c + w (p_c - p_u).
        ``annealed`` and other options (``use_cache``) have no meaning here and are ignored."""
        self._check(z)
        self.inverse_stats = {}  # closed form: nothing to report
        t, parts = self._factor(z.to(_affine_dtype(z.dtype)), self.levels - 1)
        for level in reversed(range(self.levels)):
            h = squeeze(t) if level == self.levels - 1 else torch.cat([t, parts[level]], dim=1)
            for step in reversed(self.level_steps(level)):
                h = step.inverse(h, y, guidance)
            t = unsqueeze(h)
        return t.to(z.dtype)

    def _initialized(self) -> bool:
        if not self._init_known:  # one host sync, then none until the next load_state_dict
            self._init_known = bool(torch.stack([a.initialized for a in self.actnorms()]).all())
        return self._init_known

    @torch.no_grad()
    def data_init(self, x: Tensor, y: Tensor | None = None) -> None:
        """Initialise every uninitialised actnorm from this batch (one forward pass); under
        torch.distributed with world size > 1, then copy every actnorm from rank 0 (a collective:
        every rank calls it, with its own batch)."""
        self._check(x)
        self._run(x, y, init=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for norm in self.actnorms():
                for t in (norm.bias, norm.logs, norm.initialized):
                    dist.broadcast(t.data, src=0)
        self._init_known = True
