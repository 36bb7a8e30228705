"""Forward flow F: a residual flow (Chen et al. 2019; invertible ResNets, Behrmann et al. 2019).

``squeeze`` squeezes (space-to-depth 2x2, a permutation: log-det 0) then B residual blocks

    x^{b+1} = x^b + g_b(x^b),   g = SNConv3x3 -> LipSwish -> SNConv1x1 -> LipSwish -> SNConv3x3

Every convolution is spectrally normalised to an operator norm <= ``coeff`` on the actual
input shape (power iteration on the convolution operator, persistent u/v buffers,
``n_power_iter`` iterations per training forward, none in eval mode); LipSwish
x * sigmoid(beta x) / 1.1 is 1-Lipschitz, so Lip(g) <= coeff^3 < 1 and each block is
invertible. A label embedding is added after the first convolution: constant in x, it leaves
Lip(g) alone. States are unsqueezed back to the data layout; every dimension stays active.

Log-det (unbiased): log det(I + J) = sum_{k>=1} (-1)^{k+1} tr(J^k) / k, each trace by
Hutchinson's v^T J^k v (v ~ N(0, I), one per sample, vector-Jacobian products, differentiable
in training), the first ``exact_terms`` terms always, then Russian roulette: one more term,
then after each further term stop with probability ``roulette_p``; term k beyond the exact ones
is divided by P(N >= k). The series is cut at ``MAX_TERMS`` terms as a safety valve (a bias of
P(N >= MAX_TERMS) = (1 - p)^{MAX_TERMS - exact_terms - 1}, 7e-12 at the defaults). The draws
come from ``set_generator``'s generator (the trainer seeds it per run and rank; it must live on
the input's device), else the global RNG. The log-det is a random variable: NLLs are estimates.

Inverse: per block, in reverse order, the fixed point x = z_b - g(x) from x_0 = z_b (a
contraction); ``inverse_stats`` records iterations, residuals and convergence per block.
``after_load()`` re-runs the power iterations to convergence, so the u/v buffers match
loaded (EMA) weights; ``lipschitz()`` re-estimates each Lip(g) from scratch. The branch runs
with autocast off, in at least fp32: the fixed point and the series need the precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biflow.config import FlowConfig
from biflow.models.flow import FlowOutput, ForwardFlow
from biflow.models.layers import LabelEmbedding
from biflow.models.layers import affine_dtype as _dtype, squeeze, unsqueeze

MAX_TERMS = 40  # safety cap on the series (see the module docstring)
# power iterations at construction, in after_load() and lipschitz(): at most REFRESH_ITERS, in fp64,
# until sigma moves by less than REFRESH_TOL (relative); from a random start, convolution operators
# with clustered top singular values took 60-250 iterations to reach 1e-5
REFRESH_ITERS, REFRESH_TOL = 1000, 1e-9


def _unit(t: Tensor) -> Tensor:
    return t / t.norm().clamp_min(1e-12)


class SNConv2d(nn.Module):
    """A stride-1, same-padding convolution whose operator norm on (cin, size, size) inputs is
    capped at ``coeff``: W / max(1, sigma / coeff), sigma = u^T conv(v; W) from the buffers."""

    def __init__(self, cin: int, cout: int, kernel: int, size: int, coeff: float, n_iter: int):
        super().__init__()
        self.coeff, self.n_iter, self.pad = coeff, n_iter, kernel // 2
        conv = nn.Conv2d(cin, cout, kernel, padding=self.pad)  # PyTorch's default init
        self.weight, self.bias = nn.Parameter(conv.weight.detach()), nn.Parameter(conv.bias.detach())
        self.register_buffer("u", _unit(torch.randn(1, cout, size, size)))
        self.register_buffer("v", _unit(torch.randn(1, cin, size, size)))

    def _op(self, v: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(v, w, padding=self.pad)

    def _op_t(self, u: Tensor, w: Tensor) -> Tensor:
        return F.conv_transpose2d(u, w, padding=self.pad)

    @torch.no_grad()
    def power_iterate(self, iters: int, tol: float = 0.0) -> None:
        """Update u, v; with ``tol`` (a refresh) in fp64, stopping once sigma moves by less than
        tol (relative): in fp32 the rounding of sigma alone is ~1e-7, which would stop it early."""
        dtype = torch.float64 if tol > 0 else self.weight.dtype
        u, v, w, prev = self.u.to(dtype), self.v.to(dtype), self.weight.to(dtype), None
        for _ in range(iters):
            v = _unit(self._op_t(u, w))
            u = _unit(self._op(v, w))
            if tol > 0:
                sigma = float((u * self._op(v, w)).sum())
                if prev is not None and abs(sigma - prev) <= tol * abs(sigma):
                    break
                prev = sigma
        self.u.copy_(u)
        self.v.copy_(v)

    def normalized(self, update: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(weight, bias) as used by the branch, in ``dtype``; ``update`` runs n_iter iterations."""
        if update:
            self.power_iterate(self.n_iter)
        w = self.weight
        sigma = (self.u.clone() * self._op(self.v.clone(), w)).sum()  # clones: later updates can't break backward
        w = w / torch.clamp(sigma / self.coeff, min=1.0)
        return w.to(dtype), self.bias.to(dtype)

    @torch.no_grad()
    def operator_norm(self, iters: int = REFRESH_ITERS, tol: float = REFRESH_TOL) -> float:
        """||conv(.; W_used)||_2 by a fresh fp64 power iteration (fixed seed), not from the buffers."""
        w = self.normalized(False, torch.float64)[0]
        g = torch.Generator().manual_seed(0)
        v = _unit(torch.randn(self.v.shape, generator=g, dtype=w.dtype).to(w.device))
        sigma = 0.0
        for _ in range(iters):
            u = self._op(v, w)
            new = float(u.norm())
            v = _unit(self._op_t(u, w))
            if abs(new - sigma) <= tol * new:
                break
            sigma = new
        return new


