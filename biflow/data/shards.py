"""Parquet shards + manifest from ImageNet, a class-per-folder tree or Fashion-MNIST.

Layout under the output root (a local path or ``s3://bucket/prefix``)::

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
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from biflow.data import storage
from biflow.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("imagenet", "folder", "fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "ILSVRC2012_val_labels.txt")
MAX_LISTED_SKIPS = 1000  # per split; the count is always exact


# ---------------------------------------------------------------------------
# Manifest: what the training code reads
# ---------------------------------------------------------------------------


@dataclass
class Manifest:
    """A committed shard set. ``data`` is the JSON document; ``uri`` its root."""

    data: dict[str, Any]
    uri: str = ""

    @property
    def kind(self) -> str:
        return self.data.get("kind", "pixels")

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    @property
    def class_names(self) -> list[str]:
        return self.data.get("class_names") or self.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int | None:
        """Stored side length; None when images kept their source sizes."""
        return self.data.get("image_size")

    @property
    def channels(self) -> int:
        return self.data["channels"]

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.data["splits"]:
            raise UserError(f"split {name!r} not in the dataset at {self.uri}; available: {', '.join(self.splits)}")
        return self.data["splits"][name]

    def records(self, split: str) -> int:
        return self.split(split)["records"]

    def shard_paths(self, split: str) -> list[str]:
        """Shard paths relative to the root, in manifest order."""
        return [s["path"] for s in self.split(split)["shards"]]


def read_manifest(uri: str, endpoint: str = "", region: str = "") -> Manifest:
    """Load the manifest at ``uri``; a clear ``UserError`` when there is none."""
    fs, root = storage.resolve(uri, endpoint, region)
    path = storage.join(root, MANIFEST)
    try:
        raw = storage.read_bytes(fs, path)
    except FileNotFoundError:
        raise UserError(f"no {MANIFEST} under {uri}: prepare the data first, e.g. "
                        f"`biflow prepare-data {FASHION_MNIST_DIR} {uri} --format fashion-mnist` "
                        "(a conversion that did not finish leaves no manifest)") from None
    except OSError as exc:
        raise UserError(f"cannot read {MANIFEST} under {uri}: {storage.clean_error(exc)}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{uri}/{MANIFEST} is not valid JSON: {exc}") from None
    return Manifest(data, uri)


def _try_read_manifest(fs, root: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(fs, storage.join(root, MANIFEST)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------
# Sources: list what to convert (driver side, no decoding)
# ---------------------------------------------------------------------------


@dataclass
class SplitSource:
    """One split to convert: either image files or raw uint8 pixels."""

    name: str
    keys: list[str]
    labels: list[int]
    paths: list[str] = field(default_factory=list)  # file sources
    pixels: np.ndarray | None = None  # (N, H, W) uint8 for idx sources
    skipped: list[dict[str, str]] = field(default_factory=list)  # found while listing

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, order: np.ndarray) -> "SplitSource":
        return SplitSource(self.name, [self.keys[i] for i in order], [self.labels[i] for i in order],
                           [self.paths[i] for i in order] if self.paths else [],
                           self.pixels[order] if self.pixels is not None else None, self.skipped)


@dataclass
class Source:
    format: str
    path: str
    classes: list[str]
    class_names: list[str]
    channels: int
    splits: dict[str, SplitSource]


def _class_tree(root: Path, split: str, classes: list[str] | None = None) -> tuple[SplitSource, list[str]]:
    """``root/<class>/<file>``. Empty class folders are kept as classes (stable
    indices) and reported as skipped."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes if classes is not None else found
    index = {c: i for i, c in enumerate(classes)}
    src = SplitSource(split, [], [])
    for cls in found:
        if cls not in index:
            src.skipped.append({"key": f"{split}/{cls}/", "reason": "class folder not in the class list"})
            continue
        files = sorted(f for f in (root / cls).iterdir() if f.is_file())
        if not files:
            src.skipped.append({"key": f"{split}/{cls}/", "reason": "empty class folder"})
        for f in files:
            src.keys.append(f"{split}/{cls}/{f.name}")
            src.labels.append(index[cls])
            src.paths.append(str(f))
    return src, classes


def _synset_names(root: Path, classes: list[str]) -> list[str]:
    for name in SYNSET_FILES:
        for candidate in (root / name, root.parent / name):
            if candidate.is_file():
                names = {}
                for line in candidate.read_text(errors="replace").splitlines():
                    wnid, _, text = line.strip().partition(" ")
                    if wnid:
                        names[wnid] = text.strip() or wnid
                return [names.get(c, c) for c in classes]
    return list(classes)


