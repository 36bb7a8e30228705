"""Parquet shards + manifest from ImageNet, a class-per-folder tree or Fashion-MNIST.

Layout under the output root (a local path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``)::

    manifest.json                         written last: the commit point
    train/train-<fp>-00000-of-00012.parquet
    val/val-<fp>-00000-of-00002.parquet

Each shard has the columns ``image`` (encoded bytes: PNG for grayscale, JPEG
for RGB), ``label`` (int64) and ``key`` (str, ``split/class/file`` or
``split/index``). Latent shards (see ``latents.py``) have ``latent`` instead
of ``image``. ``<fp>`` is a fingerprint of the source and the options, so a
rerun writes the same names (idempotent) and a run with other options writes
new names while the previous manifest and its shards stay intact until the new
manifest replaces it. Readers only ever read the shards a manifest lists.

Conversion runs on Ray Data: one task per shard decodes, resizes, encodes and
writes its parquet file; the driver only lists the source and writes the
manifest.

Modules: ``sources.py`` (the scanners), ``encoding.py`` (encode, write),
``manifest.py`` (the manifest readers use); this module is the conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any

import numpy as np

from biflow.data import storage
from biflow.data.encoding import (ShardWriter, convert_file, convert_pixels, encode_image,  # noqa: F401
                                  resize_center_crop, table_bytes, write_shard)
from biflow.data.manifest import MANIFEST, Manifest, _try_read_manifest, read_manifest  # noqa: F401
from biflow.data.sources import (DEFAULT_SPLITS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR,  # noqa: F401
                                 FASHION_MNIST_FILES, FORMATS, MAX_LISTED_SKIPS, Source, SplitSource, scan_fashion_mnist,
                                 scan_folder, scan_imagenet, scan_source)
from biflow.errors import UserError

FORMAT_VERSION = 1


def ensure_ray(num_cpus: int | None = None) -> None:
    """Use the running Ray; else connect to RAY_ADDRESS; else start a fresh local
    instance (never a stray ``ray start`` cluster). Quiet Ray Data's own progress."""
    import logging

    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:  # a cluster (or a submitted job) keeps its own runtime env
            ray.init(address=address, log_to_driver=False)
        else:
            env = {k: os.environ[k] for k in ("AWS_EC2_METADATA_DISABLED",) if k in os.environ}
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _fingerprint(src: Source, options: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"format": src.format, "source": src.path, "classes": src.classes,
                                   "options": options, "version": FORMAT_VERSION}, sort_keys=True).encode())
    for name in sorted(src.splits):
        s = src.splits[name]
        h.update(name.encode())
        for key, label in zip(s.keys, s.labels):
            h.update(f"{key}\t{label}\n".encode())
        if s.pixels is not None:
            h.update(hashlib.sha256(s.pixels.tobytes()).digest())
        for p in s.paths:  # a changed file changes the shards
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _estimate_record_bytes(split: SplitSource, image_size: int, channels: int, encoding: str, quality: int) -> float:
    """Mean encoded size from a few items (shard sizes are approximate by design)."""
    sizes = []
    for i in range(min(len(split), 32)):
        if split.pixels is not None:
            sizes.append(len(convert_pixels(split.pixels[i], image_size, encoding, quality)))
        else:
            data, _ = convert_file(split.paths[i], image_size, channels, encoding, quality)
            if data is not None:
                sizes.append(len(data))
    return float(np.mean(sizes)) if sizes else 1024.0


