"""Math of the forward flow and the reverse model (plain torch, seconds)."""

import pytest
import torch

from biflow.config import FlowConfig, ReverseConfig
from biflow.losses import bits_per_dim, cfg_combine, nll_per_dim, reverse_loss
from biflow.models import ReverseModel, TARFlow
from biflow.models.layers import patchify, unpatchify
from biflow.ema import EMA
from biflow.sampling import inpaint, sample_biflow, sample_exact, tweedie_denoise

pytestmark = pytest.mark.unit


TINY = dict(image_size=8, channels=2, patch_size=2, width=32, depth=2, num_blocks=4, num_heads=4, num_classes=5)


def randomise(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the zero-init heads would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def tiny_flow(dtype=torch.float32, **kw) -> TARFlow:
    torch.manual_seed(0)
    return randomise(TARFlow(FlowConfig(**{**TINY, **kw}))).to(dtype).eval()


def data(n=4, dtype=torch.float32, cfg=TINY, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg["channels"], cfg["image_size"], cfg["image_size"], generator=g).to(dtype)
    y = torch.randint(0, cfg["num_classes"], (n,), generator=g)
    return x, y


def test_patchify_roundtrip():
    x = torch.randn(3, 2, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 2, 8), x)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_inverse_of_forward(dtype, tol):
    flow = tiny_flow(dtype)
    x, y = data(dtype=dtype)
    out = flow(x, y)
    assert out.z.shape == x.shape and out.logdet.shape == (4,) and len(out.states) == TINY["num_blocks"] + 1
    assert out.logdet.abs().min() > 1e-3  # the randomised heads really transform
    x_rec = flow.inverse(out.z, y)
    assert (x_rec - x).abs().max().item() < tol
    for i, block in enumerate(flow.blocks):  # every block is invertible on its own
        tokens = flow.to_tokens(out.states[i])
        z_tok, _ = block(tokens, y)
        assert (block.inverse(z_tok, y) - tokens).abs().max().item() < tol


def test_logdet_matches_autograd_jacobian():
    cfg = dict(image_size=4, channels=1, patch_size=2, width=16, depth=1, num_blocks=2, num_heads=2, num_classes=3)
    flow = tiny_flow(torch.float64, **cfg)
    x, y = data(1, torch.float64, cfg)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x), y).z.flatten(), x.flatten())
    _, logabsdet = torch.linalg.slogdet(jac)
    assert abs(logabsdet.item() - flow(x, y).logdet.item()) < 1e-9


def test_causality_of_each_block():
    flow = tiny_flow()
    x, y = data(2)
    tokens = flow.to_tokens(x)
    n = tokens.shape[1]
    t = n // 2
    moved = tokens.clone()
    moved[:, t] += 1.0
    for block in flow.blocks:
        z0, _ = block(tokens, y)
        z1, _ = block(moved, y)
        changed = (z0 - z1).abs().amax(dim=(0, 2)) > 0
        order = range(n)[::-1] if block.reverse_order else range(n)
        before = [i for i in order][: list(order).index(t)]  # tokens decoded before t
        assert not changed[before].any(), "a token changed before the perturbed one"
        assert changed[t] and changed.sum() > 1  # t itself and later tokens move


def test_kv_cached_decode_equals_recompute():
    flow = tiny_flow(torch.float64)
    x, y = data(3, torch.float64)
    z = flow(x, y).z
    for w in (0.0, 1.5):
        cached = flow.inverse(z, y, guidance=w, use_cache=True)
        naive = flow.inverse(z, y, guidance=w, use_cache=False)
        assert (cached - naive).abs().max().item() < 1e-10


def test_guidance_zero_is_conditional_and_guidance_changes_output():
    flow = tiny_flow()
    x, y = data()
    z = flow(x, y).z
    assert torch.equal(flow.inverse(z, y, guidance=0.0), flow.inverse(z, y))
    assert (flow.inverse(z, y, guidance=2.0) - flow.inverse(z, y)).abs().max() > 1e-3


