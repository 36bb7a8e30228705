"""Perceptual feature networks: distance properties, gradients, paired crops,
and the local-weights loaders (random weights saved and loaded back)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch

from biflow.config import PerceptualConfig
from biflow.errors import UserError
from biflow.perceptual import (
    ConvNeXtV2Features,
    InceptionFeatures,
    VGG16Features,
    build_feature_net,
    load_fid_inception,
    paired_random_crop,
    perceptual_distance,
    prepare_images as prepare,
)


pytestmark = pytest.mark.integration  # the feature networks (FID-Inception on CPU): tens of seconds per test


def smooth_images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Blobby images in [-1, 1]: low-frequency structure, like real pictures."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 7, 7, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    net = build_feature_net(PerceptualConfig(network="inception", resize=75))
    assert isinstance(net, InceptionFeatures)
    return net


def test_identical_inputs_give_zero(inception):
    x = smooth_images(4)
    d = perceptual_distance(inception, x.clone(), x)
    assert d.shape == (4,)
    assert d.abs().max().item() < 1e-6


def test_distance_grows_with_noise(inception):
    x = smooth_images(8, seed=1)
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(x.shape, generator=g)
    means = [perceptual_distance(inception, x + s * eps, x).mean().item() for s in (0.05, 0.2, 0.6)]
    assert means[0] > 0
    assert means[0] < means[1] < means[2], means
    assert means[2] > 2 * means[0]


def test_differentiable_wrt_input_only(inception):
    x = smooth_images(3, seed=3)
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    inception.train()  # a parent's .train() must not unfreeze it
    assert not inception.training
    perceptual_distance(inception, x_hat, x).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()
    assert x_hat.grad.abs().sum().item() > 0
    assert all(not p.requires_grad and p.grad is None for p in inception.parameters())


def test_multistage_pool_equals_fid_vector(inception):
    x = smooth_images(2, size=299, channels=3, seed=4)
    with torch.no_grad():
        ref = load_fid_inception()(x)
        pool = inception.pool(x)
    assert len(inception.features(x)) == 5
    assert torch.allclose(pool, ref, atol=1e-4), (pool - ref).abs().max()


def test_crops_are_paired():
    x = smooth_images(6, size=32, channels=3, seed=5)
    x_hat = x + 0.3
    ch, cx = paired_random_crop(x_hat, x, crop=0.5, generator=torch.Generator().manual_seed(0))
    assert ch.shape == cx.shape == (6, 3, 16, 16)
    assert torch.allclose(ch, cx + 0.3)  # same box in both
    # each crop is a real window of its own image, and boxes differ across samples
    offsets = set()
    for b in range(6):
        hits = [(i, j) for i in range(17) for j in range(17) if torch.equal(x[b, :, i:i + 16, j:j + 16], cx[b])]
        assert hits, f"sample {b}: crop is not a window of the image"
        offsets.add(hits[0])
    assert len(offsets) > 1


def test_cropped_distance_zero_for_identical_and_seeded(inception):
    x = smooth_images(4, size=64, seed=6)
    assert perceptual_distance(inception, x.clone(), x, crop=0.5).abs().max() < 1e-6
    y = x + 0.2 * torch.randn_like(x)
    d1 = perceptual_distance(inception, y, x, crop=0.5, generator=torch.Generator().manual_seed(7))
    d2 = perceptual_distance(inception, y, x, crop=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(d1, d2)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 28, 28), (2, 1, 40, 24)])
def test_any_image_size(inception, shape):
    x = torch.rand(shape) * 2 - 1
    d = perceptual_distance(inception, x.flip(0), x, crop=0.5)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()


def test_too_small_or_wrong_channels(inception):
    with pytest.raises(ValueError, match="at least 8"):
        perceptual_distance(inception, torch.zeros(1, 1, 7, 7), torch.zeros(1, 1, 7, 7))
    with pytest.raises(ValueError, match="decode latents"):
        perceptual_distance(inception, torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16))


def test_inception_net_pickles(inception):
    clone = pickle.loads(pickle.dumps(inception))
    x = smooth_images(1, seed=8)
    with torch.no_grad():
        assert torch.allclose(clone.pool(torch.zeros(1, 3, 75, 75)), inception.pool(torch.zeros(1, 3, 75, 75)))
    assert perceptual_distance(clone, x, x).item() < 1e-6


def test_none_and_config_errors(tmp_path):
    assert build_feature_net(PerceptualConfig(network="none")) is None
    with pytest.raises(UserError, match="resize=32 is too small for inception"):
        build_feature_net(PerceptualConfig(network="inception", resize=32))
    for network in ("vgg", "convnext"):
        with pytest.raises(UserError, match="weights_path"):
            build_feature_net(PerceptualConfig(network=network))
        missing = tmp_path / f"{network}.pth"
        with pytest.raises(UserError, match=re.escape(str(missing))):
            build_feature_net(PerceptualConfig(network=network, weights_path=str(missing)))


# ---------------------------------------------------------------------------
# Local-weights loaders (real loader, random weights)
# ---------------------------------------------------------------------------


def randomise(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def vgg_checkpoint(path, seed=0):
    net = VGG16Features(PerceptualConfig())
    randomise(net, seed)
    state = {k.replace("features_.", "features.", 1): v for k, v in net.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision checkpoints carry the head too
    torch.save(state, path)
    return net


def test_vgg_loads_torchvision_keys(tmp_path):
    path = tmp_path / "vgg16.pth"
    ref = vgg_checkpoint(path)
    assert "features.28.weight" in torch.load(path)
    net = build_feature_net(PerceptualConfig(network="vgg", weights_path=str(path), resize=32))
    assert isinstance(net, VGG16Features)
    for (k, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    x = smooth_images(2, size=28, channels=3, seed=9)
    feats = net.features(torch.nn.functional.interpolate(x, size=32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]
    assert perceptual_distance(net, x.clone(), x).abs().max() < 1e-6
    assert (perceptual_distance(net, x + 0.3 * torch.randn_like(x), x) > 0).all()


def test_vgg_mismatched_file_names_path(tmp_path):
    conv = ConvNeXtV2Features.from_size(PerceptualConfig(), "atto")
    wrong = tmp_path / "convnext_atto.pth"
    torch.save(conv.state_dict(), wrong)
    with pytest.raises(UserError, match=re.escape(str(wrong)) + ".*missing keys features.0.weight"):
        build_feature_net(PerceptualConfig(network="vgg", weights_path=str(wrong)))
    bad = tmp_path / "vgg_bad.pth"
    vgg_checkpoint(bad)
    state = torch.load(bad)
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(state, bad)
    with pytest.raises(UserError, match=re.escape(str(bad)) + ".*shape mismatch features.0.weight"):
        build_feature_net(PerceptualConfig(network="vgg", weights_path=str(bad)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=re.escape(str(junk))):
        build_feature_net(PerceptualConfig(network="vgg", weights_path=str(junk)))


def to_facebook_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm -> facebookresearch/ConvNeXt-V2 names (the inverse of the loader's remap)."""
    out = {}
    for k, v in state.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)\.", r"downsample_layers.\1.\2.", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "mlp.grn." in k:
            k = k.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
            v = v.reshape(1, 1, 1, -1)
        out[k] = v
    return out