def _shard_specs(split: SplitSource, fingerprint: str, shard_bytes: float, record_bytes: float,
                 min_shards: int) -> list[dict[str, Any]]:
    n = len(split)
    if n == 0:
        return []
    by_size = math.ceil(n * record_bytes / shard_bytes)
    # enough shards to keep every core busy on small datasets, but >= 256 records each
    num = max(1, by_size, min(min_shards, n // 256))
    specs = []
    for i, idx in enumerate(np.array_split(np.arange(n), num)):
        items = [(split.keys[j], split.labels[j], split.paths[j] if split.paths else "") for j in idx]
        pixels = split.pixels[idx] if split.pixels is not None else None
        specs.append({
            "split": split.name, "shard": i,
            "relpath": f"{split.name}/{split.name}-{fingerprint}-{i:05d}-of-{num:05d}.parquet",
            "items": json.dumps(items),
            "pixels": pixels.tobytes() if pixels is not None else b"",
            "height": int(pixels.shape[1]) if pixels is not None else 0,
            "width": int(pixels.shape[2]) if pixels is not None else 0,
        })
    return specs


def prepare_data(source: str, out: str, fmt: str, *, image_size: int = 0, shard_size_mb: float = 128.0,
                 splits: list[str] | None = None, endpoint: str = "", region: str = "", limit: int = 0,
                 channels: int = 0, min_shards: int = 8, jpeg_quality: int = 95, seed: int = 0,
                 force: bool = False, progress: bool = True, num_cpus: int | None = None) -> Manifest:
    """Convert ``source`` into parquet shards + ``manifest.json`` under ``out``.

    Items are shuffled once with ``seed`` before sharding, so shards mix classes
    and ``limit`` (records per split, 0 = all) keeps a class-balanced prefix.
    A rerun with the same source and options is a no-op (unless ``force``).
    """
    import ray

    if image_size < 0 or shard_size_mb <= 0 or limit < 0:
        raise UserError("--image-size and --limit must be >= 0 and --shard-size > 0")
    fs, root = storage.resolve(out, endpoint, region)  # fails early on a bad URI or missing bucket
    src = scan_source(source, fmt, splits)
    channels = channels or src.channels
    if channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    if fmt == "fashion-mnist" and image_size == 28:
        image_size = 0
    encoding = "png" if channels == 1 else "jpeg"
    rng = np.random.default_rng(seed)
    for name, split in list(src.splits.items()):
        order = rng.permutation(len(split))
        src.splits[name] = split.take(order[:limit] if limit else order)
    options = dict(image_size=image_size, channels=channels, encoding=encoding, quality=jpeg_quality,
                   limit=limit, seed=seed, shard_size_mb=shard_size_mb, min_shards=min_shards)
    fingerprint = _fingerprint(src, options)

    previous = _try_read_manifest(fs, root)
    if previous and previous.get("fingerprint") == fingerprint and not force and all(
            storage.exists(fs, storage.join(root, s["path"]))
            for sp in previous["splits"].values() for s in sp["shards"]):
        if progress:
            print(f"{out}: already up to date (fingerprint {fingerprint}); nothing to do")
        return Manifest(previous, out)

    specs = []
    for split in src.splits.values():
        record_bytes = _estimate_record_bytes(split, image_size, channels, encoding, jpeg_quality)
        specs += _shard_specs(split, fingerprint, shard_size_mb * 2**20, record_bytes, min_shards)
    row_group_rows = 256

    ensure_ray(num_cpus)
    total = sum(len(s) for s in src.splits.values())
    t0 = time.perf_counter()
    writer = ShardWriter(out, endpoint, region, image_size, channels, encoding, jpeg_quality, row_group_rows)
    ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(writer, batch_size=1, num_cpus=1)
    results = []
    bar = _progress(len(specs), total, progress)
    for row in ds.iter_rows():
        results.append(row)
        bar(row)
    seconds = time.perf_counter() - t0

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "pixels",
        "fingerprint": fingerprint,
        "source": {"format": fmt, "path": src.path},
        "image_size": image_size or (28 if fmt == "fashion-mnist" else None),
        "channels": channels,
        "encoding": encoding,
        "columns": ["image", "label", "key"],
        "classes": src.classes,
        "class_names": src.class_names,
        "options": options,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conversion_seconds": round(seconds, 2),
        "splits": {},
    }
    for name, split in src.splits.items():
        rows = sorted((r for r in results if r["split"] == name), key=lambda r: r["shard"])
        skipped = list(split.skipped) + [s for r in rows for s in json.loads(r["skipped"])]
        shards = [{"path": r["path"], "records": r["records"], "bytes": r["bytes"], "sha256": r["sha256"]}
                  for r in rows if r["records"]]
        manifest["splits"][name] = {
            "records": sum(s["records"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "num_skipped": len(skipped),
            "skipped": skipped[:MAX_LISTED_SKIPS],
            "shards": shards,
        }
        if not shards:
            raise UserError(f"no readable images in split {name!r} of {src.path} "
                            f"({len(skipped)} skipped, e.g. {skipped[:3]})")
    storage.write_bytes(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    _remove_stale(fs, root, manifest)
    if progress:
        n = sum(s["records"] for s in manifest["splits"].values())
        print(f"wrote {n} records in {len(specs)} shards to {out} in {seconds:.1f}s "
              f"({n / max(seconds, 1e-9):.0f} img/s); skipped "
              f"{sum(s['num_skipped'] for s in manifest['splits'].values())}")
    return Manifest(manifest, out)


def _remove_stale(fs, root: str, manifest: dict[str, Any]) -> None:
    """After the commit: drop shards of earlier runs that no manifest lists."""
    keep = {storage.join(root, s["path"]) for sp in manifest["splits"].values() for s in sp["shards"]}
    for split in manifest["splits"]:
        for path in storage.list_files(fs, storage.join(root, split)):
            if path not in keep and (path.endswith(".parquet") or ".tmp-" in path):
                fs.delete_file(path)


def _progress(num_shards: int, num_records: int, enabled: bool):
    """Per-shard progress line: shards done, records, throughput, ETA."""
    state = {"shards": 0, "records": 0, "t0": time.perf_counter()}
    try:
        from tqdm import tqdm

        bar = tqdm(total=num_records, unit="img", desc="prepare-data", disable=not enabled, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None

    def update(row: dict[str, Any]) -> None:
        state["shards"] += 1
        done = int(row["records"]) + len(json.loads(row["skipped"]))
        state["records"] += done
        if bar is not None:
            bar.update(done)
            bar.set_postfix(shards=f"{state['shards']}/{num_shards}")
            if state["shards"] == num_shards:
                bar.close()

    return update


def verify_shards(manifest: Manifest, endpoint: str = "", region: str = "") -> list[str]:
    """Re-read every shard and compare sizes and sha256 with the manifest;
    returns the list of problems (empty = all good)."""
    fs, root = storage.resolve(manifest.uri, endpoint, region)
    problems = []
    for split in manifest.splits:
        for s in manifest.split(split)["shards"]:
            try:
                data = storage.read_bytes(fs, storage.join(root, s["path"]))
            except OSError as exc:
                problems.append(f"{s['path']}: {storage.clean_error(exc)}")
                continue
            if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
                problems.append(f"{s['path']}: size or checksum differs from the manifest")
    return problems
