"""Ray Data pipeline from S3 shards (moto): exact pixels, augmentation, two consumers
that split an epoch, latent shards from a tiny AutoencoderKL."""

from __future__ import annotations

import gzip
import threading

import numpy as np
import pytest
import torch

from biflow.config import DataConfig
from biflow.data.pipeline import build_dataset, iter_split, iter_worker_batches, to_model_batch
from biflow.data.shards import prepare_data

pytestmark = pytest.mark.integration


N = 2000


@pytest.fixture(scope="module")
def fmnist_s3(fashion_mnist_dir, s3_server, ray_local):
    bucket = s3_server.make_bucket("pipeline-fmnist")
    uri = f"s3://{bucket}/fm"
    manifest = prepare_data(str(fashion_mnist_dir), uri, "fashion-mnist", limit=N, splits=["train"],
                            endpoint=s3_server.endpoint, progress=False)
    with gzip.open(fashion_mnist_dir / "train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(fashion_mnist_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    cfg = DataConfig(uri=uri, endpoint=s3_server.endpoint, shuffle_buffer=256)
    return cfg, manifest, pixels, labels


def _index(keys) -> np.ndarray:
    return np.array([int(str(k).split("/")[1]) for k in keys])


def test_eval_pixels_and_labels_exact(fmnist_s3):
    cfg, manifest, pixels, labels = fmnist_s3
    ds = build_dataset(cfg, "train", train=False, with_keys=True)
    batches = list(ds.iter_batches(batch_size=500, batch_format="numpy"))
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    idx = _index(np.concatenate([b["key"] for b in batches]))
    assert x.dtype == np.uint8 and x.shape == (N, 1, 28, 28)  # uint8 until the worker
    assert len(set(idx.tolist())) == N
    assert np.array_equal(x[:, 0], pixels[idx]) and np.array_equal(y, labels[idx])


def test_train_batches_float_flip_and_shapes(fmnist_s3):
    cfg, manifest, pixels, labels = fmnist_s3
    ds = build_dataset(cfg, "train", train=True, with_keys=True)
    flipped = same = 0
    for b in ds.iter_batches(batch_size=1000, batch_format="numpy"):
        raw = pixels[_index(b["key"])]
        same += int(np.all(b["x"][:, 0] == raw, axis=(1, 2)).sum())
        flipped += int(np.all(b["x"][:, 0] == raw[:, :, ::-1], axis=(1, 2)).sum())
        symmetric = int(np.all(raw == raw[:, :, ::-1], axis=(1, 2)).sum())
        same -= symmetric  # a symmetric image counts once, as unflipped
    assert same + flipped == N
    assert 0.4 < flipped / N < 0.6

    batches = list(iter_worker_batches(ds, 128, epoch=0, shuffle_buffer=cfg.shuffle_buffer, device="cpu"))
    assert len(batches) == N // 128  # drop_last
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (128, 1, 28, 28) and y.dtype == torch.int64
    allx = torch.cat([b[0] for b in batches])
    assert allx.min().item() == -1.0 and allx.max().item() == 1.0
    # the float conversion is exact: uint8 v -> v / 127.5 - 1
    xb, yb = to_model_batch({"x": np.array([[[[0, 255, 51]]]], np.uint8), "y": np.array([3])})
    assert torch.allclose(xb, torch.tensor([[[[-1.0, 1.0, 51 / 127.5 - 1]]]])) and yb.tolist() == [3]

    x32, _ = next(iter(iter_split(cfg, "train", 16, image_size=32, channels=3, limit=16)))
    assert x32.shape == (16, 3, 32, 32) and torch.equal(x32[:, 0], x32[:, 2])


def test_evaluation_reads_are_ordered_so_the_feature_cache_hits(fmnist_s3):
    """iter_split outside training keeps the file order: a limit picks the same images every
    time, and the content key of the cached FID features is the same for every read."""
    from biflow.evaluate import content_key

    cfg, manifest, _, _ = fmnist_s3
    assert len(manifest.shard_paths("train")) >= 4
    reads = [torch.cat([x for x, _ in iter_split(cfg, "train", 100, limit=700)]) for _ in range(3)]
    assert all(torch.equal(reads[0], r) for r in reads[1:])
    whole = torch.cat([x for x, _ in iter_split(cfg, "train", 100)])
    assert torch.equal(whole[:700], reads[0])  # the limit is a prefix of the ordered split
    key = content_key(whole)
    assert content_key(whole[torch.randperm(len(whole))]) == key  # any order: the same set
    assert content_key(whole[1:]) != key and content_key(reads[0]) != key


def test_two_consumers_split_each_epoch(fmnist_s3):
    cfg, *_ = fmnist_s3
    ds = build_dataset(cfg, "train", train=True, with_keys=True)
    consumers = ds.streaming_split(2, equal=True)
    seen: dict[tuple[int, int], list[str]] = {}

    def consume(rank: int, it) -> None:
        for epoch in range(2):
            keys = []
            for b in it.iter_batches(batch_size=100, batch_format="numpy", local_shuffle_buffer_size=256,
                                     local_shuffle_seed=epoch):
                keys += [str(k) for k in b["key"]]
            seen[(rank, epoch)] = keys

    threads = [threading.Thread(target=consume, args=(r, it)) for r, it in enumerate(consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(seen) == 4
    for epoch in range(2):
        a, b = seen[(0, epoch)], seen[(1, epoch)]
        assert len(a) == len(b) == N // 2  # equal=True
        assert not set(a) & set(b)  # disjoint
        assert len(set(a) | set(b)) == N  # together: the whole epoch
    assert seen[(0, 0)] != seen[(0, 1)]  # the order changes between epochs


def test_latent_shards_tiny_autoencoder(fmnist_s3, tmp_path, s3_server):
    from diffusers import AutoencoderKL

    from biflow.data.latents import latents_to_images, load_autoencoder, prepare_latents

    cfg, *_ = fmnist_s3
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=28).save_pretrained(tmp_path / "vae")
    bucket = s3_server.make_bucket("pipeline-latents")
    uri = f"s3://{bucket}/fm-latents"
    m = prepare_latents(cfg.uri, uri, str(tmp_path / "vae"), endpoint=cfg.endpoint, limit=96, progress=False)
    assert m.kind == "latents" and m.data["latent_shape"] == [4, 14, 14]
    assert (m.image_size, m.channels, m.records("train")) == (14, 4, 96)
    assert len(m.data["latent_mean"]) == 4 and all(s > 0 for s in m.data["latent_std"])

    lcfg = DataConfig(uri=uri, endpoint=cfg.endpoint, kind="latents")
    xs = [x for x, _ in iter_split(lcfg, "train", 32)]
    z = torch.cat(xs)
    assert z.shape == (96, 4, 14, 14) and z.dtype == torch.float32
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-3)  # normalised with the stored stats
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=2e-2)
    images = latents_to_images(z[:2], m, load_autoencoder(str(tmp_path / "vae")))
    assert images.shape == (2, 3, 28, 28) and images.abs().max() <= 1
    again = prepare_latents(cfg.uri, uri, str(tmp_path / "vae"), endpoint=cfg.endpoint, limit=96, progress=False)
    assert again.data == m.data  # rerun: no-op


def test_uint8_batches_convert_on_the_device_to_the_same_values():
    """Training on a GPU keeps images uint8 (optionally pinned) to the device and converts there:
    the values equal the CPU collate's, in the engine's input dtype."""
    from biflow.data.pipeline import to_device

    rng = np.random.default_rng(0)
    batch = {"x": rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8), "y": np.arange(4)}
    x_cpu, y_cpu = to_model_batch(batch)
    x_u8, y_u8 = to_model_batch(batch, keep_uint8=True)
    assert x_u8.dtype == torch.uint8 and torch.equal(y_u8, y_cpu)
    assert torch.equal(to_device(x_u8, "cpu", torch.float32), x_cpu)
    assert to_device(x_u8, "cpu", torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(to_device(x_cpu, "cpu", torch.float32), x_cpu)  # latents / floats just move
    latents = {"x": rng.standard_normal((2, 4, 4, 4)).astype(np.float32), "y": np.arange(2)}
    assert to_model_batch(latents, keep_uint8=True)[0].dtype == torch.float32