@pytest.mark.parametrize("naming", ["timm", "facebook"])
def test_convnext_loads_and_infers_size(tmp_path, naming):
    ref = ConvNeXtV2Features.from_size(PerceptualConfig(), "atto")
    randomise(ref, seed=1)
    state = dict(ref.state_dict())
    assert {"stem.0.weight", "stages.1.downsample.1.weight", "stages.2.blocks.5.mlp.grn.weight"} <= set(state)
    state["head.fc.weight"] = torch.zeros(10, 320)
    if naming == "facebook":
        state = {"model": to_facebook_names(state)}
        assert "downsample_layers.0.0.weight" in state["model"]
    path = tmp_path / f"convnextv2_atto_{naming}.pt"
    torch.save(state, path)
    net = build_feature_net(PerceptualConfig(network="convnext", weights_path=str(path), resize=64))
    assert isinstance(net, ConvNeXtV2Features)
    assert net.depths == (2, 2, 6, 2) and net.dims == (40, 80, 160, 320)
    x = smooth_images(2, size=64, channels=3, seed=10)
    with torch.no_grad():
        for a, b in zip(ref.features(x), net.features(x)):
            assert torch.allclose(a, b, atol=1e-6)
    x_hat = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    d = perceptual_distance(net, x_hat, x, crop=0.75)
    d.sum().backward()
    assert (d > 0).all() and x_hat.grad.abs().sum() > 0


