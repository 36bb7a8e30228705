"""Ray Data streaming from parquet shards to per-worker torch batches.

    read_parquet(shards in manifest, pyarrow fs from storage.py, shuffled file order)
      -> select_columns
      -> map_batches(decode + resize/crop + random flip)     uint8 (B, C, H, W), on CPU workers
      -> per Ray Train worker: iter_torch_batches(local shuffle buffer)
      -> collate in the training worker: float32 in [-1, 1]   (the only float conversion)

Keeping uint8 until the worker moves 4x fewer bytes through the object store.
Latent shards (kind "latents") decode to float32 (B, C, h, w), normalised
per channel with the statistics stored in the manifest.

Shuffling is epoch-aware at two levels: the shard file order is reshuffled on
every execution of the dataset (seeded, ``reseed_after_execution``), and rows
are mixed in a local buffer of ``data.shuffle_buffer`` rows seeded with
``seed + epoch``. Shards were written class-mixed by ``prepare-data``.

Typical use in a Ray Train worker::

    shard = ray.train.get_dataset_shard("train")
    for epoch in itertools.count():
        for x, y in iter_worker_batches(shard, batch_size, epoch=epoch,
                                        shuffle_buffer=cfg.data.shuffle_buffer):
            ...

and on the driver ``TorchTrainer(..., datasets={"train": build_dataset(cfg.data, "train")})``.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
from typing import Any, Iterator

import numpy as np

from biflow.config import DataConfig
from biflow.data import storage
from biflow.data.shards import Manifest, read_manifest, resize_center_crop
from biflow.errors import UserError


def _output(x: np.ndarray, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"x": np.ascontiguousarray(x), "y": batch["label"].astype(np.int64)}
    if "key" in batch:
        out["key"] = batch["key"]
    return out


STATS_ACTOR = "biflow-data-stats"
_STATS_HANDLES: dict[str, Any] = {}


def data_stats_actor(name: str):
    """A named counter of corrupt records skipped by decoding (read by the training loop)."""
    import ray

    @ray.remote(num_cpus=0)
    class DataStats:
        def __init__(self):
            self.corrupt = 0

        def add(self, n: int) -> None:
            self.corrupt += n

        def get(self) -> int:
            return self.corrupt

    handle = DataStats.options(name=name, get_if_exists=True).remote()
    _STATS_HANDLES[name] = handle  # a named actor lives while a handle does
    return handle


def release_data_stats(name: str) -> None:
    """End a run's stats actor: a long-lived driver (Tune, a notebook) would otherwise keep
    it, and with it a node the autoscaler could not call idle."""
    import ray

    handle = _STATS_HANDLES.pop(name, None)
    if handle is not None:
        ray.kill(handle)


def corrupt_records(name: str) -> int | None:
    """Corrupt records skipped so far by the dataset whose stats actor is ``name``."""
    import ray

    try:
        return int(ray.get(ray.get_actor(name).get.remote(), timeout=10))
    except Exception:  # stats are best effort
        return None


class DecodeImages:
    """Encoded bytes -> uint8 (B, C, H, W), resized/cropped to ``image_size``,
    optionally flipped left-right with probability 1/2. A record that does not
    decode is dropped with a warning (and counted in the ``stats`` actor), so a
    corrupt image inside a valid shard does not stop a run."""

    def __init__(self, image_size: int | None, channels: int, random_flip: bool, stats: str = ""):
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self.stats = stats
        self.rng = np.random.default_rng()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        arrays, keep, errors = [], [], []
        for i, data in enumerate(batch["image"]):
            try:
                img = Image.open(io.BytesIO(data))
                if img.mode != mode:
                    img = img.convert(mode)
                if self.image_size and img.size != (self.image_size, self.image_size):
                    img = resize_center_crop(img, self.image_size)
                arrays.append(np.asarray(img, dtype=np.uint8))
                keep.append(i)
            except Exception as exc:  # PIL raises many types for bad bytes
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if errors:
            import sys

            print(f"[data] warning: skipped {len(errors)} corrupt image(s) of {len(batch['image'])} in a batch "
                  f"(first: {errors[0]})", file=sys.stderr, flush=True)
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
            if self.stats:
                import ray

                try:
                    ray.get_actor(self.stats).add.remote(len(errors))
                except Exception:
                    pass
        if not arrays:
            side = self.image_size or 0
            shape = (0, side, side) if self.channels == 1 else (0, side, side, 3)
            return _output(np.zeros(shape, np.uint8)[:, None] if self.channels == 1
                           else np.zeros(shape, np.uint8).transpose(0, 3, 1, 2), batch)
        x = np.stack(arrays)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        if self.random_flip:
            flip = self.rng.random(len(x)) < 0.5
            x[flip] = x[flip, :, :, ::-1]
        return _output(x, batch)


class DecodeLatents:
    """Raw latent bytes -> float32 (B, C, h, w), normalised per channel."""

    def __init__(self, shape: list[int], dtype: str, mean: list[float] | None, std: list[float] | None,
                 random_flip: bool):
        self.shape, self.dtype, self.random_flip = tuple(shape), np.dtype(dtype), random_flip
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        self.rng = np.random.default_rng()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack([np.frombuffer(b, self.dtype).reshape(self.shape) for b in batch["latent"]]).astype(np.float32)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.random_flip:
            flip = self.rng.random(len(x)) < 0.5
            x[flip] = x[flip, :, :, ::-1]
        return _output(x, batch)


@contextlib.contextmanager
def _classic_parquet_reader():
    """Read with Ray Data's file-per-task parquet reader. The default (V2) reader in
    Ray 2.60 reads footers on an actor pool that is set up again on every
    execution, i.e. every epoch: 4-9 s before the first batch on a 2-core machine,
    and it packs small shard sets into one 128 MiB read task (no parallel decode).
    The classic reader starts an epoch in 0.3-0.5 s and splits blocks for
    parallelism. Ray reads the flag when ``read_parquet`` is called."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = getattr(ctx, "use_datasource_v2", None)
    if old is None:
        yield
        return
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = old