def _imagenet_flat_val(root: Path, val_dir: Path, classes: list[str]) -> SplitSource | None:
    """val/ARBITRARY.JPEG with a label file: ``LOC_val_solution.csv`` (Kaggle:
    ``ImageId,PredictionString`` whose first token is the wnid) or a text file
    of ``filename wnid`` lines."""
    labels: dict[str, str] = {}
    for name in VAL_LABEL_FILES:
        for candidate in (root / name, val_dir / name):
            if not candidate.is_file():
                continue
            for i, line in enumerate(candidate.read_text().splitlines()):
                if name.endswith(".csv"):
                    if i == 0 or not line.strip():
                        continue
                    image_id, _, pred = line.partition(",")
                    labels[image_id.strip()] = pred.split()[0]
                elif line.strip():
                    fname, wnid = line.split()[:2]
                    labels[Path(fname).stem] = wnid
            break
        if labels:
            break
    if not labels:
        return None
    index = {c: i for i, c in enumerate(classes)}
    src = SplitSource("val", [], [])
    for f in sorted(p for p in val_dir.iterdir() if p.is_file() and p.name not in VAL_LABEL_FILES):
        wnid = labels.get(f.stem)
        if wnid is None or wnid not in index:
            src.skipped.append({"key": f"val/{f.name}", "reason": "no label in the validation label file"})
            continue
        src.keys.append(f"val/{wnid}/{f.name}")
        src.labels.append(index[wnid])
        src.paths.append(str(f))
    return src


def scan_imagenet(root: Path, splits: list[str]) -> Source:
    """ILSVRC-2012 layout: ``train/<wnid>/*.JPEG``; ``val/<wnid>/*`` or a flat
    ``val/`` with ``LOC_val_solution.csv``. Class index = sorted wnid."""
    first = next((root / s for s in splits if (root / s).is_dir()), None)
    if first is None:
        raise UserError(f"{root}: no {' or '.join(splits)} folder; expected the ILSVRC-2012 layout "
                        "train/<wnid>/*.JPEG and val/ (class folders or a flat folder with LOC_val_solution.csv)")
    classes = sorted(d.name for d in (root / ("train" if (root / "train").is_dir() else first.name)).iterdir()
                     if d.is_dir() and not d.name.startswith("."))
    out: dict[str, SplitSource] = {}
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise UserError(f"{root}: split folder {split!r} not found")
        if any(p.is_dir() for p in d.iterdir()):
            out[split], _ = _class_tree(d, split, classes)
        else:
            flat = _imagenet_flat_val(root, d, classes)
            if flat is None:
                raise UserError(f"{d}: flat folder without labels; add LOC_val_solution.csv (Kaggle) or "
                                "val_labels.txt ('filename wnid' per line), or sort it into class folders")
            out[split] = flat
    return Source("imagenet", str(root), classes, _synset_names(root, classes), 3, out)


def scan_folder(root: Path, splits: list[str]) -> Source:
    """Class-per-folder tree. With split subfolders (``root/train/<class>``) each
    named split is read; otherwise ``root`` itself is the one split."""
    trees = {s: root / s for s in splits}
    nested = all(t.is_dir() and any(p.is_dir() for p in t.iterdir()) for t in trees.values())
    if not nested:
        if len(splits) != 1:
            raise UserError(f"{root}: has no {'/'.join(splits)} subfolders; a plain class tree is one split "
                            "(give a single --split name)")
        trees = {splits[0]: root}
    classes: list[str] | None = None
    out = {}
    for split, tree in trees.items():
        out[split], classes = _class_tree(tree, split, classes)
    return Source("folder", str(root), classes or [], classes or [], 3, out)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path}: not an idx file of uint8")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def scan_fashion_mnist(root: Path, splits: list[str]) -> Source:
    out = {}
    for split in splits:
        if split not in FASHION_MNIST_FILES:
            raise UserError(f"fashion-mnist has splits train and test, not {split!r}")
        images, labels = (root / f for f in FASHION_MNIST_FILES[split])
        if not images.is_file() or not labels.is_file():
            raise UserError(f"Fashion-MNIST not found in {root} (need {images.name}, {labels.name}). Get it with "
                            "`sudo apt-get install dataset-fashion-mnist` (files land in "
                            f"{FASHION_MNIST_DIR}), or download the four idx .gz files from "
                            "https://github.com/zalandoresearch/fashion-mnist and pass their folder as SOURCE")
        pixels, y = _read_idx(images), _read_idx(labels)
        if len(pixels) != len(y):
            raise UserError(f"{root}: {len(pixels)} images but {len(y)} labels in the {split} split")
        out[split] = SplitSource(split, [f"{split}/{i:05d}" for i in range(len(y))], [int(v) for v in y],
                                 pixels=pixels)
    return Source("fashion-mnist", str(root), [str(i) for i in range(10)], list(FASHION_MNIST_CLASSES), 1, out)


DEFAULT_SPLITS = {"imagenet": ["train", "val"], "folder": ["train"], "fashion-mnist": ["train", "test"]}


