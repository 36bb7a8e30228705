"""Glow forward family: squeeze layout, exact inverse, log-det against autograd, states and
masks in the data layout, actnorm data init (checkpoints, guidance, 2 Ray workers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biflow.config import ConfigError, FlowConfig, GlowConfig, load_config
from biflow.models import build_flow
from biflow.models.glow import ActNorm, Glow, squeeze, unsqueeze
from tests.test_models import randomise  # non-zero weights everywhere (zero-init couplings are identities)

pytestmark = pytest.mark.unit

COND = dict(family="glow", image_size=28, channels=1, num_blocks=4, num_classes=10)  # Fashion-MNIST shaped
SMALL = dict(family="glow", image_size=8, channels=1, num_blocks=4, num_classes=3)  # 64 dims: exact Jacobians


def glow(levels=2, hidden=32, coupling="affine", seed=0, **kw) -> Glow:
    torch.manual_seed(seed)
    return Glow(FlowConfig(**{**COND, **kw}, glow=GlowConfig(levels=levels, hidden=hidden, coupling=coupling)))


def data(n=8, c=1, size=28, classes=10, seed=1, dtype=torch.float32):
    """Smooth class patterns plus noise, in about [-1, 1]: structure a flow can learn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    base = F.avg_pool2d(torch.randn(classes, c, size, size, generator=g), 7, stride=1, padding=3) * 4
    x = (base[y] + 0.1 * torch.randn(n, c, size, size, generator=g)).clamp(-1, 1)
    return x.to(dtype), y


def actnorm_params(model: Glow) -> torch.Tensor:
    return torch.cat([torch.cat([a.bias.flatten(), a.logs.flatten()]) for a in model.actnorms()])


def roundtrip_error(model: Glow, x, y) -> float:
    with torch.no_grad():
        z = model(x, y).z
    return (model.inverse(z, y) - x).abs().max().item()


def test_squeeze_layout_and_unsqueeze_inverts_it():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 2, 4, 4)
    s = squeeze(x)
    assert s.shape == (1, 8, 2, 2)
    # channel 4c + 2i + j holds pixel (2h + i, 2w + j) of channel c
    assert s[0, 0].tolist() == [[0, 2], [8, 10]] and s[0, 1].tolist() == [[1, 3], [9, 11]]
    assert s[0, 2].tolist() == [[4, 6], [12, 14]] and s[0, 7].tolist() == [[21, 23], [29, 31]]
    x = torch.randn(3, 5, 8, 6)
    assert torch.equal(unsqueeze(squeeze(x)), x) and torch.equal(squeeze(unsqueeze(squeeze(x))), squeeze(x))


def test_roundtrip_at_init_and_after_training():
    model = glow()
    x, y = data(16)
    model.data_init(x, y)
    assert all(bool(a.initialized) for a in model.actnorms())
    assert actnorm_params(model).abs().max() > 0.1  # the data init moved actnorm off the identity
    assert roundtrip_error(model, x, y) < 1e-4

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nlls = []
    for _ in range(60):
        loss = -model.log_prob(x, y).mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nlls.append(loss.item())
    assert nlls[-1] < 0.9 * nlls[0] and nlls[-1] < nlls[0] - 0.25, (nlls[0], nlls[-1])
    model.eval()
    assert roundtrip_error(model, x, y) < 1e-4
    x2, y2 = data(4, seed=7)  # also off the training batch
    assert roundtrip_error(model, x2, y2) < 1e-4


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_roundtrip_randomised_couplings(coupling):
    model = randomise(glow(levels=2, hidden=16, coupling=coupling, num_classes=0, channels=3, image_size=16))
    x = torch.randn(4, 3, 16, 16)
    model.data_init(x)
    assert roundtrip_error(model, x, None) < 1e-4
    out = model(x)
    if coupling == "additive":  # volume changes only in actnorm and the 1x1 convolutions: the same for all x
        assert torch.allclose(out.logdet, out.logdet[0].expand(4))