def build_dataset(data_cfg: DataConfig, split: str | None = None, image_size: int | None = None,
                  channels: int | None = None, *, train: bool = True, seed: int = 0, limit: int = 0,
                  normalize_latents: bool = True, batch_size: int = 256, with_keys: bool = False,
                  manifest: Manifest | None = None, stats: str = "") -> "ray.data.Dataset":  # noqa: F821
    """A streaming dataset of ``{"x": uint8 (B,C,H,W) or float32 latents, "y": int64}``.

    ``image_size``/``channels`` default to what the manifest stored. ``train``
    turns on the shuffled file order and ``data_cfg.random_flip``; otherwise
    nothing is random (evaluation; every record once; :func:`iter_split` keeps the file order).
    ``with_keys`` keeps the ``key`` column (tests, debugging). Shards that are
    missing or whose size differs from the manifest (truncated, overwritten) are
    skipped with a warning; ``stats`` names a :func:`data_stats_actor` that counts
    corrupt records dropped while decoding.
    """
    import ray
    from ray.data import FileShuffleConfig

    split = split or data_cfg.split
    manifest = manifest or read_manifest(data_cfg.uri, data_cfg.endpoint, data_cfg.region)
    fs, root = storage.resolve(data_cfg.uri, data_cfg.endpoint, data_cfg.region)
    paths = _usable_shards(fs, root, manifest, split)
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if train else None
    with _classic_parquet_reader():
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle, file_extensions=None)
    if limit:
        ds = ds.limit(limit)
    flip = train and data_cfg.random_flip
    extra = ["key"] if with_keys else []
    if manifest.kind == "latents":
        mean = manifest.data.get("latent_mean") if normalize_latents else None
        std = manifest.data.get("latent_std") if normalize_latents else None
        decode: Any = DecodeLatents(manifest.data["latent_shape"], manifest.data["latent_dtype"], mean, std, flip)
        ds = ds.select_columns(["latent", "label"] + extra)
    else:
        if not (image_size or manifest.image_size):
            raise UserError(f"{data_cfg.uri} keeps the source image sizes; give an image_size to resize to")
        decode = DecodeImages(image_size or manifest.image_size, channels or manifest.channels, flip, stats)
        ds = ds.select_columns(["image", "label"] + extra)
    return ds.map_batches(decode, batch_size=batch_size, batch_format="numpy", zero_copy_batch=False)


def _why(size: int | None, expected: int | None) -> str:
    return "missing" if size is None else f"{size} bytes, the manifest says {expected}"