def test_convnext_mismatched_file_names_path(tmp_path):
    path = tmp_path / "vgg_as_convnext.pth"
    vgg_checkpoint(path)
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*ConvNeXt-V2.*missing keys stem.0.weight"):
        build_feature_net(PerceptualConfig(network="convnext", weights_path=str(path)))


# --- issue 15: an affordable perceptual term --------------------------------------------------


def test_taps_are_a_field_and_shallow_taps_stop_the_net_early(inception):
    shallow = build_feature_net(PerceptualConfig(network="inception", taps=["conv_4", "conv_2"]))
    assert shallow.taps == ("conv_2", "conv_4") and len(shallow.stages) < len(inception.stages)
    x = smooth_images(2, size=28, seed=3)
    with torch.no_grad():
        feats = shallow.features(prepare(x, 75))
    assert [f.shape[1] for f in feats] == [64, 192]
    assert perceptual_distance(shallow, x, x).max().item() < 1e-6
    with pytest.raises(UserError, match="'mixed_99' not a tap of inception; allowed: conv_2, conv_4"):
        build_feature_net(PerceptualConfig(network="inception", taps=["mixed_99"]))
    conv = ConvNeXtV2Features(PerceptualConfig(taps=["stage1"]), (1, 1, 1, 1), (8, 16, 32, 64))
    assert [f.shape[1] for f in conv.features(torch.zeros(1, 3, 32, 32))] == [16]
    vgg = VGG16Features(PerceptualConfig(taps=["relu2_2"]))
    assert [f.shape[1] for f in vgg.features(torch.zeros(1, 3, 16, 16))] == [128]


def test_default_input_is_the_smallest_valid_size(inception):
    seen = []
    net = build_feature_net(PerceptualConfig(network="inception"))  # resize 0: automatic
    features = net.features
    net.features = lambda x: (seen.append(tuple(x.shape[-2:])), features(x))[1]
    x = smooth_images(2, size=28, seed=4)
    perceptual_distance(net, x, x)
    assert seen and set(seen) == {(75, 75)}  # max(inception's 75, the 28-px image)
    seen.clear()
    perceptual_distance(net, torch.nn.functional.interpolate(x, size=96), torch.nn.functional.interpolate(x, size=96))
    assert set(seen) == {(96, 96)}


def test_perceptual_rows_subset_in_the_reverse_loss():
    from biflow.config import FlowConfig, ReverseConfig
    from biflow.losses import reverse_loss
    from biflow.models import ReverseModel, TARFlow

    fcfg = FlowConfig(image_size=16, channels=1, patch_size=4, width=16, depth=1, num_blocks=2, num_heads=2)
    rcfg = ReverseConfig(width=16, depth=2, num_heads=2, perceptual_weight=1.0,
                         perceptual=PerceptualConfig(taps=["conv_2"], rows=0.25))
    flow, rev = TARFlow(fcfg).requires_grad_(False), ReverseModel(rcfg, fcfg)
    net = build_feature_net(rcfg.perceptual)
    rows = []
    features = net.features
    net.features = lambda x: (rows.append(x.shape[0]), features(x))[1]
    x, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10
    loss, metrics = reverse_loss(rev, flow, x, y, rcfg, fcfg, feature_net=net)
    assert rows == [2, 2] and torch.isfinite(loss) and metrics["perceptual"] > 0  # 2 of 8 rows, both sides
    with pytest.raises(UserError, match=r"reverse.perceptual.rows=0 must be in \(0, 1\]"):
        build_feature_net(PerceptualConfig(rows=0))
