"""Reverse model G (BiFlow): a bidirectional ViT that maps noise z back to a
clean image in one network evaluation.

G's depth is split into B segments, one per forward block, in reverse order.
After segment i a projection head phi_i maps the hidden tokens to token
space; its output is aligned with the forward trajectory state x^(B-1-i)
(hidden alignment: the hidden states stay free, only their projections are
tied). A final learned denoising block maps to the clean x.

Conditioning on the label c and the guidance scale w is by adaLN (DiT) or by
two prepended tokens (``ReverseConfig.conditioning``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from biflow.config import FlowConfig, ReverseConfig
from biflow.models.layers import (
    AdaLNLayer,
    AdaLNOutput,
    LabelEmbedding,
    PlainLayer,
    ScalarEmbedding,
    patchify,
    unpatchify,
)


@dataclass
class ReverseOutput:
    x: Tensor  # clean image prediction (B, C, H, W)
    states: list[Tensor]  # states[k] predicts the forward state x^k, k = 0..B-1 (x^0 = noisy input)


def segment_bounds(depth: int, num_segments: int) -> list[int]:
    """End index (exclusive) of each segment, as even as possible."""
    return [round((i + 1) * depth / num_segments) for i in range(num_segments)]


class _TokenHead(nn.Module):
    """Hidden tokens -> token space (used for the alignment projections phi_i)."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        return self.linear(self.norm(h))