def test_tweedie_exact_on_gaussian():
    # A flow at initialisation is the identity, so p(x~) = N(0, I). If x ~ N(0, (1 - s^2) I)
    # and x~ = x + s * eps, then E[x | x~] = (1 - s^2) x~ exactly.
    flow = TARFlow(FlowConfig(**TINY)).double()
    x_noisy, y = data(dtype=torch.float64)
    s = 0.3
    assert torch.allclose(tweedie_denoise(flow, x_noisy, y, s), (1 - s**2) * x_noisy, atol=1e-12)


def test_identity_flow_bpd_is_gaussian_value():
    flow = TARFlow(FlowConfig(**TINY)).double()
    x, y = data(dtype=torch.float64)
    out = flow(x, y)
    assert out.logdet.abs().max() == 0
    expected = 0.5 * (x.flatten(1) ** 2).mean(1) + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    assert torch.allclose(nll_per_dim(out), expected)
    assert abs(bits_per_dim(0.0) - 7.0) < 1e-12  # log2(256 / 2): 8-bit data in [-1, 1]


def test_bf16_forward_keeps_fp32_logdet():
    flow = tiny_flow().to(torch.bfloat16)
    x, y = data(dtype=torch.bfloat16)
    out = flow(x, y)
    # states (z included) stay in fp32 between blocks: only the transformers run in bf16
    assert out.z.dtype == torch.float32 and out.logdet.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in out.states)
    assert torch.isfinite(out.logdet).all()
    ref = tiny_flow()(x.float(), y)
    assert (out.logdet - ref.logdet).abs().max() < 0.05 * ref.logdet.abs().max() + 0.05
    for s_bf16, s_ref in zip(out.states, ref.states):
        assert (s_bf16 - s_ref).abs().max() < 0.05 * s_ref.abs().max()
    back = flow.inverse(out.z.to(torch.bfloat16), y)
    assert back.dtype == torch.bfloat16


def test_cpu_bf16_autocast_states_and_inverse_match_fp32():
    """Under bf16 autocast (as the engines run on GPUs) the states passed between blocks
    are fp32 and close to an fp32 run, and the inverse recovers x."""
    flow = tiny_flow()
    x, y = data()
    with torch.no_grad():
        ref = flow(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = flow(x, y)
            back = flow.inverse(out.z, y)
    assert all(s.dtype == torch.float32 for s in out.states)
    for k, (s_amp, s_ref) in enumerate(zip(out.states, ref.states)):
        rel = ((s_amp - s_ref).norm() / s_ref.norm()).item()
        assert rel < 2e-2, (k, rel)
    assert back.dtype == torch.float32
    assert (back - x).abs().max().item() < 5e-2  # bf16 transformers, fp32 affine math
    assert (flow.inverse(ref.z, y) - x).abs().max().item() < 1e-4  # the fp32 inverse is exact


def tiny_pair(**rev_kw):
    flow = tiny_flow()
    for p in flow.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    rcfg = ReverseConfig(width=48, depth=4, num_heads=4, denoise_depth=1, **rev_kw)
    return flow, ReverseModel(rcfg, flow.config), rcfg


def test_reverse_shapes_and_segments():
    flow, rev, _ = tiny_pair()
    x, y = data(2)
    out = rev(flow(x, y).z, y, guidance=torch.tensor([0.0, 1.0]))
    assert out.x.shape == x.shape and len(out.states) == TINY["num_blocks"]
    assert rev.bounds == [1, 2, 3, 4]
    flow2, rev2, _ = tiny_pair(conditioning="tokens")
    assert rev2(flow2(x, y).z, y, guidance=0.5).x.shape == x.shape


def test_training_cfg_with_w_zero_is_conditional_target():
    guided, uncond = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(cfg_combine(guided, uncond, torch.zeros(3)), guided)
    w = torch.tensor([0.0, 1.0, 3.0])
    mixed = cfg_combine(guided, uncond, w)
    # the guided output of the usual CFG formula recovers the conditional state
    assert torch.allclose(mixed + w.view(-1, 1, 1, 1) * (mixed - uncond), guided, atol=1e-6)
    # with guidance_max = 0 the loss never runs the unconditional stream
    flow, rev, rcfg = tiny_pair(guidance_max=0.0)
    x, y = data(2)
    calls = []
    rev.register_forward_hook(lambda *a: calls.append(1))
    reverse_loss(rev, flow, x, y, rcfg, flow.config)
    assert len(calls) == 1
    rcfg.guidance_max = 2.0
    reverse_loss(rev, flow, x, y, rcfg, flow.config)
    assert len(calls) == 3


def test_samplers_and_inpainting_shapes():
    flow, rev, _ = tiny_pair()
    x, y = data(2)
    g = torch.Generator().manual_seed(0)
    assert sample_biflow(rev, y, guidance=1.0, generator=g).shape == x.shape
    assert sample_exact(flow, y, guidance=1.0, generator=g).shape == x.shape
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    out = inpaint(flow, rev, x, mask, y)
    assert torch.equal(out[..., :4], x[..., :4]) and not torch.equal(out[..., 4:], x[..., 4:])


def test_ema_tracks_and_copies():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # first update: decay ramps to min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.full_state_dict()["weight"], w0 + 0.9)
    copy = ema.model_copy()
    assert torch.allclose(copy.weight, w0 + 0.9) and not copy.training
    assert torch.allclose(model.weight, w0 + 1.0)  # the live model is untouched


@pytest.mark.parametrize("size,target_flow,target_rev", [("B/2", 120e6, 133e6)])
def test_size_registry_parameter_counts(size, target_flow, target_rev):
    fcfg = FlowConfig.from_size(size, image_size=32, channels=4, num_classes=1000)
    flow_params = sum(p.numel() for p in TARFlow(fcfg).parameters())
    rev_params = sum(p.numel() for p in ReverseModel(ReverseConfig.from_size(size), fcfg).parameters())
    assert abs(flow_params / target_flow - 1) < 0.10, flow_params
    assert abs(rev_params / target_rev - 1) < 0.10, rev_params


# --- issue 15: norm control that binds, the guidance distribution, the alignment sum ------------


def _grad(rev, flow, x, y, rcfg):
    rev.zero_grad()
    loss, _ = reverse_loss(rev, flow, x, y, rcfg, flow.config, generator=torch.Generator().manual_seed(3))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in rev.parameters() if p.grad is not None])


