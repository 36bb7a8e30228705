"""The forward-flow protocol every family implements, and the one builder.

BiFlow learns the reverse model, so the forward flow needs no fast exact inverse:
any normalizing flow whose forward pass yields its trajectory can be the forward
model. A family (``flow.family``) is an ``nn.Module`` subclass of
:class:`ForwardFlow`:

- ``forward(x, y)`` -> :class:`FlowOutput`: ``z``, the total log-det, the states
  x^0 .. x^B (x^0 = x, x^B = z), the per-block log-dets (they sum to the total) and,
  for multi-scale families, per-state masks of the dimensions still active;
- ``trajectory(x, y)``: the states alone (the reverse stage's targets), log-det optional;
- ``inverse(z, y, guidance=0.0, **options)`` -> x, the family's exact (or iterative)
  inverse; iterative inverses leave ``inverse_stats`` (iterations and residuals per
  block) on the module;
- ``state_shapes()``: the (C, H, W) of every state (all in the data layout);
- ``block_costs()``: each block's share of the forward cost (sums to 1);
- ``after_load()``: called once weights are loaded (EMA or exported), for buffers
  derived from the weights (spectral-norm power iterations).

States are always in the data layout (B, C, H, W), so the reverse model's heads
and the alignment loss work unchanged for every family. Multi-scale factoring
writes the factored-out part back in place; ``masks[k]`` (C, H, W) is 1 where
state k is still being transformed.

:func:`biflow.models.registry.build_flow` is the only place a flow is made (training,
loading, sampling, benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from biflow.config import FlowConfig

LOG_2PI = math.log(2 * math.pi)


@dataclass
class FlowOutput:
    z: Tensor  # (B, C, H, W), same shape as x
    logdet: Tensor  # (B,), natural log, fp32 or wider
    states: list[Tensor]  # [x^0 .. x^B], each (B, C, H, W); x^0 = input, x^B = z
    block_logdets: list[Tensor] = field(default_factory=list)  # B tensors (B,): block k's log-det; sum = logdet
    masks: list[Tensor | None] | None = None  # per state: (C, H, W) of dims still active; None = all of them


def log_likelihood(out: FlowOutput) -> Tensor:
    """log p(x) in nats, (B,), of a flow output: the standard normal prior of ``z``
    (Gaussian constant included) plus the log-det. The NLL of training and
    evaluation (:func:`biflow.losses.nll_per_dim`) is this, negated, per dimension."""
    z = out.z.to(out.logdet.dtype).flatten(1)
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * LOG_2PI + out.logdet


class ForwardFlow(nn.Module):
    """Base of every forward family; see the module docstring for the protocol."""

    family: str = ""
    config: FlowConfig

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        cfg.validate("flow")
        self.config = cfg
        self.inverse_stats: dict[str, Any] = {}

    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, **options: Any) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def trajectory(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """The states alone, what the reverse stage aligns with: families whose log-det costs
        more than the states (resflow's estimator) skip it here; the others return ``self(x, y)``
        (through ``__call__``, so module hooks see it)."""
        return self(x, y)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x) in nats, (B,): standard normal prior plus the log-det."""
        return log_likelihood(self.forward(x, y))

    def state_shapes(self) -> list[tuple[int, int, int]]:
        c = self.config
        return [(c.channels, c.image_size, c.image_size)] * (self.num_blocks + 1)

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    def block_costs(self) -> list[float]:
        """Each block's share of the forward cost, by parameter count (blocks of one family
        do the same work per parameter); sums to 1."""
        sizes = [sum(p.numel() for p in b.parameters()) for b in self.flow_blocks()]
        total = sum(sizes) or 1
        return [s / total for s in sizes]

    def flow_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # type: ignore[attr-defined]

    def after_load(self) -> "ForwardFlow":
        return self

    def _check(self, x: Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects (B, {c.channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
