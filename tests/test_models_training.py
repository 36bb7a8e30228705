"""Short optimisation runs of the tiny models: the flow's NLL falls, the reverse
model overfits a batch. Moved from test_models.py (each runs hundreds of
optimizer steps, minutes on 2 shared cores): integration-tier time."""

import pytest
import torch

from biflow.config import FlowConfig
from biflow.losses import forward_loss, reverse_loss
from biflow.models import TARFlow
from tests.test_models import TINY, data, tiny_pair

pytestmark = pytest.mark.integration


def test_flow_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    cfg = FlowConfig(**TINY)
    flow = TARFlow(cfg)
    x, y = data(16)
    x = 0.5 * torch.tanh(x)  # data-like range, not N(0, I): there is something to learn
    opt = torch.optim.AdamW(flow.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss, metrics = forward_loss(flow, x, y, cfg, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert set(metrics) >= {"loss", "bpd", "nll", "logdet_per_dim"}


def test_reverse_overfits_tiny_batch_reconstruction_10x():
    flow, rev, rcfg = tiny_pair(adaptive_p=0.0)
    fcfg = flow.config
    fcfg.noise_std, fcfg.label_drop = 0.0, 0.0
    x, y = data(8)
    x = 0.5 * torch.tanh(x)
    z = flow(x, y).z

    def recon_error():
        with torch.no_grad():
            return (rev(z, y).x - x).pow(2).mean().item()

    before = recon_error()
    opt = torch.optim.AdamW(rev.parameters(), lr=2e-3)
    for _ in range(150):
        loss, metrics = reverse_loss(rev, flow, x, y, rcfg, fcfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recon_error()
    assert after < before / 10, (before, after)
    assert {"align", "denoise_mse", "psnr"} <= set(metrics)
