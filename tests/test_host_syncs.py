"""What a training step costs a GPU beyond its kernels: host syncs and attention masks.

One optimizer step as the loop takes it (the stage's loss under the engine's autocast,
backward, the engine's step, the EMA update, the metrics kept on the device), counted
with :class:`biflow.timing.HostSyncCounter`: at most one host sync per non-logging step
(the engine's finite-gradient check). Every attention call of training is causal or
maskless (the fused SDPA kernels; a materialised mask would fall back to the slow path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biflow.config import ExperimentConfig, FlowConfig, OptimConfig, ReverseConfig, TrainConfig
from biflow.ema import EMA
from biflow.losses import forward_loss, reverse_loss
from biflow.models import ReverseModel, TARFlow
from biflow.timing import HostSyncCounter
from biflow.train.engine import build_engine

pytestmark = pytest.mark.unit

FLOW = FlowConfig(image_size=8, channels=1, patch_size=2, width=32, depth=1, num_blocks=2, num_heads=2,
                  num_classes=4, noise_std=0.1)


def _engine(module):
    exp = ExperimentConfig(flow=FLOW, optim=OptimConfig(warmup_steps=0),
                           train=TrainConfig(steps=10, batch_size=8, engine="ddp", precision="fp32"))
    return build_engine(module, exp, torch.device("cpu"))


def _steps(engine, loss_fn, n: int = 3) -> list[list[str]]:
    """``n`` loop steps; the host syncs of each (metrics summed on the device, as the loop does)."""
    ema = EMA(engine.module, 0.99)
    window: dict = {}
    counts = []
    for i in range(n):
        with HostSyncCounter() as c:
            with engine.accumulate(), engine.autocast():
                loss, metrics = loss_fn(engine.model, i)
            engine.backward(loss)
            applied = engine.step()
            ema.update()
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
        assert applied
        counts.append(c.calls)
    assert all(torch.is_tensor(v) for v in window.values())  # read on log steps only
    return counts


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.arange(8) % 4


def test_forward_step_has_one_host_sync(batch):
    x, y = batch
    g = torch.Generator().manual_seed(1)
    engine = _engine(TARFlow(FLOW))
    counts = _steps(engine, lambda model, i: forward_loss(model, x, y, FLOW, generator=g))
    assert counts == [["__bool__"]] * 3, counts  # the finite-gradient check, nothing else
    assert torch.is_tensor(engine.last_grad_norm)


def test_guided_reverse_step_has_one_host_sync(batch):
    """Training-time CFG on: the unconditional stream runs on a slice the host knows the size
    of (no variable-size nonzero)."""
    x, y = batch
    g = torch.Generator().manual_seed(2)
    flow = TARFlow(FLOW).eval().requires_grad_(False)
    rcfg = ReverseConfig(width=32, depth=2, num_heads=2, guidance_max=2.0, guidance_p_zero=0.5)
    engine = _engine(ReverseModel(rcfg, FLOW))
    seen = []

    def loss_fn(model, i):
        loss, metrics = reverse_loss(model, flow, x, y, rcfg, FLOW, generator=g, step=100, progress=0.9)
        seen.append(metrics["guided_rows"])
        return loss, metrics

    counts = _steps(engine, loss_fn)
    assert counts == [["__bool__"]] * 3, counts
    # half of the rows may be guided (p_zero 0.5); the label-dropped ones among them are not
    assert all(0 < float(s) <= 0.5 for s in seen), seen


def test_guidance_rows_are_a_fixed_leading_slice():
    from biflow.losses import guided_rows, sample_guidance

    y = torch.arange(10) % 4
    y[1] = 4  # a label-dropped row: never guided
    w = sample_guidance(y, 2.0, 4, 10, torch.device("cpu"), torch.Generator().manual_seed(0), p_zero=0.3)
    assert guided_rows(10, 2.0, 0.3, y) == 7
    assert (w[7:] == 0).all() and w[1] == 0 and (w[[0, 2, 3, 4, 5, 6]] > 0).all()
    assert guided_rows(10, 0.0, 0.3, y) == 0 and guided_rows(10, 2.0, 0.3, None) == 0


def test_training_attention_is_causal_or_maskless(batch, monkeypatch):
    from biflow.models import layers

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    x, y = batch
    flow = TARFlow(FLOW)
    forward_loss(flow, x, y, FLOW)[0].backward()
    assert calls and all(maskless and causal for maskless, causal in calls)  # the flow: causal, no mask
    calls.clear()
    rcfg = ReverseConfig(width=32, depth=2, num_heads=2, guidance_max=2.0)
    reverse_loss(ReverseModel(rcfg, FLOW), flow.eval(), x, y, rcfg, FLOW, step=10, progress=0.9)[0].backward()
    assert calls and all(maskless for maskless, _ in calls)
    assert any(causal for _, causal in calls) and any(not causal for _, causal in calls)  # flow + G