def test_reverse_norm_control_changes_the_gradient():
    flow, rev, rcfg = tiny_pair()
    randomise(rev, std=0.05, seed=4)
    x, y = data(8)
    g_on = _grad(rev, flow, x, y, rcfg)
    rcfg.norm_control = False
    g_off = _grad(rev, flow, x, y, rcfg)
    cos = torch.nn.functional.cosine_similarity(g_on, g_off, dim=0).item()
    # dividing by a stop-gradient target RMS gave cos 0.9999998 (the adaptive weight undid it)
    assert cos < 0.98, cos


def test_forward_norm_control_bounds_mu_and_alpha():
    flow = tiny_flow(clip=1.5)
    x, y = data(4)
    out = flow(x, y)  # the soft clip keeps the block exactly invertible
    assert (flow.inverse(out.z, y) - x).abs().max().item() < 1e-4
    with torch.no_grad():  # heads far larger than training ever makes them
        for block in flow.blocks:
            block.proj_out.weight.normal_(0, 5.0)
    block = flow.blocks[0]
    h = torch.randn(4, 16, TINY["width"]) * 10
    mu, alpha = block.affine_params(h, torch.float32)
    assert mu.abs().max() <= 1.5 and alpha.abs().max() <= 1.5 and mu.abs().max() > 1.0
    logdet_on = flow(x, y).logdet
    assert logdet_on.abs().max() <= 1.5 * x[0].numel()
    flow.config.clip = 0.0  # the ablation switch: the same weights, unbounded
    mu_off, alpha_off = block.affine_params(h, torch.float32)
    assert mu_off.abs().max() > 5 * 1.5 and alpha_off.abs().max() > 5 * 1.5
    assert not torch.allclose(flow(x, y).logdet, logdet_on)