@pytest.mark.parametrize("levels,num_blocks", [(1, 2), (2, 4), (2, 2)])
def test_logdet_matches_autograd_jacobian(levels, num_blocks):
    torch.manual_seed(0)
    cfg = FlowConfig(**{**SMALL, "num_blocks": num_blocks}, glow=GlowConfig(levels=levels, hidden=8))
    model = randomise(Glow(cfg), std=0.1).double().eval()
    x, y = data(2, size=8, classes=3, dtype=torch.float64)
    out = model(x, y)
    assert out.logdet.dtype == torch.float64 and all(s.dtype == torch.float64 for s in out.states)
    for i in range(2):
        fn = lambda v: model(v.view(1, 1, 8, 8), y[i : i + 1]).z.flatten()  # noqa: E731
        jac = torch.autograd.functional.jacobian(fn, x[i].flatten(), vectorize=True)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0 and abs(out.logdet[i].item() - logabsdet.item()) < 1e-8
        assert abs(logabsdet.item()) > 1.0  # a real volume change, not a near-identity map


@pytest.mark.parametrize("channels,size,levels,num_blocks", [(1, 8, 2, 4), (3, 16, 3, 3), (2, 8, 1, 2)])
def test_states_and_masks_in_data_layout(channels, size, levels, num_blocks):
    model = randomise(glow(levels=levels, hidden=8, channels=channels, image_size=size, num_blocks=num_blocks,
                           num_classes=0)).eval()
    x = torch.randn(3, channels, size, size)
    out = model(x)
    shapes = model.state_shapes()
    assert len(out.states) == len(out.masks) == len(shapes) == num_blocks + 1 == len(model.blocks) + 1
    assert torch.equal(out.states[0], x) and out.states[-1] is out.z
    assert all(s.shape == (3, *shape) for s, shape in zip(out.states, shapes))
    dims, per_level = channels * size * size, num_blocks // levels
    for k, mask in enumerate(out.masks):
        splits = sum(1 for level in range(levels - 1) if (level + 1) * per_level <= k)  # splits done by state k
        assert mask.shape == shapes[k] and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum().item() == dims / 2**splits
        frozen = (mask == 0).expand_as(x)
        assert torch.equal(out.states[k][frozen], out.z[frozen])  # factored out: already final
        if k < num_blocks:
            assert torch.equal(out.states[k + 1][frozen], out.states[k][frozen])
            assert (out.states[k + 1] - out.states[k]).abs().amax(0)[mask > 0].min() > 0  # active dims move
            assert bool((out.masks[k + 1] <= mask).all())
    assert out.masks[-1].sum().item() == dims / 2 ** (levels - 1)
    assert x.flatten(1).norm(dim=1).sub(out.z.flatten(1).norm(dim=1)).abs().max() > 1e-3  # z is not x


def test_block_logdets_sum_to_total():
    model = randomise(glow())
    x, y = data(4)
    model.data_init(x, y)
    out = model(x, y)
    assert len(out.block_logdets) == 4 and all(ld.shape == (4,) for ld in out.block_logdets)
    assert (sum(out.block_logdets) - out.logdet).abs().max().item() < 1e-5
    assert min(ld.abs().min().item() for ld in out.block_logdets) > 1e-3  # every step changes volume


def test_checkpoint_roundtrip_keeps_data_init():
    model = randomise(glow(), seed=3)
    x, y = data(8)
    model.train()
    model(x, y)  # the lazy data init
    assert all(bool(a.initialized) for a in model.actnorms())
    state = model.state_dict()
    assert all(f"blocks.{i}.actnorm.initialized" in state for i in range(4))

    fresh = glow(seed=5)  # other weights, actnorms not initialised
    fresh.load_state_dict(state, strict=True)
    assert all(a.initialized.item() == 1 for a in fresh.actnorms())
    fresh.train()
    x2, y2 = data(8, seed=9)  # a different batch: a data init would move the actnorms
    a, b = model(x2, y2), fresh(x2, y2)
    assert torch.equal(a.z, b.z) and torch.equal(a.logdet, b.logdet)
    assert torch.equal(actnorm_params(fresh), actnorm_params(model))

    # an uninitialised state dict loaded over an initialised model: the next training step initialises
    fresh.load_state_dict(glow(seed=6).state_dict())
    assert actnorm_params(fresh).abs().max() == 0
    fresh.eval()
    fresh(x2, y2)  # eval mode never initialises
    assert actnorm_params(fresh).abs().max() == 0
    fresh.train()
    fresh(x2, y2)
    assert actnorm_params(fresh).abs().max() > 0.1 and all(bool(n.initialized) for n in fresh.actnorms())


