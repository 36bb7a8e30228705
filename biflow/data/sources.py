"""Source scanners of ``prepare-data``: list what to convert (driver side, no
decoding) from ImageNet (train/val folders, synset files, flat val with a
label file), a class-per-folder tree, or Fashion-MNIST's idx files."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biflow.errors import UserError

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


def read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file of uint8 (the MNIST family's format) as an array of its shape."""
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
        pixels, y = read_idx(images), read_idx(labels)
        if len(pixels) != len(y):
            raise UserError(f"{root}: {len(pixels)} images but {len(y)} labels in the {split} split")
        out[split] = SplitSource(split, [f"{split}/{i:05d}" for i in range(len(y))], [int(v) for v in y],
                                 pixels=pixels)
    return Source("fashion-mnist", str(root), [str(i) for i in range(10)], list(FASHION_MNIST_CLASSES), 1, out)


DEFAULT_SPLITS = {"imagenet": ["train", "val"], "folder": ["train"], "fashion-mnist": ["train", "test"]}


def scan_source(source: str, fmt: str, splits: list[str] | None = None) -> Source:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: allowed values are {', '.join(FORMATS)}")
    if not source and fmt != "fashion-mnist":  # only Fashion-MNIST has a place to imply (Path("") would be ".")
        raise UserError(f"--format {fmt} needs the source folder: `biflow prepare-data SOURCE OUT --format {fmt}`")
    root = Path(source or FASHION_MNIST_DIR).expanduser()
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
