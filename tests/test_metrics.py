"""FID (FID-Inception features, Fréchet distance, cached reference stats),
bits/dim, PSNR and image grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from biflow.metrics import (
    bits_per_dim,
    fid_from_features,
    frechet_distance,
    make_grid,
    psnr,
    save_grid,
)

pytestmark = pytest.mark.unit


def direct_scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root.real))


def test_frechet_matches_direct_scipy():
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((400, 32))
    f2 = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) * 0.5 + 0.3
    expected = direct_scipy_fid(f1, f2)
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(f1, f2, method="eigh") == pytest.approx(expected, rel=1e-7)


def test_frechet_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, -2.0, 0.0])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # |dmu|^2 + sum (sqrt a - sqrt b)^2
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)


def test_frechet_singular_covariances_stay_finite():
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((5, 20)), rng.standard_normal((5, 20))  # rank 4 of 20
    d_sqrtm, d_eigh = fid_from_features(f1, f2), fid_from_features(f1, f2, method="eigh")
    assert np.isfinite(d_sqrtm) and d_sqrtm == pytest.approx(d_eigh, rel=1e-4)


def test_bits_per_dim():
    assert bits_per_dim(math.log(2)) == pytest.approx(1.0)
    # 8-bit data scaled to [-1, 1]: + log2(128) bits per dim
    assert bits_per_dim(0.0, num_bins=256) == pytest.approx(7.0)
    # standard normal entropy per dim, in bits
    assert bits_per_dim(0.5 * math.log(2 * math.pi * math.e)) == pytest.approx(2.0470956, abs=1e-6)
    t = bits_per_dim(torch.tensor([math.log(4.0)]))
    assert torch.allclose(t, torch.tensor([2.0]))


def test_psnr_known_values():
    x = torch.zeros(2, 1, 4, 4)
    x_hat = x.clone()
    x_hat[0] += 0.1  # mse 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    x_hat[1] += 0.2  # mse 0.04 -> 20.0000 dB
    per_image = psnr(x_hat, x, reduction="none")
    assert torch.allclose(per_image, torch.tensor([26.0206, 20.0]), atol=1e-3)
    assert psnr(x_hat, x).item() == pytest.approx(23.0103, abs=1e-3)
    assert psnr(x_hat[:1] * 10, x[:1] * 10, data_range=20.0).item() == pytest.approx(26.0206, abs=1e-3)


def test_make_grid_layout():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 4, 6)
    grid = make_grid(images, nrow=3, padding=2, pad_value=-1)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2)
    assert grid[0, 2, 2].item() == 0 and grid[0, 2, 10].item() == 1
    assert grid[0, 8, 2].item() == 3 and grid[0, 8, 10].item() == 4
    assert grid[0, 8, 18].item() == -1  # the empty sixth cell is padding
    assert grid[0, 0, 0].item() == -1


def test_save_grid_png(tmp_path):
    gray = torch.full((4, 1, 5, 5), -1.0)
    gray[1] = 1.0
    path = save_grid(gray, tmp_path / "sub" / "grid.png", nrow=2, padding=1)
    img = Image.open(path)
    assert img.mode == "L" and img.size == (2 * 6 + 1, 2 * 6 + 1)
    arr = np.asarray(img)
    assert arr[1, 1] == 0 and arr[1, 7] == 255 and arr[0, 0] == 255
    rgb = save_grid(torch.zeros(3, 3, 8, 8), tmp_path / "rgb.png", nrow=3)
    img = Image.open(rgb)
    assert img.mode == "RGB" and np.asarray(img)[2, 2].tolist() == [128, 128, 128]


def test_sample_grids_have_one_column_per_class():
    from biflow.evaluate import _labels, class_grid

    n, cols = class_grid(64, 10)
    assert (n, cols) == (70, 10)  # 7 rows of the 10 Fashion-MNIST classes
    labels = _labels(n, 10, 0).reshape(-1, cols)
    assert (labels == torch.arange(10)).all()  # each column is one class, row after row
    assert class_grid(64, 1000) == (64, 8) and class_grid(64, 0) == (64, 8)  # ImageNet, unconditional: square
