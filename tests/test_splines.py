"""Rational-quadratic splines (biflow.models.splines) against zuko's MonotonicRQSTransform as
the oracle (the same knots give the same values, inverses and log-slopes), and inside the flows
(``flow.transform: rqs``: TARFlow blocks, Glow couplings): exact log-dets, round trips before
and after training, guidance."""

import re

import pytest
import torch
from zuko.transforms import MonotonicRQSTransform

from biflow.config import ConfigError, FlowConfig, GlowConfig, SplineConfig, load_config
from biflow.models import build_flow
from biflow.models.splines import knots, num_params, rqs
from tests.test_models import randomise

pytestmark = pytest.mark.unit

BOUND, BINS = 3.0, 8


def draw(n=4096, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    raw = scale * torch.randn(n, num_params(BINS), generator=g, dtype=dtype)
    x = 1.3 * BOUND * (2 * torch.rand(n, generator=g, dtype=dtype) - 1)  # ~23% in the identity tails
    return x, raw


def oracle(raw: torch.Tensor) -> MonotonicRQSTransform:
    """zuko's transform with our knots in place of its own parameterisation."""
    t = MonotonicRQSTransform(raw[..., :BINS], raw[..., BINS : 2 * BINS], raw[..., 2 * BINS :], bound=BOUND)
    t.horizontal, t.vertical, t.derivatives = knots(raw, BOUND)
    return t


def test_matches_zuko_forward_inverse_and_log_slope():
    x, raw = draw()
    y, ld = rqs(x, raw, BOUND)
    t = oracle(raw)
    y_ref, ld_ref = t.call_and_ladj(x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-10, rtol=0)
    back, ld_inv = rqs(y, raw, BOUND, inverse=True)
    torch.testing.assert_close(back, t.inv(y), atol=1e-10, rtol=0)
    print(f"\nmax |x - inverse(y)| {float((back - x).abs().max()):.2e}; "
          f"log-slope range [{float(ld.min()):.2f}, {float(ld.max()):.2f}]")
    assert float((back - x).abs().max()) < 1e-10
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)
    assert float(ld.abs().max()) > 1.0  # far from the identity: the check has teeth
    outside = x.abs() >= BOUND
    assert outside.any() and torch.equal(y[outside], x[outside])
    assert torch.equal(ld[outside], torch.zeros_like(x)[outside])


def test_log_slope_is_autograds_derivative():
    x, raw = draw(n=512, seed=1)
    xg = x.clone().requires_grad_(True)
    y, ld = rqs(xg, raw, BOUND)
    (dy,) = torch.autograd.grad(y.sum(), xg)
    torch.testing.assert_close(torch.log(dy), ld, atol=1e-9, rtol=0)


def test_zero_parameters_are_the_identity_and_fp32_round_trip():
    x, raw = draw(seed=2, dtype=torch.float32)
    y, ld = rqs(x, torch.zeros_like(raw), BOUND)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    assert float(ld.abs().max()) < 1e-5
    # fp32 round trip at a trained flow's scale of parameters (slopes e^-4 .. e^3); at scale 2
    # slopes reach e^-12 and fp32's rounding of y alone moves x by ~0.03 (fp64 above: 1e-10)
    x, raw = draw(seed=2, dtype=torch.float32, scale=0.5)
    y, ld = rqs(x, raw, BOUND)
    err = float((rqs(y, raw, BOUND, inverse=True)[0] - x).abs().max())
    print(f"\nfp32 round trip {err:.2e}, log-slopes [{float(ld.min()):.2f}, {float(ld.max()):.2f}]")
    assert err < 1e-4


def test_monotone_and_continuous_at_the_bounds():
    _, raw = draw(n=1, seed=3)
    grid = torch.linspace(-1.2 * BOUND, 1.2 * BOUND, 20001, dtype=torch.float64)
    y, _ = rqs(grid, raw.expand(len(grid), -1), BOUND)
    assert bool((y[1:] > y[:-1]).all())
    edge = torch.tensor([-BOUND - 1e-9, -BOUND + 1e-9, BOUND - 1e-9, BOUND + 1e-9], dtype=torch.float64)
    ye, _ = rqs(edge, raw.expand(4, -1), BOUND)
    assert abs(float(ye[1] - ye[0])) < 1e-6 and abs(float(ye[3] - ye[2])) < 1e-6


