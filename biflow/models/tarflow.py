"""Forward flow F: TARFlow, a stack of autoregressive affine blocks over patch tokens.

Block i permutes the token order (identity for even i, reversed for odd i),
runs a causal transformer whose outputs are shifted one token to the right,
and maps every token with parameters computed from the tokens before it:

    forward:  z_t = (x_t - mu_t) * exp(-alpha_t),   log|det| = -sum(alpha)
    inverse:  x_t = z_t * exp(alpha_t) + mu_t       (token by token, KV-cached)

Token 0 has mu = alpha = 0 and passes through unchanged. The affine and
log-det math runs in at least fp32 whatever the model dtype.

With ``flow.transform: rqs`` each token's dimensions go through a rational-quadratic
spline instead (biflow.models.splines), its 3K - 1 parameters per dimension computed the
same way from the tokens before it; token 0 passes unchanged, as with the affine map.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from biflow.config import FlowConfig
from biflow.models.flow import LOG_2PI, FlowOutput, ForwardFlow, log_likelihood  # noqa: F401 (their old home)
from biflow.models.layers import KVCache, LabelEmbedding, TransformerLayer, patchify, unpatchify
from biflow.models.layers import affine_dtype as _affine_dtype
from biflow.models.splines import num_params, rqs


class FlowBlock(nn.Module):
    """One autoregressive affine block: causal transformer -> (mu, alpha) per token."""

    def __init__(self, cfg: FlowConfig, reverse_order: bool):
        super().__init__()
        self.cfg = cfg
        self.reverse_order = reverse_order
        w, d, n = cfg.width, cfg.token_dim, cfg.num_tokens
        self.proj_in = nn.Linear(d, w)
        self.pos_embed = nn.Parameter(torch.randn(1, n, w) * 0.02)
        self.label_embed = LabelEmbedding(cfg.num_classes, w) if cfg.num_classes > 0 else None
        self.layers = nn.ModuleList(TransformerLayer(w, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w) if cfg.out_norm else nn.Identity()
        self.spline = cfg.transform == "rqs"
        self.proj_out = nn.Linear(w, (num_params(cfg.spline.bins) if self.spline else 2) * d)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity map
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, tokens: Tensor) -> Tensor:
        return tokens.flip(1) if self.reverse_order else tokens

    def condition(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if self.label_embed is None:
            return None
        return self.label_embed(y, batch, device).unsqueeze(1)

    def embed(self, tokens: Tensor, cond: Tensor | None, start: int = 0) -> Tensor:
        h = self.proj_in(tokens.to(self.proj_in.weight.dtype))
        # the tables in h's dtype: under bf16 autocast the residual stream stays bf16 (an fp32
        # add would promote every layer's input); the affine math and the states stay fp32
        h = h + self.pos_embed[:, start : start + tokens.shape[1]].to(h.dtype)
        return h if cond is None else h + cond.to(h.dtype)

    def affine_params(self, h: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Hidden states -> (mu, alpha), each bounded by the norm-control soft clip
        c * tanh(. / c): smooth, so the bound binds without zeroing gradients."""
        mu, alpha = self.proj_out(self.norm(h)).to(dtype).chunk(2, dim=-1)
        c = self.cfg.alpha_soft_clip
        if c > 0:
            alpha = c * torch.tanh(alpha / c)
        c = self.cfg.clip
        if c > 0:
            mu, alpha = c * torch.tanh(mu / c), c * torch.tanh(alpha / c)
        return mu, alpha

    def spline_params(self, h: Tensor, dtype: torch.dtype) -> Tensor:
        """Hidden states (B, T, W) -> spline parameters (B, T, D, 3K - 1)."""
        raw = self.proj_out(self.norm(h)).to(dtype)
        return raw.view(*raw.shape[:-1], self.cfg.token_dim, -1)

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """x: tokens (B, N, D) in natural order -> (z tokens, logdet (B,))."""
        dtype = _affine_dtype(x.dtype)
        xp = self.permute(x)
        h = self.embed(xp, self.condition(y, x.shape[0], x.device))
        for layer in self.layers:
            h = layer(h, causal=True)
        if self.spline:
            xp = xp.to(dtype)  # outputs at position t-1 parameterise token t; token 0 passes as it is
            z, ld = rqs(xp[:, 1:], self.spline_params(h[:, :-1], dtype), self.cfg.spline.bound)
            return self.permute(torch.cat([xp[:, :1], z], dim=1)), ld.sum(dim=(1, 2))
        mu, alpha = self.affine_params(h, dtype)
        # outputs at position t-1 parameterise token t; token 0 gets (0, 0)
        mu = torch.cat([torch.zeros_like(mu[:, :1]), mu[:, :-1]], dim=1)
        alpha = torch.cat([torch.zeros_like(alpha[:, :1]), alpha[:, :-1]], dim=1)
        z = (xp.to(dtype) - mu) * torch.exp(-alpha)
        logdet = -alpha.sum(dim=(1, 2))
        return self.permute(z), logdet  # in the affine dtype: states are never rounded to bf16

    def _mix(self, mu: Tensor, alpha: Tensor, guidance: float) -> tuple[Tensor, Tensor]:
        """Classifier-free guidance on the affine parameters (cond first, uncond second)."""
        (mu_c, mu_u), (a_c, a_u) = mu.chunk(2), alpha.chunk(2)
        return mu_c + guidance * (mu_c - mu_u), a_c + guidance * (a_c - a_u)

    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None, guidance: float = 0.0, use_cache: bool = True,
                annealed: bool = False) -> Tensor:
        """Exact inverse, decoding one token per step (N - 1 sequential steps).

        With ``use_cache`` each step runs one token through the transformer and
        attends over cached keys/values; without it every step recomputes the
        whole prefix (the naive baseline, for tests and benchmarks). ``annealed``
        guidance (ml-tarflow's option) ramps w linearly over the decode steps:
        step t uses (t + 1) / (N - 1) * guidance, the full w only at the last token.
        """
        dtype = _affine_dtype(z.dtype)
        zp = self.permute(z).to(dtype)
        b, n, _ = zp.shape
        cfg_on = guidance != 0.0 and self.label_embed is not None
        if cfg_on:
            y_cond = y if y is not None else torch.full((b,), self.cfg.num_classes, device=z.device, dtype=torch.long)
            y_all = torch.cat([y_cond, torch.full_like(y_cond, self.cfg.num_classes)])
            cond = self.condition(y_all, 2 * b, z.device)
        else:
            cond = self.condition(y, b, z.device)
        rows = 2 * b if cfg_on else b
        x = torch.empty_like(zp)
        x[:, 0] = zp[:, 0]
        caches = None
        if use_cache:
            like = self.pos_embed
            caches = [KVCache(rows, self.cfg.num_heads, n, self.cfg.width // self.cfg.num_heads, like)
                      for _ in self.layers]
        for t in range(n - 1):
            if use_cache:
                tok = x[:, t : t + 1]
                h = self.embed(tok.repeat(2, 1, 1) if cfg_on else tok, cond, start=t)
                for layer, cache in zip(self.layers, caches):
                    h = layer(h, cache=cache, pos=t)
            else:
                prefix = x[:, : t + 1]
                h = self.embed(prefix.repeat(2, 1, 1) if cfg_on else prefix, cond)
                for layer in self.layers:
                    h = layer(h, causal=True)
                h = h[:, -1:]
            w = guidance * (t + 1) / (n - 1) if annealed else guidance
            if self.spline:
                raw = self.spline_params(h, dtype)[:, 0]
                if cfg_on:  # guidance on the spline parameters, as on (mu, alpha)
                    raw_c, raw_u = raw.chunk(2)
                    raw = raw_c + w * (raw_c - raw_u)
                x[:, t + 1] = rqs(zp[:, t + 1], raw, self.cfg.spline.bound, inverse=True)[0]
                continue
            mu, alpha = self.affine_params(h, dtype)
            if cfg_on:
                mu, alpha = self._mix(mu, alpha, w)
            x[:, t + 1] = zp[:, t + 1] * torch.exp(alpha[:, 0]) + mu[:, 0]
        return self.permute(x).to(z.dtype)


class TARFlow(ForwardFlow):
    """Transformer autoregressive flow over image (or latent) tensors (B, C, H, W)."""

    family = "tarflow"

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(FlowBlock(cfg, reverse_order=bool(i % 2)) for i in range(cfg.num_blocks))

    def to_tokens(self, x: Tensor) -> Tensor:
        return patchify(x, self.config.patch_size)

    def to_image(self, tokens: Tensor) -> Tensor:
        c = self.config
        return unpatchify(tokens, c.patch_size, c.channels, c.image_size)

    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """States, z and logdet in the affine dtype (fp32 for bf16/fp16 inputs, fp64 for fp64):
        under bf16 only the transformers round, never the states passed between blocks."""
        self._check(x)
        dtype = _affine_dtype(x.dtype)
        tokens = self.to_tokens(x).to(dtype)
        logdet = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        states = [x.to(dtype)]
        block_logdets = []
        for block in self.blocks:
            tokens, ld = block(tokens, y)
            logdet = logdet + ld
            block_logdets.append(ld)
            states.append(self.to_image(tokens))
        return FlowOutput(z=states[-1], logdet=logdet, states=states, block_logdets=block_logdets)

    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, use_cache: bool = True,
                annealed: bool = False) -> Tensor:
        """Exact inverse F^-1(z), blocks in reverse order, with optional (annealed) CFG."""
        self._check(z)
        tokens = self.to_tokens(z).to(_affine_dtype(z.dtype))  # fp32 between blocks, as in forward
        for block in reversed(self.blocks):
            tokens = block.inverse(tokens, y, guidance=guidance, use_cache=use_cache, annealed=annealed)
        return self.to_image(tokens).to(z.dtype)
