"""Typed configuration for every setting of biflow.

Configuration is data: nested dataclasses, loaded from YAML by one loader
that rejects unknown keys and wrong types with the full key path, and
overridden from the command line with ``--set a.b=value``.

Model sizes live in one registry (``FLOW_SIZES`` / ``REVERSE_SIZES``), named
like DiT: ``S``, ``B``, ``L``, ``XL`` with a patch suffix (``B/2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from biflow.config_loader import (  # noqa: F401 - the loader's names, re-exported as biflow.config's
    ConfigError, _positive, _ranges, _unit_interval, apply_overrides, from_dict, parse_override, read_yaml,
    save_config, set_key, to_dict, _deep_copy)

# ---------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------


@dataclass
class GlowConfig:
    """``flow.family: glow`` (Kingma & Dhariwal 2018): per level a squeeze, flow.num_blocks / levels
    steps of actnorm -> invertible 1x1 convolution (LU) -> affine coupling (label-conditioned),
    then a split that factors half the channels out (every level but the last)."""

    levels: int = 2  # multi-scale levels L; image_size must divide by 2^L
    hidden: int = 128  # channels of each coupling network
    coupling: Literal["affine", "additive"] = "affine"

    def validate(self, path: str, flow: "FlowConfig") -> None:
        _positive(self, path, "levels", "hidden")
        if flow.num_blocks % self.levels:
            raise ConfigError(f"{path}.levels={self.levels} does not divide flow.num_blocks={flow.num_blocks} "
                              f"(the steps are split evenly over the levels)")
        if flow.image_size % 2**self.levels:
            raise ConfigError(f"{path}.levels={self.levels}: flow.image_size={flow.image_size} must divide by "
                              f"2^{self.levels} (one squeeze per level)")


@dataclass
class ResFlowConfig:
    """``flow.family: resflow`` (Chen et al. 2019): flow.num_blocks residual blocks x + g(x) with
    spectrally normalised convolutions and LipSwish, Lip(g) < 1; an unbiased log-det by a power
    series with Russian-roulette truncation; the inverse by fixed-point iteration."""

    hidden: int = 64  # channels inside each residual branch
    coeff: float = 0.98  # Lipschitz bound of each branch (spectral-norm target)
    n_power_iter: int = 1  # power iterations per training forward (5 more after weights are loaded)
    exact_terms: int = 2  # series terms always computed before the roulette
    roulette_p: float = 0.5  # P(stop) after each further term (geometric truncation)
    gradient: Literal["neumann", "backprop"] = "neumann"  # the log-det's training gradient
    squeeze: int = 1  # squeezes first, each C x H x W -> 4C x H/2 x W/2: fewer, wider positions
    inverse_tol: float = 1e-6  # fixed-point stop: max |x_{k+1} - x_k|
    inverse_max_iter: int = 200

    def validate(self, path: str, flow: "FlowConfig") -> None:
        _positive(self, path, "hidden", "n_power_iter", "inverse_tol", "inverse_max_iter")
        _ranges(path, [("coeff", 0 < self.coeff < 1, "in (0, 1): the inverse exists only for Lip(g) < 1"),
                       ("exact_terms", self.exact_terms >= 1, ">= 1"),
                       ("roulette_p", 0 < self.roulette_p < 1, "in (0, 1)")], self)
        if self.squeeze < 0 or flow.image_size % 2 ** self.squeeze:
            raise ConfigError(f"{path}.squeeze={self.squeeze}: >= 0, and flow.image_size={flow.image_size} "
                              f"must divide by 2^{self.squeeze} (one 2x2 squeeze each)")


class _Sized:
    """A config with a registry size (``size: B/2``, FLOW_SIZES / REVERSE_SIZES): the loader's
    ``expand`` hook fills the size's fields before the keys are checked (explicit keys win)."""

    @classmethod
    def expand(cls, data: dict[str, Any], path: str) -> dict[str, Any]:
        return _expand_size(cls, data, path)


@dataclass
class SplineConfig:
    """``flow.transform: rqs``: the monotonic rational-quadratic spline of each transformed
    dimension (biflow.models.splines): ``bins`` bins over [-bound, bound], identity outside."""

    bins: int = 8
    bound: float = 4.0

    def validate(self, path: str) -> None:
        _positive(self, path, "bins", "bound")