def scan_source(source: str, fmt: str, splits: list[str] | None = None) -> Source:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: allowed values are {', '.join(FORMATS)}")
    root = Path(source or (FASHION_MNIST_DIR if fmt == "fashion-mnist" else "")).expanduser()
    if not str(root) or not root.exists():
        if fmt == "fashion-mnist":
            return scan_fashion_mnist(root, splits or DEFAULT_SPLITS[fmt])  # raises with install hint
        raise UserError(f"source {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"source {root} is not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"source {root} is not readable")
    if fmt == "imagenet":
        wanted = splits or [s for s in DEFAULT_SPLITS[fmt] if (root / s).is_dir()] or ["train"]
        src = scan_imagenet(root, wanted)
    elif fmt == "folder":
        src = scan_folder(root, splits or DEFAULT_SPLITS[fmt])
    else:
        src = scan_fashion_mnist(root, splits or DEFAULT_SPLITS[fmt])
    total = sum(len(s) for s in src.splits.values())
    if total == 0:
        raise UserError(f"source {root} has no images for split(s) {', '.join(src.splits)} "
                        f"(format {fmt}: expected {'<split>/' if fmt == 'imagenet' else ''}<class>/<image files>)")
    return src


# ---------------------------------------------------------------------------
# Encoding (runs in Ray tasks)
# ---------------------------------------------------------------------------


def resize_center_crop(img, size: int):
    """Shorter side to ``size`` (bicubic, antialiased), then a centred square crop."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def encode_image(img, encoding: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def convert_file(path: str, image_size: int, channels: int, encoding: str, quality: int) -> tuple[bytes | None, str]:
    """Encoded bytes, or (None, reason) for a file that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not raw:
        return None, "empty file"
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        img.load()  # full decode: catches truncated and corrupt data
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"corrupt or truncated: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if image_size == 0 and fmt == encoding.upper() and img.mode == mode:
        return raw, ""  # already what we store: keep the original bytes
    img = img.convert(mode)
    if image_size:
        img = resize_center_crop(img, image_size)
    return encode_image(img, encoding, quality), ""


def convert_pixels(pixels: np.ndarray, image_size: int, encoding: str, quality: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(pixels)
    if image_size and img.size != (image_size, image_size):
        img = resize_center_crop(img, image_size)
    return encode_image(img, encoding, quality)


def table_bytes(columns: dict[str, Any], row_group_rows: int) -> bytes:
    """Serialise a parquet table in memory (so we can checksum exactly what we write).
    Encoded images are already compressed, so only small columns get snappy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    buf = io.BytesIO()
    compression = {name: ("none" if pa.types.is_binary(table.schema.field(name).type) else "snappy")
                   for name in table.column_names}
    pq.write_table(table, buf, row_group_size=max(1, row_group_rows), compression=compression,
                   use_dictionary=[n for n in table.column_names if not pa.types.is_binary(table.schema.field(n).type)])
    return buf.getvalue()


def write_shard(uri: str, endpoint: str, region: str, relpath: str, data: bytes) -> dict[str, Any]:
    fs, root = storage.resolve(uri, endpoint, region, check=False)
    storage.write_bytes(fs, storage.join(root, relpath), data)
    return {"path": relpath, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class ShardWriter:
    """Ray Data ``map_batches`` function: each input row is one shard spec; the
    output row describes the shard written (or the skips, if every image failed)."""

    def __init__(self, uri: str, endpoint: str, region: str, image_size: int, channels: int,
                 encoding: str, quality: int, row_group_rows: int):
        self.uri, self.endpoint, self.region = uri, endpoint, region
        self.image_size, self.channels, self.encoding, self.quality = image_size, channels, encoding, quality
        self.row_group_rows = row_group_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("split", "shard", "path", "records", "bytes", "sha256", "skipped")}
        for i in range(len(batch["relpath"])):
            items = json.loads(batch["items"][i])
            images, labels, keys, skipped = [], [], [], []
            pixels = batch["pixels"][i]
            if len(pixels):
                h, w = int(batch["height"][i]), int(batch["width"][i])
                grid = np.frombuffer(pixels, np.uint8).reshape(-1, h, w)
                for (key, label, _), px in zip(items, grid):
                    images.append(convert_pixels(px, self.image_size, self.encoding, self.quality))
                    labels.append(label)
                    keys.append(key)
            else:
                for key, label, path in items:
                    data, reason = convert_file(path, self.image_size, self.channels, self.encoding, self.quality)
                    if data is None:
                        skipped.append({"key": key, "reason": reason})
                        continue
                    images.append(data)
                    labels.append(label)
                    keys.append(key)
            relpath = str(batch["relpath"][i])
            info = {"path": relpath, "bytes": 0, "sha256": ""}
            if images:
                import pyarrow as pa

                data = table_bytes({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                                    "key": pa.array(keys, pa.string())}, self.row_group_rows)
                info = write_shard(self.uri, self.endpoint, self.region, relpath, data)
            out["split"].append(str(batch["split"][i]))
            out["shard"].append(int(batch["shard"][i]))
            out["path"].append(info["path"] if images else "")
            out["records"].append(len(images))
            out["bytes"].append(info["bytes"])
            out["sha256"].append(info["sha256"])
            out["skipped"].append(json.dumps(skipped))
        return out


# ---------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------


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


def iter_records(paths: Iterable[str], fs) -> Iterable[dict[str, Any]]:
    """Plain pyarrow reader over shard files (no Ray): used by the PIL baseline."""
    import pyarrow.parquet as pq

    for path in paths:
        with fs.open_input_file(path) as f:
            yield from pq.read_table(f).to_pylist()
