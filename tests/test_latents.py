"""Latent space without Ray: the frozen autoencoder codec, the perceptual loss
through its decoder, the checks that run before any worker starts, latent
inpainting, random-resized paired crops and the frozen flow outside autocast.

A tiny randomly initialised diffusers ``AutoencoderKL`` (64 px -> 4x32x32) is
saved to a local folder, as the ImageNet-256 latent path uses a real one."""

from __future__ import annotations

import pytest
import torch

from biflow.config import DataConfig, FlowConfig, PerceptualConfig, ReverseConfig
from biflow.data.latents import LatentCodec, check_latent_setup
from biflow.data.shards import Manifest
from biflow.errors import UserError
from biflow.losses import reverse_loss
from biflow.models import ReverseModel, TARFlow
from biflow.perceptual import build_feature_net, paired_random_resized_crop
from biflow.sampling import inpaint_images
from tests import jobdata

pytestmark = pytest.mark.integration  # a VAE and the FID-Inception at 75 px: ~30 s

FLOW = dict(image_size=32, channels=4, patch_size=4, width=32, depth=1, num_blocks=2, num_heads=2, num_classes=4)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return jobdata.write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def manifest(vae: str = "", **extra) -> Manifest:
    data = {"kind": "latents", "autoencoder": vae, "latent_shape": [4, 32, 32], "source_image_size": 64,
            "latent_mean": [0.1, -0.2, 0.0, 0.3], "latent_std": [1.5, 0.5, 1.0, 2.0], **extra}
    return Manifest(data, "/data/imagenet-latents")


@pytest.fixture(scope="module")
def codec(vae_dir):
    return LatentCodec.from_manifest(manifest(str(vae_dir)))


def test_codec_decodes_images_and_passes_gradients(codec):
    z = torch.randn(2, 4, 32, 32, requires_grad=True)
    x = codec.decode(z, grad=True, clamp=False)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    x.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # through the frozen decoder
    assert all(p.grad is None and not p.requires_grad for p in codec.vae.parameters())
    assert codec.decode(z).abs().max() <= 1  # display/FID path is clamped and has no graph
    assert not codec.decode(z).requires_grad


def test_codec_undoes_the_manifest_normalisation(codec):
    """decode(z) == vae.decode(z * std + mean): the per-channel statistics are undone first."""
    z = torch.randn(1, 4, 32, 32)
    raw = z * torch.tensor([1.5, 0.5, 1.0, 2.0]).view(1, 4, 1, 1) + torch.tensor([0.1, -0.2, 0.0, 0.3]).view(1, 4, 1, 1)
    with torch.no_grad():
        ref = codec.vae.decode(raw).sample
    assert torch.allclose(codec.decode(z, clamp=False), ref, atol=1e-5)
    images = codec.decode(z)
    back = codec.encode(images)
    assert back.shape == z.shape and torch.isfinite(back).all()


def test_no_autoencoder_anywhere_is_named(vae_dir):
    with pytest.raises(UserError, match=r"names no autoencoder.*data\.autoencoder"):
        check_latent_setup(manifest(""), 4, 32)
    # data.autoencoder supplies one where the manifest has none
    assert check_latent_setup(manifest(""), 4, 32, override=str(vae_dir)) == str(vae_dir)


def test_shape_mismatch_names_both_shapes(vae_dir):
    with pytest.raises(UserError, match=r"\(4, 32, 32\).*\(4, 16, 16\)"):  # the shards vs the flow
        check_latent_setup(manifest(str(vae_dir)), 4, 16)
    # the shards agree with the flow, but this autoencoder makes 4x32x32 from 64 px, not 4x16x16
    m = manifest(str(vae_dir), latent_shape=[4, 16, 16], source_image_size=64)
    with pytest.raises(UserError, match=r"makes latents of shape \(4, 32, 32\).*give \(4, 16, 16\)"):
        check_latent_setup(m, 4, 16)


def test_missing_autoencoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot load AutoencoderKL"):
        check_latent_setup(manifest(str(tmp_path / "nope")), 4, 32)