def test_bad_parameter_count():
    with pytest.raises(ValueError, match="3K - 1"):
        knots(torch.zeros(3, 7), BOUND)


# 64 dimensions (exact Jacobians): TARFlow 16 tokens of 2x2 pixels, Glow 2 levels of 2 steps
FLOWS = {
    "tarflow": dict(family="tarflow", image_size=8, channels=1, patch_size=2, width=32, depth=1, num_blocks=2,
                    num_heads=4, num_classes=3),
    "glow": dict(family="glow", image_size=8, channels=1, num_blocks=4, num_classes=3, glow=GlowConfig(hidden=16)),
}


def spline_flow(family: str, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return build_flow(FlowConfig(**FLOWS[family], transform="rqs", spline=SplineConfig(bins=6, bound=3.0))).to(dtype)


def images(n=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    base = torch.randn(3, 1, 8, 8, generator=g).clamp(-2, 2) * 0.5
    return (base[y] + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).to(dtype), y


@pytest.mark.parametrize("family", FLOWS)
def test_spline_flow_log_det_is_exact(family):
    # std 0.1: log-dets of -16..-41 (tarflow) and 38..44 (glow); at 0.15 TARFlow's block Jacobians reach
    # condition numbers of 2e17, and slogdet's LU itself drifts from the exact diagonal sum by 0.4
    flow = randomise(spline_flow(family, torch.float64), std=0.1).eval()
    x, y = images(2, torch.float64)
    if family == "glow":
        flow.data_init(x, y)
    out = flow(x, y)
    for i in range(2):
        fn = lambda v: flow(v.view(1, 1, 8, 8), y[i : i + 1]).z.flatten()  # noqa: E731
        _, logabsdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(fn, x[i].flatten()))
        print(f"\n{family} rqs: log-det {float(out.logdet[i].detach()):.6f}, slogdet {float(logabsdet):.6f}")
        assert abs(float(out.logdet[i].detach() - logabsdet)) < 1e-8
        assert abs(float(logabsdet)) > 1.0  # far from the identity
    torch.testing.assert_close(sum(out.block_logdets), out.logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", FLOWS)
def test_spline_flow_round_trip_at_init_and_after_training(family):
    flow = spline_flow(family)
    x, y = images(16)

    def round_trip(**kw) -> float:
        with torch.no_grad():
            z = flow.eval()(x, y).z
        return float((flow.inverse(z, y, **kw) - x).abs().max())

    if family == "glow":
        flow.data_init(x, y)
    else:  # zero-initialised heads: the identity map
        out = flow(x, y)
        assert float((out.z - x).abs().max()) < 1e-6 and float(out.logdet.abs().max()) < 1e-4
    err0 = round_trip()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    nlls = []
    for _ in range(40):
        loss = -flow.train().log_prob(x, y).mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nlls.append(float(loss))
    err1 = round_trip()
    plain = flow.inverse(flow(x, y).z, y)
    guided = flow.inverse(flow(x, y).z, y, guidance=1.0)
    gap = float((guided - plain).abs().max())
    print(f"\n{family} rqs: round trip init {err0:.2e}, trained {err1:.2e}; NLL/dim {nlls[0]:.3f} -> "
          f"{nlls[-1]:.3f}; guidance 1 moves x by {gap:.3f}")
    assert err0 < 1e-4 and err1 < 1e-4
    assert nlls[-1] < nlls[0] - 0.25
    assert torch.isfinite(guided).all() and gap > 1e-3


def test_spline_config_errors():
    with pytest.raises(ConfigError, match=re.escape("flow.transform='rqs': a residual flow has no elementwise")):
        load_config({"flow": {"family": "resflow", "transform": "rqs"}})
    with pytest.raises(ConfigError, match=re.escape("set flow.glow.coupling to 'affine' (got 'additive')")):
        load_config({"flow": {"family": "glow", "transform": "rqs", "glow": {"coupling": "additive"}}})
    with pytest.raises(ConfigError, match=re.escape("flow.spline.bins must be > 0, got 0")):
        load_config({"flow": {"transform": "rqs", "spline": {"bins": 0}}})
    with pytest.raises(ConfigError, match="allowed values: 'affine', 'rqs'"):
        load_config({"flow": {"transform": "spline"}})