class LipSwish(nn.Module):
    """x * sigmoid(beta x) / 1.1, beta = softplus(.) > 0: 1-Lipschitz for every beta."""

    def __init__(self):
        super().__init__()
        self.raw_beta = nn.Parameter(torch.full((1,), 0.5))  # (1,), not 0-dim: ZeRO cannot flatten scalars

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x * F.softplus(self.raw_beta).to(x.dtype)) / 1.1


class ResidualBlock(nn.Module):
    """x -> x + g(x) with Lip(g) <= coeff^3, optionally label-conditioned."""

    def __init__(self, cfg: FlowConfig, channels: int, size: int):
        super().__init__()
        rc = cfg.resflow
        self.convs = nn.ModuleList([SNConv2d(channels, rc.hidden, 3, size, rc.coeff, rc.n_power_iter),
                                    SNConv2d(rc.hidden, rc.hidden, 1, size, rc.coeff, rc.n_power_iter),
                                    SNConv2d(rc.hidden, channels, 3, size, rc.coeff, rc.n_power_iter)])
        self.acts = nn.ModuleList([LipSwish(), LipSwish()])
        self.label_embed = LabelEmbedding(cfg.num_classes, rc.hidden) if cfg.num_classes > 0 else None

    def branch(self, y: Tensor | None, batch: int, dtype: torch.dtype, update: bool = False):
        """g as a function of x, with the normalised weights fixed once (one power-iteration
        update at most per call) and the label embedding computed once."""
        params = [conv.normalized(update, dtype) for conv in self.convs]
        cond = None
        if self.label_embed is not None:
            cond = self.label_embed(y, batch, params[0][0].device).to(dtype)[:, :, None, None]

        def g(x: Tensor) -> Tensor:
            for i, (conv, (w, b)) in enumerate(zip(self.convs, params)):
                x = F.conv2d(x, w, b, padding=conv.pad)
                if i == 0 and cond is not None:
                    x = x + cond
                if i < 2:
                    x = self.acts[i](x)
            return x

        return g

    def lipschitz(self) -> float:
        return math.prod(conv.operator_norm() for conv in self.convs)  # x 1 for each LipSwish


