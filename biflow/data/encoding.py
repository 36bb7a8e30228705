"""Encoding and writing of shards (runs inside the Ray tasks of the
conversion): resize / center-crop, PNG or JPEG encoding, parquet tables, and
the writer that turns rows into shard files."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np

from biflow.data import storage


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
