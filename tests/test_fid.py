"""FID on the offline FID-Inception network (real Fashion-MNIST images): the
network's features, FID of a set against itself and against noised copies,
cached reference statistics. Moved from test_metrics.py: each test runs the
Inception network on CPU (~0.1 s/image on 2 cores), which is integration-tier time."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from biflow.metrics import (
    FIDStats,
    compute_fid,
    feature_stats,
    fid_from_features,
    gaussian_noise_floor_nats,
    inception_features,
    kid_from_features,
    reference_stats,
    reference_stats_path,
)

pytestmark = pytest.mark.integration

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
HALF = 128  # images per half: Inception costs ~0.11 s/image on 2 CPU cores
NOISE = 32


def read_idx_images(path: Path, count: int) -> torch.Tensor:
    raw = gzip.open(path).read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[:count]
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1)


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    if not FMNIST_TEST.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or `make dataset`)")
    return read_idx_images(FMNIST_TEST, 2 * HALF)


@pytest.fixture(scope="module")
def features(fmnist) -> dict[str, np.ndarray]:
    """Features shared by the FID tests: two halves of the test split and
    uniform noise images (drawn at the network's own 299 px)."""
    both = inception_features(fmnist, batch_size=64)
    noise = torch.rand(NOISE, 1, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"a": both[:HALF], "b": both[HALF:], "noise": inception_features(noise, batch_size=32)}


def test_features_shape_dtype(features):
    assert features["a"].shape == (HALF, 2048) and features["a"].dtype == np.float64
    assert np.isfinite(features["a"]).all() and features["a"].std() > 0


def test_fid_of_a_set_against_itself_is_zero(features):
    _, sigma = feature_stats(features["a"])
    fid = fid_from_features(features["a"], features["a"], method="eigh")
    assert abs(fid) < 1e-6 * np.trace(sigma), (fid, np.trace(sigma))


@pytest.mark.slow
def test_fid_self_zero_with_reference_sqrtm(features):
    # scipy.linalg.sqrtm at 2048-d costs ~11 s on 2 cores; same bound as eigh
    _, sigma = feature_stats(features["a"])
    fid = fid_from_features(features["a"], features["a"])
    assert abs(fid) < 1e-6 * np.trace(sigma), (fid, np.trace(sigma))
    halves = fid_from_features(features["a"], features["b"])
    assert halves == pytest.approx(fid_from_features(features["a"], features["b"], method="eigh"), rel=1e-6)


def test_fid_halves_small_noise_large(features):
    halves = fid_from_features(features["a"], features["b"], method="eigh")
    noise = fid_from_features(features["a"], features["noise"], method="eigh")
    # at 2x128 images the halves' FID is mostly small-sample bias (~80);
    # noise lands near 570
    assert 0 < halves < 150, halves
    assert noise > 300 and noise > 5 * halves, (noise, halves)


def test_onnx_runtime_inception_matches_torchscript(fmnist, monkeypatch, tmp_path):
    # the CPU default runs the FID-Inception under ONNX Runtime: same features, same FID
    import biflow.metrics as m

    monkeypatch.setenv("BIFLOW_CACHE_DIR", str(tmp_path))
    ort_net = m.OrtInception(threads=torch.get_num_threads())
    assert ort_net.path.parent == tmp_path / "fid" and ort_net.path.stat().st_size > 50e6
    x = m.to_inception_input(fmnist[:16])
    with torch.inference_mode():
        want = m._torch_inception("cpu")(x)
    got = ort_net(x)
    assert got.shape == want.shape == (16, 2048)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert m.frechet_distance(*feature_stats(got.double().numpy()), *feature_stats(want.double().numpy())) < 1e-3
    monkeypatch.setenv("BIFLOW_FID_RUNTIME", "torch")
    assert m._inception("cpu") is m._torch_inception("cpu")
    monkeypatch.setenv("BIFLOW_FID_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="BIFLOW_FID_RUNTIME='tensorrt': allowed values are auto, onnx, torch"):
        m._inception("cpu")


def test_grayscale_equals_replicated_rgb_and_any_size():
    x = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gray = inception_features(x)
    rgb = inception_features(x.expand(-1, 3, -1, -1).numpy())  # numpy input too
    assert gray.shape == (2, 2048)
    np.testing.assert_allclose(gray, rgb, atol=1e-5)
    batches = inception_features([x[:1], x[1:]], batch_size=1)  # an iterable of batches
    np.testing.assert_allclose(batches, gray, atol=1e-4)



def test_reference_stats_cached_per_split(tmp_path, fmnist):
    images = fmnist[:8]
    calls = []

    def load():
        calls.append(1)
        return images

    stats = reference_stats("fashion-mnist", "test", load, count=8, image_size=28, cache_dir=tmp_path)
    path = reference_stats_path("fashion-mnist", "test", 8, 28, tmp_path)
    assert path.is_file() and path.name.startswith("fashion-mnist-test-n8-s28")
    again = reference_stats("fashion-mnist", "test", load, count=8, image_size=28, cache_dir=tmp_path)
    assert len(calls) == 1  # the second call read the cache, not the dataset
    np.testing.assert_array_equal(stats.sigma, again.sigma)
    assert again.count == 8 and stats.mu.shape == (2048,)
    assert reference_stats_path("fashion-mnist", "train", 8, 28, tmp_path) != path
    # samples equal to the reference set: FID ~ 0 (8 samples in 2048-d: rank 7,
    # so round-off in the ~2040 null directions leaves ~1e-4)
    fid = compute_fid(images, again, method="eigh")
    assert abs(fid) < 1e-3, fid
    loaded = FIDStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)




def test_kid_near_zero_for_one_distribution_and_large_for_noise(features):
    same, se = kid_from_features(features["a"], features["b"], subsets=20, subset_size=64)
    far, far_se = kid_from_features(features["a"], features["noise"], subsets=20, subset_size=32)
    assert abs(same) < 4 * se + 1e-3, (same, se)  # unbiased: two halves of one split score ~0
    assert far > 50 * max(abs(same), se) and far_se > 0
    assert kid_from_features(features["a"], features["a"], subsets=5, subset_size=64, seed=1)[0] < 2e-3
    with pytest.raises(ValueError, match="at least 2 features"):
        kid_from_features(features["a"][:1], features["b"])


def test_reference_cache_keeps_features_for_kid(tmp_path, fmnist):
    kw = dict(count=8, image_size=28, cache_dir=tmp_path)
    plain = reference_stats("fm", "test", fmnist[:8], **kw)
    assert plain.features is None
    kept = reference_stats("fm", "test", fmnist[:8], keep_features=True, **kw)  # the cache lacked them
    assert kept.features.shape == (8, 2048) and kept.features.dtype == np.float32
    again = reference_stats("fm", "test", lambda: pytest.fail("cache hit expected"), keep_features=True, **kw)
    assert np.array_equal(again.features, kept.features) and np.allclose(again.mu, plain.mu)


def test_gaussian_noise_floor():
    assert gaussian_noise_floor_nats(0.1) == pytest.approx(0.5 * np.log(2 * np.pi * np.e * 0.01))
    # the floor of x + sigma * eps in bits/dim on the 8-bit grid of [-1, 1] at sigma = 0.1: 5.725
    assert (gaussian_noise_floor_nats(0.1) + np.log(128)) / np.log(2) == pytest.approx(5.7252, abs=1e-3)