@dataclass
class FlowConfig(_Sized):
    """Forward flow F: TARFlow (autoregressive affine blocks over patch tokens) by default,
    or another family (``family``) with its nested settings."""

    family: Literal["tarflow", "glow", "resflow"] = "tarflow"
    size: str = ""  # registry name such as "B/2"; explicit fields override it
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    width: int = 128  # transformer width W
    depth: int = 2  # transformer layers per flow block
    num_blocks: int = 4  # flow blocks B (alternating token order)
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10  # 0 = unconditional
    label_drop: float = 0.1  # p of replacing the label with the null class
    noise_std: float = 0.1  # sigma of training noise augmentation (pixels in [-1, 1])
    # Norm control: mu <- c * tanh(mu / c) and alpha <- c * tanh(alpha / c) with c = clip, so both
    # block outputs stay inside (-clip, clip) (STARFlow's soft clip, 4, extended to mu); 0 disables.
    clip: float = 4.0
    alpha_soft_clip: float = 0.0  # an extra soft clip on alpha alone (older configs used 4 with clip 8)
    # a LayerNorm before each block's output projection; off, as in ml-tarflow: with it the flow's
    # held-out NLL came out 0.011 (width 96) and 0.049 (width 128) nats/dim worse at the same budget
    out_norm: bool = False
    # the elementwise map of TARFlow's blocks and Glow's couplings: affine (mu, alpha), or a
    # rational-quadratic spline per dimension (flow.spline; clip and alpha_soft_clip are affine's)
    transform: Literal["affine", "rqs"] = "affine"
    spline: SplineConfig = field(default_factory=SplineConfig)
    glow: GlowConfig = field(default_factory=GlowConfig)  # family: glow
    resflow: ResFlowConfig = field(default_factory=ResFlowConfig)  # family: resflow

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> "FlowConfig":
        """``FlowConfig.from_size("B/2", image_size=32, channels=4)``."""
        return from_dict(cls, {"size": size, **overrides})

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size**2

    def validate(self, path: str = "flow") -> None:
        _positive(self, path, "image_size", "channels", "patch_size", "width", "depth", "num_blocks", "num_heads")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{path}.patch_size={self.patch_size} does not divide {path}.image_size={self.image_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError(f"{path}.num_heads={self.num_heads} does not divide {path}.width={self.width}")
        if self.num_tokens < 2:
            raise ConfigError(f"{path}: need at least 2 tokens, got {self.num_tokens} (lower patch_size)")
        if self.num_classes < 0:
            raise ConfigError(f"{path}.num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        _unit_interval(self, path, "label_drop")
        if self.noise_std < 0 or self.clip < 0 or self.alpha_soft_clip < 0:
            raise ConfigError(f"{path}: noise_std, clip and alpha_soft_clip must be >= 0")
        self.spline.validate(f"{path}.spline")
        if self.transform == "rqs" and self.family == "resflow":
            raise ConfigError(f"{path}.transform='rqs': a residual flow has no elementwise transform to swap "
                              f"(rqs is for tarflow blocks and glow couplings)")
        if self.transform == "rqs" and self.family == "glow" and self.glow.coupling != "affine":
            raise ConfigError(f"{path}.transform='rqs' replaces the coupling's affine map: set "
                              f"{path}.glow.coupling to 'affine' (got {self.glow.coupling!r})")
        if self.family == "glow":
            self.glow.validate(f"{path}.glow", self)
        elif self.family == "resflow":
            self.resflow.validate(f"{path}.resflow", self)


@dataclass
class PerceptualConfig:
    """Feature network for the perceptual loss (pluggable, offline-capable)."""

    network: Literal["inception", "vgg", "convnext", "none"] = "inception"
    weights_path: str = ""  # local weights for vgg / convnext (no hub downloads)
    # input side for the feature net; 0 = the smallest valid one, max(the net's minimum, the image side):
    # 75 px for 28-px Fashion-MNIST on inception, 16x fewer pixels than 299
    resize: int = 0
    # feature maps compared; [] = the network's default. inception: conv_2 conv_4 mixed_2 mixed_7
    # mixed_10 (fewer, shallower taps stop the net early); vgg: relu1_2 .. relu5_3; convnext: stage0 .. stage3
    taps: list[str] = field(default_factory=list)
    rows: float = 1.0  # fraction of each batch's rows the perceptual term runs on (the first ceil(rows * B))
    crop: float = 1.0  # smallest side fraction of the paired random crop (1 = the whole image)
    crop_mode: Literal["resized", "fixed"] = "resized"  # resized: side ~ U[crop, 1], resampled to the net's
    # input size (random-resized crops, as in the paper); fixed: a crop x side window at its own resolution


@dataclass
class ReverseConfig(_Sized):
    """Reverse model G (BiFlow): bidirectional ViT, 1 NFE from noise to image."""

    size: str = ""
    patch_size: int = 0  # G's own patch size; 0 = flow.patch_size (families without patches keep its default)
    width: int = 128
    depth: int = 8  # transformer layers, split into num_blocks alignment segments
    num_heads: int = 4
    mlp_ratio: float = 4.0
    denoise_depth: int = 1  # layers of the learned denoising block at the end
    # learned: G's output is supervised with the clean x (the paper's learned denoising); tweedie:
    # with the noisy x~ (the flow's own input), and sampling adds one Tweedie step through F (the ablation)
    denoise: Literal["learned", "tweedie"] = "learned"
    conditioning: Literal["adaln", "tokens"] = "adaln"
    # loss weights
    align_weight: float = 1.0  # hidden alignment, one term per segment
    align_reduce: Literal["sum", "mean"] = "sum"  # over the B segments: the paper's sum, or their mean
    denoise_weight: float = 1.0  # MSE of the clean prediction vs clean x
    perceptual_weight: float = 0.0  # perceptual distance of the clean prediction
    norm_control: bool = True  # divide both sides of each alignment term by their own per-sample RMS
    adaptive_p: float = 1.0  # loss * sg((loss + eps) ^ -p); 0 disables
    adaptive_eps: float = 0.01  # eps of the alignment terms
    # eps of the output terms (MSE, perceptual): below it the log-like weighting stops, so
    # 1e-3 lets the MSE keep pulling up to ~36 dB PSNR ([-1, 1] data); 0.01 stops at ~26 dB
    output_eps: float = 1e-3
    # training-time guidance: per conditional row w = 0 with probability guidance_p_zero, else
    # w = guidance_max * u ** guidance_shape (u ~ U[0, 1]); null-label rows always get w = 0
    guidance_max: float = 0.0  # 0 disables
    guidance_p_zero: float = 0.5  # mass at w = 0, where PSNR and the w = 0 FID are measured
    guidance_shape: float = 1.0  # 1: uniform on [0, guidance_max]; > 1: denser near 0
    guidance_warmup_steps: int = 0  # warm start: guidance_max ramps up from 0 over these steps
    guidance_mix: Literal["all", "output"] = "all"  # CFG target on every aligned state or output only
    guidance_grad_uncond: bool = False  # backprop through the unconditional stream
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    # A zero-initialised linear path from z to the output, added to G's prediction: the flow's
    # blocks are nearly linear, so a linear map from z already explains much of x (a ridge fit
    # reached 17 dB on the quickstart flow) and the ViT learns the rest. none | token: one
    # D x D map per token position (N*D^2 weights: 65k at the ImageNet-256 latent shape) |
    # lowrank: token + a rank-z_skip_rank map across all dimensions | dense: a full
    # (C*H*W)^2 map (615k weights at 28x28x1, 16.8M at 4x32x32)
    z_skip: Literal["none", "token", "lowrank", "dense"] = "none"
    z_skip_rank: int = 64
    # zero: the skip starts at zero and is learned; ridge: before the first step it is set to the
    # ridge-regression fit of the target from z over z_skip_init_batches batches (summed over ranks)
    z_skip_init: Literal["zero", "ridge"] = "zero"
    z_skip_init_batches: int = 32
    # curriculum: training-time CFG and the perceptual term switch on once the stage's progress
    # (the larger of step / train.steps and the share of train.time_budget_s spent) reaches these
    guidance_start: float = 0.0
    perceptual_start: float = 0.0

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> "ReverseConfig":
        return from_dict(cls, {"size": size, **overrides})

    def validate(self, path: str = "reverse") -> None:
        _positive(self, path, "width", "depth", "num_heads")
        if self.patch_size < 0:
            raise ConfigError(f"{path}.patch_size must be >= 0 (0 = flow.patch_size), got {self.patch_size}")
        if self.width % self.num_heads:
            raise ConfigError(f"{path}.num_heads={self.num_heads} does not divide {path}.width={self.width}")
        if self.denoise_depth < 0:
            raise ConfigError(f"{path}.denoise_depth must be >= 0, got {self.denoise_depth}")
        for name in ("align_weight", "denoise_weight", "perceptual_weight", "adaptive_p", "adaptive_eps",
                     "output_eps", "guidance_max", "guidance_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.guidance_p_zero <= 1:
            raise ConfigError(f"{path}.guidance_p_zero must be in [0, 1], got {self.guidance_p_zero}")
        if self.guidance_shape <= 0:
            raise ConfigError(f"{path}.guidance_shape must be > 0, got {self.guidance_shape}")
        if self.z_skip_rank < 1 or self.z_skip_init_batches < 1:
            raise ConfigError(f"{path}.z_skip_rank and {path}.z_skip_init_batches must be >= 1, got "
                              f"{self.z_skip_rank} and {self.z_skip_init_batches}")
        for name in ("guidance_start", "perceptual_start"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{path}.{name} must be in [0, 1] (a share of the stage), got {getattr(self, name)}")

    def check_flow(self, flow: FlowConfig, flow_source: str = "") -> None:
        """One reverse segment per forward block: ``depth >= flow.num_blocks``.
        Checked where the flow is known (its checkpoint, or the model's constructor)."""
        p = self.patch_size or flow.patch_size
        if flow.image_size % p:
            raise ConfigError(f"reverse.patch_size={p} does not divide flow.image_size={flow.image_size}"
                              f"{' of ' + flow_source if flow_source else ''}")
        if self.depth < flow.num_blocks:
            raise ConfigError(f"reverse.depth={self.depth} must be >= flow.num_blocks={flow.num_blocks}"
                              f"{' of ' + flow_source if flow_source else ''}: every forward block needs at "
                              f"least one reverse layer to align with")


# ---------------------------------------------------------------------------
# Size registry (DiT-like names). Patch size is the suffix: "B/2".
# ---------------------------------------------------------------------------

FLOW_SIZES: dict[str, dict[str, Any]] = {
    "S": dict(width=384, num_heads=6, num_blocks=8, depth=2),
    "B": dict(width=768, num_heads=12, num_blocks=8, depth=2),
    "L": dict(width=1024, num_heads=16, num_blocks=8, depth=3),
    "XL": dict(width=1152, num_heads=16, num_blocks=8, depth=5),
}

REVERSE_SIZES: dict[str, dict[str, Any]] = {
    "S": dict(width=384, num_heads=6, depth=12),
    "B": dict(width=768, num_heads=12, depth=12),
    "L": dict(width=1024, num_heads=16, depth=24),
    "XL": dict(width=1152, num_heads=16, depth=28),
}


def _expand_size(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """Fill fields from a size name like "B/2"; keys given explicitly win."""
    registry = {FlowConfig: FLOW_SIZES, ReverseConfig: REVERSE_SIZES}.get(cls)
    size = data.get("size")
    if registry is None or not size:
        return data
    where = f"{path}.size" if path else "size"
    if not isinstance(size, str):
        raise ConfigError(f"{where}: expected a string such as 'B/2', got {size!r}")
    name, _, patch = size.partition("/")
    if name not in registry:
        raise ConfigError(f"{where}={size!r}: unknown size; allowed: {', '.join(f'{k}/<patch>' for k in registry)}")
    expanded = dict(registry[name])
    if patch and cls is FlowConfig:
        if not patch.isdigit() or int(patch) < 1:
            raise ConfigError(f"{where}={size!r}: the patch suffix must be a positive integer, as in 'B/2'")
        expanded["patch_size"] = int(patch)
    expanded.update(data)
    return expanded


# ---------------------------------------------------------------------------
# Run configs (data, optimisation, training, Ray)
# ---------------------------------------------------------------------------


@dataclass
class DataConfig:
    uri: str = "runs/data/fashion-mnist"  # shard root: local path, file://, s3:// or gs://bucket/prefix
    split: str = "train"
    eval_split: str = "test"
    endpoint: str = ""  # S3-compatible endpoint (http://127.0.0.1:9000) or a GCS emulator
    region: str = ""
    kind: Literal["pixels", "latents"] = "pixels"
    # latents: the frozen diffusers AutoencoderKL that decodes them (local folder or hub id);
    # empty = the one named in the latent manifest
    autoencoder: str = ""
    random_flip: bool = True
    shuffle_buffer: int = 2048  # rows in the local shuffle buffer; 0 = file order only
    prefetch_batches: int = 2

    def validate(self, path: str = "data") -> None:
        _ranges(path, [("shuffle_buffer", self.shuffle_buffer >= 0, ">= 0 (0 = file order only)"),
                       ("prefetch_batches", self.prefetch_batches >= 0, ">= 0")], self)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.999

    def validate(self, path: str = "optim") -> None:
        # a negative lr or decay would otherwise fail inside every worker, or train backwards
        _ranges(path, [("lr", self.lr > 0, "> 0"),
                       ("weight_decay", self.weight_decay >= 0, ">= 0"),
                       ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                       ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables)"),
                       ("ema_decay", 0 <= self.ema_decay <= 1, "in [0, 1]"),
                       ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                       ("betas", all(0 <= b < 1 for b in self.betas), "in [0, 1)")], self)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # per worker, per micro-step
    grad_accum: int = 1
    engine: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 500  # sample grids to TensorBoard / PNG; 0 disables
    max_bad_steps: int = 20  # stop after this many consecutive NaN/inf steps
    forward_checkpoint: str = ""  # reverse stage: stage-1 run name or checkpoint URI
    # wall-clock budget of the training loop in seconds, summed over resumes (0 = none): the stage
    # ends at `steps` or when the budget is spent, whichever comes first, with a final checkpoint,
    # and the LR cosine follows whichever of the two is further along
    time_budget_s: float = 0.0
    # torch.compile the model (opt-in; GPUs). A compile failure at the first step falls back to
    # eager mode, and the log says so
    compile: bool = False
    # every this many steps, ask Ray Train whether a node of the run is being preempted (a drained
    # spot node) and, on a notice, write a just-in-time checkpoint (0 = never ask)
    preemption_check_every: int = 10

    def validate(self, path: str = "train") -> None:
        _positive(self, path, "steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage={self.zero_stage}: allowed values are 0, 1, 2, 3")
        _ranges(path, [("sample_every", self.sample_every >= 0, ">= 0 (0 disables)"),
                       ("time_budget_s", self.time_budget_s >= 0, ">= 0 seconds (0 = no budget)"),
                       ("preemption_check_every", self.preemption_check_every >= 0, ">= 0 steps (0 = never)")],
                self)


@dataclass
class RayConfig:
    address: str = ""  # empty: a local Ray instance; or RAY_ADDRESS / ray://... / auto
    workers: int = 2
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # restarts after real faults (a worker or node lost without notice)
    # restarts after preemptions (a node drained with the preemption reason first), counted apart
    max_preemption_failures: int = -1  # -1: unlimited
    storage: str = "runs"  # run storage: local dir, s3:// or gs://bucket/prefix
    storage_endpoint: str = ""
    # per-worker custom resources beside CPU/GPU (e.g. {"spot_gpu": 1}, or a node type's marker resource)
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    accelerator_type: str = ""  # Ray accelerator type of the worker GPUs, e.g. A100, H100 ("" = any)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self, path: str = "ray") -> None:
        if self.workers < 1:
            raise ConfigError(f"{path}.workers must be >= 1, got {self.workers}")
        _ranges(path, [("cpus_per_worker", self.cpus_per_worker > 0, "> 0"),
                       ("max_failures", self.max_failures >= -1, ">= 0, or -1 for unlimited"),
                       ("max_preemption_failures", self.max_preemption_failures >= -1, ">= 0, or -1 for unlimited")],
                self)


@dataclass
class ExperimentConfig:
    """A training job: which stage, the models, data, optimisation and Ray."""

    name: str = "biflow"
    stage: Literal["forward", "reverse"] = "forward"
    flow: FlowConfig = field(default_factory=FlowConfig)
    reverse: ReverseConfig = field(default_factory=ReverseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "ExperimentConfig":
        self.flow.validate("flow")
        self.reverse.validate("reverse")
        self.data.validate("data")
        self.optim.validate("optim")
        self.train.validate("train")
        self.ray.validate("ray")
        return self


def load_config(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    cls: type = ExperimentConfig,
) -> Any:
    """Load ``cls`` from a YAML path (or dict), apply ``--set`` overrides, validate."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = read_yaml(source)
    data = apply_overrides(_deep_copy(data), overrides)
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