class ResidualFlow(ForwardFlow):
    """Residual flow over image (or latent) tensors (B, C, H, W); see the module docstring."""

    family = "resflow"

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        rc = cfg.resflow
        channels, size = cfg.channels * 4 ** rc.squeeze, cfg.image_size // 2 ** rc.squeeze
        self.blocks = nn.ModuleList(ResidualBlock(cfg, channels, size) for _ in range(cfg.num_blocks))
        self.generator: torch.Generator | None = None
        self.after_load(100, 1e-6)  # buffers near convergence from the start: the init is invertible

    def set_generator(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def _in(self, x: Tensor) -> Tensor:
        for _ in range(self.config.resflow.squeeze):
            x = squeeze(x)
        return x

    def _out(self, h: Tensor) -> Tensor:
        for _ in range(self.config.resflow.squeeze):
            h = unsqueeze(h)
        return h

    def _num_terms(self) -> list[int]:
        """Series length per block: exact_terms + N, N >= 1 geometric (P(N >= j) = (1-p)^{j-1})."""
        rc, gen = self.config.resflow, self.generator
        u = torch.rand(self.num_blocks, dtype=torch.float64, generator=gen,
                       device=gen.device if gen is not None else "cpu").tolist()  # one host sync per forward
        extra = [1 + int(math.floor(math.log(max(x, 1e-300)) / math.log1p(-rc.roulette_p))) for x in u]
        return [min(rc.exact_terms + n, MAX_TERMS) for n in extra]

    def _logdet(self, gx: Tensor, x: Tensor, terms: int, create_graph: bool) -> Tensor:
        """The series estimate of log det(I + J_g(x)) per sample. With ``create_graph`` it is
        differentiable: by backprop through every term or, in training with ``gradient:
        neumann``, by Chen et al. (2019)'s Neumann series: d log det(I + J) = tr((I + J)^-1 dJ)
        = sum_{j>=0} (-1)^j tr(J^j dJ), estimated by v^T N dJ v with N = sum_j (-1)^j w_{j+1} J^j
        (the same draws and weights w_k, ``_weight``, as the value's series). Then the series'
        vector-Jacobian products run without a graph and one differentiable product v^T N J v
        carries the gradient: one double-backward per block instead of one per term. The value
        is the same either way; only the gradient's (unbiased) estimator differs."""
        neumann = create_graph and self.training and self.config.resflow.gradient == "neumann"
        v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=self.generator)
        w, series = v, v.clone()
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(1, terms + 1):  # w = v^T J^k
            (w,) = torch.autograd.grad(gx, x, w, create_graph=create_graph and not neumann, retain_graph=True)
            total = total + (-1) ** (k + 1) / k * self._weight(k) * (w * v).flatten(1).sum(1)
            if neumann and k < terms:
                series = series + (-1) ** k * self._weight(k + 1) * w
        if not neumann:
            return total
        (vjp,) = torch.autograd.grad(gx, x, series, create_graph=True, retain_graph=True)
        surrogate = (vjp * v).flatten(1).sum(1)  # its gradient is the estimator's; its value is not the log-det
        return total.detach() + surrogate - surrogate.detach()

    def _weight(self, k: int) -> float:
        """1 / P(term k is drawn): 1 for the exact terms, (1 - p)^-(k - exact_terms - 1) beyond."""
        rc = self.config.resflow
        return 1.0 if k <= rc.exact_terms else (1 - rc.roulette_p) ** -(k - rc.exact_terms - 1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """States, z and the log-det estimate in at least fp32. The log-det is differentiable
        (``create_graph``) in training, or when x requires grad (Tweedie's score), with grad on."""
        self._check(x)
        outer = torch.is_grad_enabled()
        create_graph = outer and (self.training or x.requires_grad)
        dtype = _dtype(x.dtype)
        states, block_logdets = [x.to(dtype)], []
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            h = self._in(states[0])
            if not h.requires_grad:
                h = h.detach().requires_grad_(True)
            for block, terms in zip(self.blocks, self._num_terms()):
                gx = block.branch(y, x.shape[0], dtype, update=self.training and outer)(h)
                ld = self._logdet(gx, h, terms, create_graph)
                h = h + gx
                if not outer:
                    h, ld = h.detach().requires_grad_(True), ld.detach()
                block_logdets.append(ld)
                states.append(self._out(h if outer else h.detach()))
        logdet = torch.stack(block_logdets).sum(0)
        return FlowOutput(z=states[-1], logdet=logdet, states=states, block_logdets=block_logdets)

    @torch.no_grad()
    def trajectory(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """The states alone, for the reverse stage's targets: no log-det estimator (its series of
        vector-Jacobian products is most of the forward's cost); ``logdet`` is zeros."""
        self._check(x)
        dtype = _dtype(x.dtype)
        states = [x.to(dtype)]
        with torch.autocast(x.device.type, enabled=False):
            h = self._in(states[0])
            for block in self.blocks:
                h = h + block.branch(y, x.shape[0], dtype)(h)
                states.append(self._out(h))
        zero = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        return FlowOutput(z=states[-1], logdet=zero, states=states, block_logdets=[zero] * len(self.blocks))

    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, annealed: bool = False,
                tol: float | None = None, max_iter: int | None = None, **options: Any) -> Tensor:
        """F^-1(z) by fixed-point iteration per block (reverse order), until every sample moves by
        less than ``tol`` (max-abs) or ``max_iter`` iterations. With labels and guidance w != 0 the
        branch is g_c + w (g_c - g_u) (g_u: the null label); its Lipschitz constant can exceed 1,
        so for large w the iteration may not converge (``inverse_stats["converged"]`` says so).
        ``annealed`` is accepted and ignored (no token order to ramp over); other ``options``
        (``use_cache``) too."""
        self._check(z)
        rc = self.config.resflow
        tol = rc.inverse_tol if tol is None else tol
        max_iter = rc.inverse_max_iter if max_iter is None else max_iter
        dtype, batch = _dtype(z.dtype), z.shape[0]
        guided = guidance != 0.0 and y is not None and self.config.num_classes > 0
        iters, residuals, converged = [], [], True
        with torch.autocast(z.device.type, enabled=False):
            h = self._in(z.to(dtype))
            for block in reversed(self.blocks):
                if guided:
                    g_c, g_u = block.branch(y, batch, dtype), block.branch(None, batch, dtype)

                    def g(x: Tensor, g_c=g_c, g_u=g_u) -> Tensor:
                        c = g_c(x)
                        return c + guidance * (c - g_u(x))
                else:
                    g = block.branch(y, batch, dtype)
                x, delta = h, float("inf")
                for it in range(1, max_iter + 1):
                    x_new = h - g(x)
                    delta = float((x_new - x).abs().max()) if x.numel() else 0.0
                    x = x_new
                    if delta < tol:  # a NaN never is
                        break
                converged = converged and delta < tol
                iters.insert(0, it)
                residuals.insert(0, float((x + g(x) - h).abs().max()))
                h = x
        self.inverse_stats = {"iterations": iters, "residuals": residuals, "converged": converged}
        return self._out(h).to(z.dtype)

    @torch.no_grad()
    def after_load(self, iters: int = REFRESH_ITERS, tol: float = REFRESH_TOL) -> "ResidualFlow":
        """Power iterations to convergence on every normalised convolution (u/v follow the weights)."""
        for block in self.blocks:
            for conv in block.convs:
                conv.power_iterate(iters, tol)
        return self

    def lipschitz(self) -> list[float]:
        """Per block, Lip(g) <= the product of its normalised convolutions' operator norms (as the
        forward uses them: normalised by the stored buffers), each by a fresh power iteration."""
        return [block.lipschitz() for block in self.blocks]