def test_latent_job_fails_before_any_worker_starts(tmp_path):
    """fit() checks the latent data on the driver: no Ray is started for a job that would die."""
    import json

    import ray

    from biflow.config import load_config
    from biflow.train.launch import fit

    root = tmp_path / "latents"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({**manifest("").data, "format_version": 1, "classes": ["a"],
                                                    "splits": {"train": {"records": 1, "shards": []}}}))
    cfg = load_config(None, ["data.kind=latents", f"data.uri={root}", f"ray.storage={tmp_path / 'runs'}",
                             "flow.channels=4", "flow.image_size=32", "flow.patch_size=4"])
    was_up = ray.is_initialized()
    with pytest.raises(UserError, match="names no autoencoder"):
        fit(cfg)
    assert ray.is_initialized() == was_up
    wrong_kind = load_config(None, [f"data.uri={root}", f"ray.storage={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match="data.kind='pixels'.*holds latents"):
        fit(wrong_kind)


def test_perceptual_loss_on_decoded_latents_trains_through_the_decoder(codec):
    torch.manual_seed(0)
    fcfg = FlowConfig(**FLOW)
    flow = TARFlow(fcfg).eval().requires_grad_(False)
    rcfg = ReverseConfig(width=32, depth=2, num_heads=2, perceptual_weight=1.0, guidance_max=1.0,
                         perceptual=PerceptualConfig(network="inception", resize=75, crop=0.875))
    rev = ReverseModel(rcfg, fcfg)
    net = build_feature_net(rcfg.perceptual)
    x, y = torch.randn(2, 4, 32, 32), torch.tensor([0, 3])
    g = torch.Generator().manual_seed(1)
    loss, metrics = reverse_loss(rev, flow, x, y, rcfg, fcfg, feature_net=net, generator=g, decode=codec.decode)
    loss.backward()
    assert metrics["perceptual"] > 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rev.out.parameters())
    assert all(p.grad is None for p in codec.vae.parameters()) and all(p.grad is None for p in net.parameters())
    # without the decoder the 4-channel latents cannot reach the image network
    with pytest.raises(ValueError, match="decode latents"):
        reverse_loss(rev, flow, x, y, rcfg, fcfg, feature_net=net, generator=g)


def test_frozen_flow_runs_outside_autocast():
    """Under the engines' bf16 autocast the frozen flow's trajectory (the targets) stays fp32."""
    fcfg = FlowConfig(**FLOW)
    flow = TARFlow(fcfg).eval()
    seen = []
    flow.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    rcfg = ReverseConfig(width=32, depth=2, num_heads=2)
    rev = ReverseModel(rcfg, fcfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = reverse_loss(rev, flow, torch.randn(2, 4, 32, 32), torch.tensor([0, 1]), rcfg, fcfg)
    assert seen == [False] and torch.isfinite(loss)


def test_inpainting_in_latent_space_keeps_known_pixels(codec):
    torch.manual_seed(0)
    fcfg = FlowConfig(**FLOW)
    flow, rev = TARFlow(fcfg).eval(), ReverseModel(ReverseConfig(width=32, depth=2, num_heads=2), fcfg).eval()
    images = codec.decode(torch.randn(2, 4, 32, 32))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1  # left half known
    out = inpaint_images(flow, rev, images, mask, torch.tensor([0, 1]), codec=codec,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(out[..., :32], images[..., :32])  # known pixels pasted back exactly
    assert (out[..., 32:] - images[..., 32:]).abs().mean() > 1e-3  # the rest is generated


def test_random_resized_crops_are_paired_and_seeded():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    same = paired_random_resized_crop(x, x, 1.0, 32)
    assert torch.allclose(same[0], x, atol=1e-5)  # scale 1 at the same size: the image itself
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a_hat, a = paired_random_resized_crop(x + 0.25, x, 0.5, 75, g())
    assert a.shape == (4, 3, 75, 75)
    assert torch.allclose(a_hat, a + 0.25, atol=1e-5)  # the same box in both
    b_hat, b = paired_random_resized_crop(x + 0.25, x, 0.5, 75, g())
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # boxes differ across samples


def test_data_config_autoencoder_field():
    assert DataConfig().autoencoder == ""