def test_guidance_distribution_mass_at_zero_shape_and_warm_start():
    from biflow.losses import guidance_ceiling, sample_guidance

    g = torch.Generator().manual_seed(0)
    y = torch.zeros(20000, dtype=torch.long)
    null = torch.randperm(20000, generator=g)[:2000]
    y[null] = 5  # null-class rows, at random places as label dropping puts them
    w = sample_guidance(y, 2.0, 5, len(y), torch.device("cpu"), g, p_zero=0.5, shape=2.0)
    assert (w[null] == 0).all()
    cond = w[y != 5]
    assert (cond == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # w = 2 u^2 on the rest: mean 2/3
    assert cond[cond > 0].mean().item() == pytest.approx(2 / 3, abs=0.03) and cond.max() <= 2.0
    rcfg = ReverseConfig(guidance_max=2.0, guidance_warmup_steps=100)
    assert [guidance_ceiling(rcfg, s) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]


def test_unconditional_pass_runs_only_on_guided_rows():
    """... on the leading slice of rows that may be guided (round(16 * (1 - 0.75)) = 4 rows; a
    slice the host knows the size of, so no host sync)."""
    flow, rev, rcfg = tiny_pair(guidance_max=2.0, guidance_p_zero=0.75)
    x, y = data(16)
    rows = []
    rev.register_forward_hook(lambda m, args, kw, out: rows.append(args[0].shape[0]), with_kwargs=True)
    _, metrics = reverse_loss(rev, flow, x, y, rcfg, flow.config, generator=torch.Generator().manual_seed(0))
    assert rows[0] == 16 and len(rows) == 2 and rows[1] == 4
    assert 0 < metrics["guided_rows"] <= rows[1] / 16  # the label-dropped ones among them are not guided
    rcfg.guidance_warmup_steps = 10  # at step 0 of the warm start nothing is guided
    rows.clear()
    reverse_loss(rev, flow, x, y, rcfg, flow.config, step=0)
    assert rows == [16]


def test_alignment_sum_is_num_blocks_times_mean():
    flow, rev, rcfg = tiny_pair(denoise_weight=0.0)
    x, y = data(4)
    losses = {}
    for reduce in ("sum", "mean"):
        rcfg.align_reduce = reduce
        losses[reduce], _ = reverse_loss(rev, flow, x, y, rcfg, flow.config, generator=torch.Generator().manual_seed(0))
    assert losses["sum"].item() == pytest.approx(TINY["num_blocks"] * losses["mean"].item(), rel=1e-5)


def test_exact_sampler_annealed_guidance_and_nan_resampling():
    flow = tiny_flow()
    x, y = data(3)
    z = flow(x, y).z
    plain = sample_exact(flow, y, guidance=1.5, z=z, tweedie=False)
    annealed = sample_exact(flow, y, guidance=1.5, z=z, tweedie=False, annealed=True)
    unguided = sample_exact(flow, y, guidance=0.0, z=z, tweedie=False)
    assert not torch.allclose(annealed, plain) and not torch.allclose(annealed, unguided)
    # annealed w is (t + 1) / (N - 1) * w: its first decode step is milder than the plain one
    assert (annealed - unguided).abs().mean() < (plain - unguided).abs().mean()
    z_bad = z.clone()
    z_bad[1, 0, 0, 0] = float("nan")  # a row that decodes to NaN is drawn again
    out = sample_exact(flow, y, z=z_bad, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[[0, 2]], sample_exact(flow, y, z=z)[[0, 2]], atol=1e-5)
    kept = sample_exact(flow, y, z=z_bad, resample_tries=0)
    assert not torch.isfinite(kept[1]).all() and torch.isfinite(kept[[0, 2]]).all()


def test_inference_time_cfg_sampler_and_tweedie_denoise_target():
    from biflow.sampling import sample_biflow_cfg

    flow, rev, rcfg = tiny_pair()
    randomise(rev, std=0.05, seed=5)
    x, y = data(3)
    z = flow(x, y).z
    assert torch.allclose(sample_biflow_cfg(rev, y, 0.0, z=z), sample_biflow(rev, y, 0.0, z=z))
    cond = sample_biflow(rev, y, 0.0, z=z)
    uncond = sample_biflow(rev, torch.full_like(y, TINY["num_classes"]), 0.0, z=z)
    assert torch.allclose(sample_biflow_cfg(rev, y, 1.5, z=z), cond + 1.5 * (cond - uncond), atol=1e-6)
    # tweedie ablation: G's output is supervised with the noisy x~ (F's input), not the clean x
    rcfg.denoise, rcfg.align_weight = "tweedie", 0.0
    g = torch.Generator().manual_seed(7)
    loss, m = reverse_loss(rev, flow, x, y, rcfg, flow.config, generator=g)
    x_noisy = x + flow.config.noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    out = rev(flow(x_noisy, y).z, y)
    mse = (out.x - x_noisy).pow(2).flatten(1).mean(1)
    assert m["denoise_mse"] == pytest.approx(mse.mean().item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["token", "lowrank", "dense"])
def test_z_skip_starts_at_zero_and_fits_a_linear_map(kind):
    """The skip adds nothing at initialisation (G starts as without it), and alone it learns a
    linear map from z to x (a per-token one for ``token``, any one for ``dense``)."""
    from biflow.models.reverse import ZSkip

    torch.manual_seed(0)
    flow, rev, rcfg = tiny_pair()
    x, y = data(4)
    z = flow(x, y).z
    rcfg.z_skip = kind
    with_skip = ReverseModel(rcfg, flow.config)
    with_skip.load_state_dict(rev.state_dict(), strict=False)
    assert torch.allclose(with_skip(z, y).x, rev(z, y).x, atol=1e-6)
    n, d = flow.config.num_tokens, flow.config.token_dim
    skip = ZSkip(kind, n, d, rank=8)
    target = torch.randn(n, d, d) * 0.3  # a per-token map: every kind can express it
    opt = torch.optim.Adam(skip.parameters(), lr=2e-2)
    tokens = torch.randn(256, n, d)
    want = torch.einsum("bnd,nde->bne", tokens, target)
    first = (skip(tokens) - want).pow(2).mean().item()
    for _ in range(300):
        opt.zero_grad()
        loss = (skip(tokens) - want).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_curriculum_switches_guidance_and_perceptual_on_late():
    from biflow.config import PerceptualConfig
    from biflow.perceptual import build_feature_net

    fcfg = FlowConfig(image_size=16, channels=1, patch_size=4, width=16, depth=1, num_blocks=2, num_heads=2,
                      num_classes=10, label_drop=0.0)
    rcfg = ReverseConfig(width=16, depth=2, num_heads=2, guidance_max=2.0, guidance_p_zero=0.0, perceptual_weight=1.0,
                         guidance_start=0.5, perceptual_start=0.8, perceptual=PerceptualConfig(taps=["conv_2"]))
    flow, rev = TARFlow(fcfg).requires_grad_(False), ReverseModel(rcfg, fcfg)
    net = build_feature_net(rcfg.perceptual)  # the real FID-Inception, stopped at its first tap
    calls = []
    features = net.features
    net.features = lambda img: (calls.append(img.shape[0]), features(img))[1]
    x, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10
    rows = []
    hook = rev.register_forward_hook(lambda m, args, kw, out: rows.append(args[0].shape[0]), with_kwargs=True)
    _, early = reverse_loss(rev, flow, x, y, rcfg, flow.config, feature_net=net, progress=0.2)
    assert rows == [8] and early["guided_rows"] == 0.0 and "perceptual" not in early and calls == []
    rows.clear()
    _, mid = reverse_loss(rev, flow, x, y, rcfg, flow.config, feature_net=net, progress=0.6)
    assert len(rows) == 2 and mid["guided_rows"] > 0 and "perceptual" not in mid
    _, late = reverse_loss(rev, flow, x, y, rcfg, flow.config, feature_net=net, progress=0.9)
    assert "perceptual" in late and calls
    hook.remove()
    with pytest.raises(Exception, match=r"reverse.guidance_start must be in \[0, 1\]"):
        ReverseConfig(guidance_start=1.5).validate()


@pytest.mark.parametrize("kind", ["token", "dense"])
def test_z_skip_ridge_fit_recovers_a_linear_map(kind):
    """``reverse.z_skip_init: ridge``: the skip is set to the least-squares map from z to the
    target; with the ViT's output zero-initialised, G then starts as that map."""
    torch.manual_seed(0)
    flow, _, rcfg = tiny_pair()
    rcfg.z_skip = kind
    rev = ReverseModel(rcfg, flow.config)
    n, d = flow.config.num_tokens, flow.config.token_dim
    true = torch.randn(n, d, d) * 0.3  # a per-token map (dense can express it too), plus a bias
    bias = torch.randn(n, d) * 0.1

    def target(z):
        return unpatchify(torch.einsum("bnd,nde->bne", patchify(z, 2), true) + bias, 2, 2, 8)

    batches = [torch.randn(256, 2, 8, 8) for _ in range(4)]
    sums = []
    rows = rev.fit_z_skip(((z, target(z)) for z in batches), reduce=lambda t: (sums.append(t.shape), t * 1)[1])
    assert rows == 1024 and len(sums) == 2  # both statistics went through the (all-)reduce
    z = torch.randn(8, 2, 8, 8)
    y = torch.arange(8) % 5
    torch.testing.assert_close(rev(z, y).x, target(z), atol=1e-2, rtol=0)  # G(z) = the (ridge-shrunk) map at step 0
    with pytest.raises(ValueError, match="z_skip is none"):
        ReverseModel(ReverseConfig(width=48, depth=4, num_heads=4), flow.config).fit_z_skip([])


def test_bf16_autocast_residual_stream_is_bf16_and_states_fp32():
    """Under autocast the transformer layers see a bf16 residual stream (the fp32 position and
    condition tables must not promote it), while the flow's states and both outputs stay fp32."""
    cfg = FlowConfig(**TINY)
    flow, rev = TARFlow(cfg), ReverseModel(ReverseConfig(width=32, depth=4, num_heads=4), cfg)
    seen = []
    for layer in (flow.blocks[0].layers[0], flow.blocks[-1].layers[-1], rev.layers[0], rev.layers[-1]):
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow(x, y)
        back = rev(out.z, y, guidance=torch.ones(3))
    assert seen == [torch.bfloat16] * 4
    assert {s.dtype for s in out.states} == {torch.float32} and out.z.dtype == out.logdet.dtype == torch.float32
    assert back.x.dtype == torch.float32 and {s.dtype for s in back.states} == {torch.float32}


def test_tarflow_follows_the_forward_flow_protocol():
    """TARFlow, the first family: per-block log-dets sum to the total, every state has its declared
    (data-layout) shape, block costs sum to 1, trajectory() gives forward's states, and a config
    written before flow.family existed builds a TARFlow."""
    from biflow.config import load_config
    from biflow.models import ForwardFlow, build_flow

    torch.manual_seed(0)
    flow = randomise(TARFlow(FlowConfig(**TINY)))
    assert isinstance(flow, ForwardFlow) and flow.family == "tarflow"
    x, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 4])
    out = flow(x, y)
    assert len(out.block_logdets) == TINY["num_blocks"] and out.masks is None
    assert torch.allclose(torch.stack(out.block_logdets).sum(0), out.logdet, atol=1e-5)
    assert [tuple(s.shape[1:]) for s in out.states] == flow.state_shapes()
    assert abs(sum(flow.block_costs()) - 1) < 1e-9 and len(flow.block_costs()) == TINY["num_blocks"]
    for a, b in zip(out.states, flow.trajectory(x, y).states):
        assert torch.equal(a, b)
    old = load_config({"flow": dict(TINY)}).flow  # no family key: an old checkpoint's config
    assert old.family == "tarflow" and type(build_flow(old)) is TARFlow


def test_reverse_model_has_its_own_patch_size():
    """reverse.patch_size (0 = the flow's): G tokenises on its own, every state keeps the data layout."""
    from biflow.config import ConfigError

    fcfg = FlowConfig(**TINY)
    for p, tokens in ((0, 16), (4, 4)):
        rev = ReverseModel(ReverseConfig(width=32, depth=4, num_heads=4, patch_size=p), fcfg)
        assert rev.pos_embed.shape[1] == tokens
        out = rev(torch.randn(2, 2, 8, 8), torch.tensor([0, 1]), guidance=0.0)
        assert out.x.shape == (2, 2, 8, 8) and all(s.shape == (2, 2, 8, 8) for s in out.states)
    with pytest.raises(ConfigError, match="reverse.patch_size=3 does not divide flow.image_size=8"):
        ReverseModel(ReverseConfig(width=32, depth=4, num_heads=4, patch_size=3), fcfg)
