"""CUDA-only checks of what a CPU cannot show (``pytest -m cuda``; run by
``make device-check`` on a GPU machine, skipped elsewhere). Plain torch and
biflow's model code only, so they run on a device machine without Ray."""

from __future__ import annotations

import pytest
import torch

from biflow.config import FlowConfig, ReverseConfig
from biflow.losses import reverse_loss
from biflow.models import ReverseModel, TARFlow
from biflow.perceptual import paired_random_crop, paired_random_resized_crop

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FLOW = dict(image_size=32, channels=4, patch_size=2, width=64, depth=1, num_blocks=2, num_heads=4, num_classes=10)


def test_crops_draw_on_a_cuda_generator():
    x = torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = paired_random_crop(x + 0.5, x, 0.875, g)
    assert a.is_cuda and a.shape == (4, 3, 28, 28) and torch.allclose(a, b + 0.5)
    c, d = paired_random_resized_crop(x + 0.5, x, 0.875, 75, g)
    assert c.shape == (4, 3, 75, 75) and torch.allclose(c, d + 0.5, atol=1e-5)


def test_bf16_autocast_states_fp32_and_inverse_on_cuda():
    torch.manual_seed(0)
    flow = TARFlow(FlowConfig(**FLOW)).cuda().eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(8, 4, 32, 32, device="cuda") * 0.5
    y = torch.arange(8, device="cuda") % 10
    with torch.no_grad():
        ref = flow(x, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = flow(x, y)
            back = flow.inverse(out.z, y)
    assert all(s.dtype == torch.float32 for s in out.states)
    for s_amp, s_ref in zip(out.states, ref.states):
        assert ((s_amp - s_ref).norm() / s_ref.norm()).item() < 2e-2
    assert (back - x).abs().max().item() < 5e-2


def test_reverse_loss_on_cuda_with_guidance_and_bf16():
    torch.manual_seed(0)
    fcfg = FlowConfig(**FLOW)
    flow = TARFlow(fcfg).cuda().eval().requires_grad_(False)
    rcfg = ReverseConfig(width=64, depth=2, num_heads=4, guidance_max=2.0)
    rev = ReverseModel(rcfg, fcfg).cuda()
    seen = []
    flow.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cuda")))
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = torch.randn(4, 4, 32, 32, device="cuda"), torch.arange(4, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, metrics = reverse_loss(rev, flow, x, y, rcfg, fcfg, generator=g)
    loss.backward()
    assert seen == [False] and torch.isfinite(loss) and metrics["psnr"] > 0