class ZSkip(nn.Module):
    """A linear path from z to the output, zero at initialisation (``ReverseConfig.z_skip``).

    ``token``: one D x D map (and bias) per token position, so each output token is a linear
    function of the z token at the same place; ``lowrank`` adds a rank-r map across every
    dimension (U random, V zero); ``dense``: one full map over all C*H*W dimensions."""

    def __init__(self, kind: str, num_tokens: int, token_dim: int, rank: int):
        super().__init__()
        self.kind = kind
        n, d = num_tokens, token_dim
        if kind == "dense":
            self.dense = nn.Linear(n * d, n * d)
            nn.init.zeros_(self.dense.weight)
            nn.init.zeros_(self.dense.bias)
            return
        self.token_weight = nn.Parameter(torch.zeros(n, d, d))
        self.token_bias = nn.Parameter(torch.zeros(n, d))
        if kind == "lowrank":
            self.down = nn.Parameter(torch.randn(n * d, rank) / (n * d) ** 0.5)
            self.up = nn.Parameter(torch.zeros(rank, n * d))

    def ridge_stats(self, z_tokens: Tensor, target_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Sufficient statistics (X^T X, X^T Y) of a least-squares fit of the target tokens from
        the z tokens with a bias, in fp64; sum them over batches (and ranks), then :meth:`fit`.
        ``dense`` fits one map over all dimensions, ``token``/``lowrank`` one per position."""
        z, t = z_tokens.detach().double(), target_tokens.detach().double()
        b, n, d = z.shape
        if self.kind == "dense":
            x = torch.cat([z.reshape(b, n * d), z.new_ones(b, 1)], 1)
            return x.T @ x, x.T @ t.reshape(b, n * d)
        x = torch.cat([z, z.new_ones(b, n, 1)], 2).transpose(0, 1)  # (N, B, D + 1)
        return x.transpose(1, 2) @ x, x.transpose(1, 2) @ t.transpose(0, 1)

    @torch.no_grad()
    def fit(self, xtx: Tensor, xty: Tensor, ridge: float = 1e-3) -> None:
        """Set the linear map to the ridge solution (X^T X + ridge * mean diag * I)^-1 X^T Y:
        G then starts from the best linear predictor of its target instead of from zero
        (the rank-r part of ``lowrank`` stays zero)."""
        eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
        scale = xtx.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        sol = torch.linalg.solve(xtx + ridge * scale * eye, xty)  # (..., in + 1, out)
        if self.kind == "dense":
            self.dense.weight.copy_(sol[:-1].T.to(self.dense.weight.dtype))
            self.dense.bias.copy_(sol[-1].to(self.dense.bias.dtype))
        else:
            self.token_weight.copy_(sol[:, :-1].to(self.token_weight.dtype))
            self.token_bias.copy_(sol[:, -1].to(self.token_bias.dtype))

    def forward(self, tokens: Tensor) -> Tensor:
        """z tokens (B, N, D) -> the skip's contribution to the output tokens (B, N, D)."""
        b, n, d = tokens.shape
        if self.kind == "dense":
            return self.dense(tokens.reshape(b, n * d)).reshape(b, n, d)
        out = torch.einsum("bnd,nde->bne", tokens, self.token_weight) + self.token_bias
        if self.kind == "lowrank":
            out = out + (tokens.reshape(b, n * d) @ self.down @ self.up).reshape(b, n, d)
        return out


class ReverseModel(nn.Module):
    def __init__(self, cfg: ReverseConfig, flow_cfg: FlowConfig):
        super().__init__()
        cfg.validate("reverse")
        cfg.check_flow(flow_cfg)
        self.config = cfg
        self.flow_config = flow_cfg
        self.patch_size = p = cfg.patch_size or flow_cfg.patch_size  # G's own tokens, whatever the flow family
        w, d, n = cfg.width, flow_cfg.channels * p * p, (flow_cfg.image_size // p) ** 2
        self.proj_in = nn.Linear(d, w)
        self.pos_embed = nn.Parameter(torch.randn(1, n, w) * 0.02)
        self.label_embed = LabelEmbedding(flow_cfg.num_classes, w) if flow_cfg.num_classes > 0 else None
        self.guidance_embed = ScalarEmbedding(w)
        layer_cls = AdaLNLayer if cfg.conditioning == "adaln" else PlainLayer
        self.layers = nn.ModuleList(layer_cls(w, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.bounds = segment_bounds(cfg.depth, flow_cfg.num_blocks)
        self.heads = nn.ModuleList(_TokenHead(w, d) for _ in range(flow_cfg.num_blocks))
        self.denoise = nn.ModuleList(layer_cls(w, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.denoise_depth))
        self.out = AdaLNOutput(w, d) if cfg.conditioning == "adaln" else _TokenHead(w, d)
        if cfg.conditioning == "tokens":
            self.cond_pos = nn.Parameter(torch.randn(1, 2, w) * 0.02)
        self.z_skip = ZSkip(cfg.z_skip, n, d, cfg.z_skip_rank) if cfg.z_skip != "none" else None
        if self.z_skip is not None:  # the ViT's output starts at zero (DiT's init): G starts as the skip
            nn.init.zeros_(self.out.linear.weight)
            nn.init.zeros_(self.out.linear.bias)

    @torch.no_grad()
    def fit_z_skip(self, pairs: Iterable[tuple[Tensor, Tensor]], reduce: Callable[[Tensor], Tensor] | None = None,
                   ridge: float = 1e-3) -> int:
        """Set the z skip to the ridge fit of ``target`` from ``z`` over ``pairs`` of images
        ``(z, target)``; ``reduce`` sums the statistics over ranks (an all-reduce), so every
        rank gets the same weights. Returns the number of rows fitted (on this rank)."""
        if self.z_skip is None:
            raise ValueError("reverse.z_skip is none: there is no skip to fit")
        p = self.patch_size
        xtx = xty = None
        rows = 0
        for z, target in pairs:
            a, b = self.z_skip.ridge_stats(patchify(z, p), patchify(target, p))
            xtx, xty = (a, b) if xtx is None else (xtx + a, xty + b)
            rows += z.shape[0]
        if xtx is None:
            raise ValueError("no batches to fit the z skip on")
        if reduce is not None:
            xtx, xty = reduce(xtx), reduce(xty)
        self.z_skip.fit(xtx, xty, ridge)
        return rows

    def _to_image(self, tokens: Tensor) -> Tensor:
        f = self.flow_config
        return unpatchify(tokens, self.patch_size, f.channels, f.image_size)

    def condition(self, y: Tensor | None, guidance: Tensor | float, batch: int, device: torch.device) -> Tensor:
        if not torch.is_tensor(guidance):
            guidance = torch.full((batch,), float(guidance), device=device)
        c = self.guidance_embed(guidance.reshape(-1).expand(batch) if guidance.numel() == 1 else guidance)
        if self.label_embed is not None:
            c = c + self.label_embed(y, batch, device)
        return c

    def forward(self, z: Tensor, y: Tensor | None = None, guidance: Tensor | float = 0.0) -> ReverseOutput:
        b = z.shape[0]
        z_tokens = patchify(z, self.patch_size).to(self.proj_in.weight.dtype)
        h = self.proj_in(z_tokens)
        h = h + self.pos_embed.to(h.dtype)  # bf16 residual stream under autocast (see TARFlow.embed)
        c = self.condition(y, guidance, b, z.device).to(h.dtype)
        n_cond = 0
        if self.config.conditioning == "tokens":
            h = torch.cat([torch.stack([c, c], 1) + self.cond_pos.to(h.dtype), h], dim=1)
            n_cond = 2
        num_blocks = len(self.heads)
        states: list[Tensor] = [z] * num_blocks
        start = 0
        for i, end in enumerate(self.bounds):
            for layer in self.layers[start:end]:
                h = layer(h, c)
            start = end
            states[num_blocks - 1 - i] = self._to_image(self.heads[i](h[:, n_cond:]).to(z.dtype))
        for layer in self.denoise:
            h = layer(h, c)
        out = self.out(h, c)[:, n_cond:]
        if self.z_skip is not None:
            out = out + self.z_skip(z_tokens)
        x = self._to_image(out.to(z.dtype))
        return ReverseOutput(x=x, states=states)