def _usable_shards(fs, root: str, manifest: Manifest, split: str) -> list[str]:
    """Shard paths of ``split`` whose size matches the manifest (one listing per split)."""
    import sys

    import pyarrow.fs as pafs

    shards = manifest.split(split)["shards"]
    sizes = {}
    for d in sorted({posixpath.dirname(s["path"]) for s in shards}):
        sel = pafs.FileSelector(storage.join(root, d) if d else root, recursive=False, allow_not_found=True)
        sizes.update({i.path: i.size for i in fs.get_file_info(sel) if i.type == pafs.FileType.File})
    good, bad = [], []
    for s in shards:
        path = storage.join(root, s["path"])
        size = sizes.get(path)
        if size is None or ("bytes" in s and size != s["bytes"]):
            bad.append(f"{s['path']} ({_why(size, s.get('bytes'))})")
        else:
            good.append(path)
    if bad:
        print(f"[data] warning: skipping {len(bad)} of {len(shards)} {split} shards of {manifest.uri} that do not "
              f"match the manifest (truncated, overwritten or missing; `verify_shards` checks checksums): "
              f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}", file=sys.stderr, flush=True)
    if not good:
        raise UserError(f"no usable {split} shards under {manifest.uri}: all {len(shards)} are missing or "
                        f"differ from the manifest; prepare the data again")
    return good


def to_model_batch(batch: dict[str, np.ndarray], keep_uint8: bool = False,
                   pin_memory: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """Collate in the training worker: uint8 -> float32 in [-1, 1]; latents pass through.
    ``keep_uint8`` leaves images as uint8 (4x fewer bytes to the device; :func:`to_device`
    converts them there), ``pin_memory`` puts the batch in page-locked memory (an
    asynchronous copy to a GPU)."""
    import torch

    x, y = batch["x"], batch["y"]
    x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if x.dtype != torch.uint8 or not keep_uint8:
        x = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()
    y = torch.from_numpy(np.array(y, dtype=np.int64))
    return (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)


def to_device(x: "torch.Tensor", device: Any, dtype: Any) -> "torch.Tensor":  # noqa: F821
    """A collated batch onto ``device`` (non-blocking), then ``dtype``: uint8 images become
    [-1, 1] in fp32 on the device first (the same values :func:`to_model_batch` gives)."""
    import torch

    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(127.5).sub_(1.0)
    return x.to(dtype)


def _collate_fn(keep_uint8: bool = False, pin_memory: bool = False):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ToModelBatch(NumpyBatchCollateFn):
        def __call__(self, batch):
            return to_model_batch(batch, keep_uint8, pin_memory)

    return ToModelBatch()


def iter_worker_batches(shard: Any, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle_buffer: int = 0,
                        prefetch_batches: int = 2, drop_last: bool = True, device: Any = "auto",
                        keep_uint8: bool = False, pin_memory: bool = False,
                        ) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
    """One epoch of ``(x float32 (B,C,H,W) in [-1,1], y int64 (B,))`` from a Ray
    Train dataset shard (``ray.train.get_dataset_shard``) or any Ray Dataset /
    DataIterator. ``device="auto"`` puts tensors on the Ray Train worker's device.
    ``keep_uint8`` / ``pin_memory``: see :func:`to_model_batch` (training on a GPU)."""
    kwargs: dict[str, Any] = {}
    if shuffle_buffer:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed + epoch}
    yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=_collate_fn(keep_uint8, pin_memory),
                                        drop_last=drop_last,
                                        prefetch_batches=prefetch_batches, device=device, **kwargs)


def iter_split(data_cfg: DataConfig, split: str | None = None, batch_size: int = 256, *, train: bool = False,
               epoch: int = 0, seed: int = 0, limit: int = 0, image_size: int | None = None,
               channels: int | None = None, drop_last: bool = False,
               device: Any = "cpu") -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
    """The same batches without Ray Train (evaluation, tests, notebooks): the whole
    split once, without augmentation unless ``train``. Starts a local Ray instance
    (or joins RAY_ADDRESS) when none is running, never a stray earlier cluster."""
    from biflow.data.shards import ensure_ray

    ensure_ray()
    # evaluation reads in file order, so a limit picks the same records every time and the
    # FID cache (keyed by content) is hit; training keeps Ray Data's faster unordered streaming
    with contextlib.nullcontext() if train else preserve_order():
        ds = build_dataset(data_cfg, split, image_size, channels, train=train, seed=seed, limit=limit)
    yield from iter_worker_batches(ds, batch_size, epoch=epoch, seed=seed,
                                   shuffle_buffer=data_cfg.shuffle_buffer if train else 0,
                                   drop_last=drop_last, device=device)


@contextlib.contextmanager
def preserve_order() -> Iterator[None]:
    """Ray Data datasets created inside keep their input order when they run (the files in the
    given order, then their rows): a dataset copies the current ``DataContext`` when it is made.
    The old setting is restored on exit."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = old
