"""Small real data sets for running every shipped job at toy scale.

- an ImageNet-layout JPEG tree (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``),
  64x64 smooth colour images of a few classes;
- its image shards (``biflow prepare-data --format imagenet``);
- a tiny randomly initialised diffusers ``AutoencoderKL`` saved to a local
  folder (2 levels: 64 px images -> 4x32x32 latents, the shape of the
  ImageNet-256 jobs' SD-VAE latents);
- its latent shards (``biflow prepare-latents``), whose manifest names that
  folder as the autoencoder;
- Fashion-MNIST shards of a few hundred images (Debian's dataset-fashion-mnist).

``python -m tests.jobdata OUT`` builds them all under OUT (for trying the jobs
from the command line, as a user would).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")
PER_CLASS = {"train": 40, "val": 16}
FASHION_MNIST_LIMIT = 512


@dataclass
class JobData:
    root: Path
    jpeg_tree: Path  # ImageNet layout
    imagenet: Path  # image shards (pixels, 64x64x3)
    vae: Path  # tiny AutoencoderKL (save_pretrained folder)
    latents: Path  # latent shards (4x32x32), manifest names ``vae``
    fashion_mnist: Path  # image shards (28x28x1)


def write_jpeg_tree(root: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in PER_CLASS.items():
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                coarse = rng.random((4, 4, 3)) * 0.6 + 0.2 * np.eye(3)[c % 3] + 0.1 * c / len(CLASSES)
                img = Image.fromarray((np.clip(coarse, 0, 1) * 255).astype(np.uint8)).resize(
                    (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
                img.save(folder / f"{wnid}_{i:04d}.JPEG", quality=90)
    return root


def write_tiny_vae(path: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE).save_pretrained(path)
    return path


def build(root: Path, fashion_mnist_dir: Path | None = None, num_cpus: int | None = None) -> JobData:
    """Everything above under ``root`` (idempotent: existing pieces are reused)."""
    from biflow.data.latents import prepare_latents
    from biflow.data.shards import prepare_data

    root = Path(root).resolve()
    data = JobData(root, root / "imagenet-jpeg", root / "imagenet64", root / "tiny-vae",
                   root / "imagenet-latents", root / "fashion-mnist")
    if not (data.jpeg_tree / "val").is_dir():
        write_jpeg_tree(data.jpeg_tree)
    prepare_data(str(data.jpeg_tree), str(data.imagenet), "imagenet", image_size=IMAGE_SIZE, progress=False,
                 num_cpus=num_cpus)
    if not (data.vae / "config.json").is_file():
        write_tiny_vae(data.vae)
    prepare_latents(str(data.imagenet), str(data.latents), str(data.vae), progress=False, num_cpus=num_cpus)
    if fashion_mnist_dir is not None:
        prepare_data(str(fashion_mnist_dir), str(data.fashion_mnist), "fashion-mnist", limit=FASHION_MNIST_LIMIT,
                     progress=False, num_cpus=num_cpus)
    return data


if __name__ == "__main__":
    out = build(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/jobdata"),
                Path("/usr/share/datasets/fashion-mnist"))
    for name, value in vars(out).items():
        print(f"{name:14s} {value}")
