"""Monotonic rational-quadratic spline transforms (Durkan et al. 2019, Neural Spline Flows).

``flow.transform: rqs`` swaps the elementwise affine map of Glow's couplings and of TARFlow's
blocks for one of these splines. Each dimension gets ``3K - 1`` unconstrained numbers from the
flow's network (K = ``flow.spline.bins``):

- K bin widths and K bin heights, each a softmax floored at ``MIN_BIN`` and spread over
  [-B, B] (B = ``flow.spline.bound``);
- K - 1 interior knot derivatives, ``MIN_DERIVATIVE + softplus(raw + c)`` with c chosen so
  that raw 0 gives derivative 1; the two boundary derivatives are 1.

Outside [-B, B] the map is the identity, so the spline, its slope and its inverse are
continuous at the bounds (linear tails). All-zero parameters give uniform bins and unit
derivatives: the identity map, which is what a zero-initialised output layer starts from.

In bin k, with xi = (x - x_k) / w_k, s_k = h_k / w_k:

    y  = y_k + h_k (s xi^2 + d_k xi (1 - xi)) / (s + (d_k + d_{k+1} - 2 s) xi (1 - xi))
    y' = s^2 (d_{k+1} xi^2 + 2 s xi (1 - xi) + d_k (1 - xi)^2) / (s + (d_k + d_{k+1} - 2 s) xi (1 - xi))^2

and the inverse solves the quadratic in xi (the numerically stable root). ``zuko`` is the
test-only oracle (tests/test_splines.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_BIN = 1e-3  # smallest bin width / height, as a fraction of the interval's 2B
MIN_DERIVATIVE = 1e-3
_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))  # softplus(0 + _SHIFT) + MIN_DERIVATIVE = 1


def num_params(bins: int) -> int:
    """Unconstrained numbers per transformed dimension: K widths, K heights, K - 1 derivatives."""
    return 3 * bins - 1


def knots(raw: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """(..., 3K - 1) unconstrained -> knot x, knot y and knot derivatives, each (..., K + 1)."""
    bins = (raw.shape[-1] + 1) // 3
    if num_params(bins) != raw.shape[-1]:
        raise ValueError(f"spline parameters: the last dimension must be 3K - 1, got {raw.shape[-1]}")

    def positions(unnormalised: Tensor) -> Tensor:
        width = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(unnormalised, dim=-1)
        edges = F.pad(torch.cumsum(width, dim=-1), (1, 0))
        edges = 2 * bound * edges - bound
        return torch.cat([edges[..., :-1], torch.full_like(edges[..., -1:], bound)], dim=-1)  # exact end

    xs, ys = positions(raw[..., :bins]), positions(raw[..., bins : 2 * bins])
    interior = MIN_DERIVATIVE + F.softplus(raw[..., 2 * bins :] + _SHIFT)
    return xs, ys, F.pad(interior, (1, 1), value=1.0)


def rqs(x: Tensor, raw: Tensor, bound: float, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """The spline (or its inverse) of every element of ``x`` with parameters ``raw`` (shape
    ``x.shape + (3K - 1,)``); returns (y, log|dy/dx|) elementwise, the log-det of the map
    applied (negative of the forward's for the inverse)."""
    xs, ys, ds = knots(raw, bound)
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)  # the identity tails: keep every branch finite for autograd
    edges = ys if inverse else xs
    k = (xc[..., None] >= edges[..., 1:-1]).sum(-1, keepdim=True)  # bin index in [0, K - 1]

    def at(t: Tensor, shift: int) -> Tensor:
        return t.gather(-1, k + shift)[..., 0]

    x0, x1, y0, y1, d0, d1 = at(xs, 0), at(xs, 1), at(ys, 0), at(ys, 1), at(ds, 0), at(ds, 1)
    w, h = x1 - x0, y1 - y0
    s = h / w
    curve = d0 + d1 - 2 * s
    if inverse:
        dy = xc - y0
        a = h * (s - d0) + dy * curve
        b = h * d0 - dy * curve
        c = -s * dy
        xi = (2 * c / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0)))).clamp(0, 1)
        out = x0 + xi * w
    else:
        xi = ((xc - x0) / w).clamp(0, 1)
        out = y0 + h * (s * xi**2 + d0 * xi * (1 - xi)) / (s + curve * xi * (1 - xi))
    one = xi * (1 - xi)
    slope = s**2 * (d1 * xi**2 + 2 * s * one + d0 * (1 - xi) ** 2) / (s + curve * one) ** 2
    logdet = torch.log(slope)
    if inverse:
        logdet = -logdet
    return torch.where(inside, out, x), torch.where(inside, logdet, torch.zeros_like(logdet))