def test_guidance_mixes_conditional_and_null_couplings():
    model = randomise(glow(), std=0.05)
    x, y = data(4)
    model.data_init(x, y)
    model.eval()
    with torch.no_grad():
        z = model(x, y).z
    exact = model.inverse(z, y)
    assert model.inverse_stats == {}
    assert (model.inverse(z, y, guidance=0.0, annealed=True, use_cache=True) - x).abs().max().item() < 1e-4
    guided = model.inverse(z, y, guidance=1.0)
    assert torch.isfinite(guided).all() and (guided - exact).abs().max().item() > 1e-3
    null = torch.full_like(y, 10)  # for the null label p_c = p_u: guidance changes nothing
    assert (model.inverse(z, null, guidance=3.0) - model.inverse(z, null)).abs().max().item() < 1e-6
    assert torch.equal(model.inverse(z, None, guidance=1.0), model.inverse(z, None))  # no label: no guidance


def test_build_flow_and_config_errors():
    cfg = load_config({"flow": {**SMALL, "glow": {"levels": 2, "hidden": 16, "coupling": "additive"}}}).flow
    model = build_flow(cfg)
    assert isinstance(model, Glow) and model.family == "glow" and len(model.blocks) == 4
    assert model.blocks[0].coupling.affine is False and model.blocks[2].actnorm.bias.shape[1] == 8
    costs = model.block_costs()
    assert len(costs) == 4 and abs(sum(costs) - 1) < 1e-9
    assert isinstance(model.blocks[0].actnorm, ActNorm)
    with pytest.raises(ConfigError, match=r"flow\.glow\.levels=3 does not divide flow\.num_blocks=4"):
        load_config({"flow": {**SMALL, "glow": {"levels": 3}}})
    with pytest.raises(ConfigError, match=r"flow\.glow\.levels=3: flow\.image_size=12 must divide by 2\^3"):
        Glow(FlowConfig(**{**SMALL, "image_size": 12, "num_blocks": 3}, glow=GlowConfig(levels=3)))
    with pytest.raises(ValueError, match=r"expects \(B, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 16, 16))


@pytest.mark.integration
def test_actnorm_init_on_two_ray_workers_matches_rank0(ray_local, tmp_path):
    """Each worker inits on its own batch; the broadcast leaves both with rank 0's init."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = dict(SMALL, num_blocks=2)

    def build_and_init(flow_cfg: dict, seed: int):  # closures: pickled by value for the workers
        import torch

        from biflow.config import FlowConfig, GlowConfig
        from biflow.models.glow import Glow

        torch.manual_seed(0)
        model = Glow(FlowConfig(**flow_cfg, glow=GlowConfig(levels=2, hidden=8)))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 1, 8, 8, generator=g) * (1 + seed % 7) + seed % 5
        model.data_init(x, torch.randint(0, 3, (8,), generator=g))
        return torch.cat([torch.cat([a.bias.flatten(), a.logs.flatten()]) for a in model.actnorms()])

    def worker(config):
        import ray.train
        import torch

        torch.set_num_threads(1)
        rank = ray.train.get_context().get_world_rank()
        torch.save(build_and_init(config["flow"], 100 + rank), f"{config['out']}/rank{rank}.pt")

    TorchTrainer(worker, train_loop_config={"flow": cfg, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(name="glow-actnorm-init", storage_path=str(tmp_path / "ray"))).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = build_and_init(cfg, 100)
    assert max((r - single).abs().max().item() for r in ranks) < 1e-6
    assert (build_and_init(cfg, 101) - single).abs().max().item() > 1e-3  # without the broadcast they differ
