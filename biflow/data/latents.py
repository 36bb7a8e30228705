"""Pre-encoded autoencoder latents: image shards -> latent shards.

A diffusers ``AutoencoderKL`` (a local folder or a hub id) encodes every image
of an image-shard set on Ray Data actors (one per GPU when there are GPUs,
else CPU actors). Latent shards have the columns ``latent`` (raw bytes of a
``latent_dtype`` array of shape ``latent_shape``), ``label`` and ``key``. The
manifest stores the posterior *mean* of each image (deterministic), the
per-channel mean/std over the split (the pipeline normalises with them) and
the autoencoder's id and scaling factor, so samples can be decoded with
``latents_to_images``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np

from biflow.data import storage
from biflow.data.pipeline import _classic_parquet_reader, preserve_order
from biflow.data.shards import MANIFEST, Manifest, _try_read_manifest, ensure_ray, read_manifest, table_bytes
from biflow.errors import UserError


def load_autoencoder(name_or_path: str, device: str = "cpu"):
    """``AutoencoderKL`` from a local folder (``save_pretrained`` layout) or a hub id."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:  # pragma: no cover
        raise UserError("latents need diffusers: pip install 'biflow[latents]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load AutoencoderKL {name_or_path!r}: {str(exc).splitlines()[0]} "
                        "(give a local folder with config.json + weights, or a hub id such as "
                        "stabilityai/sd-vae-ft-ema with network access)") from None
    return vae.to(device).eval()


def _scaling_factor(name_or_path: str) -> float:
    """From the autoencoder's config alone (no weights on the driver)."""
    from diffusers import AutoencoderKL

    try:
        return float(AutoencoderKL.load_config(name_or_path).get("scaling_factor", 1.0))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load AutoencoderKL {name_or_path!r}: {str(exc).splitlines()[0]}") from None


class EncodeLatents:
    """Ray Data actor: uint8 images -> latent bytes + per-row channel moments."""

    def __init__(self, autoencoder: str, image_size: int | None, dtype: str):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_autoencoder(autoencoder, self.device)
        self.image_size, self.dtype = image_size, np.dtype(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import io

        import torch
        from PIL import Image

        from biflow.data.shards import resize_center_crop

        images = []
        for data in batch["image"]:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            if self.image_size:
                img = resize_center_crop(img, self.image_size)
            images.append(np.asarray(img))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.device)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean.float().cpu().numpy()
        return {
            "latent": [row.astype(self.dtype).tobytes() for row in z],
            "label": batch["label"].astype(np.int64),
            "key": batch["key"],
            "shape": np.tile(np.asarray(z.shape[1:], np.int64), (len(z), 1)),
            "sum": z.sum(axis=(2, 3)).astype(np.float64),
            "sumsq": (z.astype(np.float64) ** 2).sum(axis=(2, 3)),
        }


def prepare_latents(source_uri: str, out_uri: str, autoencoder: str, *, splits: list[str] | None = None,
                    endpoint: str = "", region: str = "", image_size: int = 0, batch_size: int = 32,
                    shard_size_mb: float = 128.0, dtype: str = "float16", limit: int = 0,
                    force: bool = False, progress: bool = True, num_cpus: int | None = None) -> Manifest:
    """Encode the image shards at ``source_uri`` into latent shards at ``out_uri``."""
    import ray

    src = read_manifest(source_uri, endpoint, region)
    if src.kind != "pixels":
        raise UserError(f"{source_uri} holds {src.kind}, not image shards")
    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype must be float16 or float32, got {dtype}")
    splits = splits or src.splits
    in_fs, in_root = storage.resolve(source_uri, endpoint, region)
    fs, root = storage.resolve(out_uri, endpoint, region)
    options = {"source_fingerprint": src.data.get("fingerprint"), "autoencoder": autoencoder,
               "image_size": image_size, "dtype": dtype, "limit": limit, "splits": splits,
               "shard_size_mb": shard_size_mb}
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    previous = _try_read_manifest(fs, root)
    if previous and previous.get("fingerprint") == fingerprint and not force:
        if progress:
            print(f"{out_uri}: latents already up to date (fingerprint {fingerprint})")
        return Manifest(previous, out_uri)

    ensure_ray(num_cpus)
    from biflow.fleet.capacity import reachable

    gpus = int(reachable("GPU"))  # what the fleet can scale to, not what is up now
    scaling_factor = _scaling_factor(autoencoder)
    t0 = time.perf_counter()
    manifest: dict[str, Any] = {
        "format_version": src.data["format_version"], "kind": "latents", "fingerprint": fingerprint,
        "source": {"format": "image-shards", "path": source_uri, "fingerprint": src.data.get("fingerprint")},
        "autoencoder": autoencoder, "scaling_factor": scaling_factor, "latent_dtype": dtype,
        "columns": ["latent", "label", "key"], "classes": src.classes, "class_names": src.class_names,
        "source_image_size": image_size or src.image_size, "options": options, "splits": {},
    }
    stats = None
    with preserve_order():
        for split in splits:
            paths = [storage.join(in_root, p) for p in src.shard_paths(split)]
            with _classic_parquet_reader():
                ds = ray.data.read_parquet(paths, filesystem=in_fs, file_extensions=None)
            ds = ds.select_columns(["image", "label", "key"])
            if limit:
                ds = ds.limit(limit)
            # GPU encoders grow from one as the autoscaler brings GPU nodes up
            pool = ray.data.ActorPoolStrategy(min_size=1, max_size=gpus) if gpus else ray.data.ActorPoolStrategy(size=1)
            actor_args: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
            ds = ds.map_batches(EncodeLatents, fn_constructor_args=(autoencoder, image_size or None, dtype),
                                batch_size=batch_size, batch_format="numpy", compute=pool, **actor_args)
            writer = _RollingWriter(fs, root, split, fingerprint, shard_size_mb * 2**20)
            moments = None
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
                s = np.concatenate([batch["sum"].sum(0), batch["sumsq"].sum(0), [len(batch["label"])]])
                moments = s if moments is None else moments + s
                shape = [int(v) for v in batch["shape"][0]]
                if progress:
                    print(f"\rprepare-latents {split}: {writer.records} images, "
                          f"{writer.records / (time.perf_counter() - t0):.1f} img/s", end="", flush=True)
            writer.close()
            if progress:
                print()
            if moments is None:
                raise UserError(f"split {split!r} of {source_uri} has no images")
            manifest["splits"][split] = {"records": writer.records, "bytes": sum(s["bytes"] for s in writer.shards),
                                         "num_skipped": 0, "skipped": [], "shards": writer.shards}
            if stats is None:  # statistics of the first (training) split normalise every split
                c = shape[0]
                count = moments[-1] * shape[1] * shape[2]
                mean = moments[:c] / count
                std = np.sqrt(np.maximum(moments[c:2 * c] / count - mean**2, 1e-12))
                stats = {"latent_shape": shape, "latent_mean": mean.tolist(), "latent_std": std.tolist(),
                         "stats_split": split}
    manifest.update(stats or {})
    manifest["image_size"] = manifest["latent_shape"][1]
    manifest["channels"] = manifest["latent_shape"][0]
    manifest["conversion_seconds"] = round(time.perf_counter() - t0, 2)
    storage.write_bytes(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return Manifest(manifest, out_uri)


class _RollingWriter:
    """Writes latent rows into shards of about ``shard_bytes``, in arrival order."""

    def __init__(self, fs, root: str, split: str, fingerprint: str, shard_bytes: float):
        self.fs, self.root, self.split, self.fingerprint, self.shard_bytes = fs, root, split, fingerprint, shard_bytes
        self.rows: dict[str, list] = {"latent": [], "label": [], "key": []}
        self.pending_bytes, self.records, self.shards = 0, 0, []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.rows["latent"] += list(batch["latent"])
        self.rows["label"] += [int(v) for v in batch["label"]]
        self.rows["key"] += [str(v) for v in batch["key"]]
        self.pending_bytes += sum(len(b) for b in batch["latent"])
        self.records += len(batch["label"])
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.rows["label"]:
            return
        rel = f"{self.split}/{self.split}-{self.fingerprint}-{len(self.shards):05d}.parquet"
        data = table_bytes({"latent": pa.array(self.rows["latent"], pa.binary()),
                            "label": pa.array(self.rows["label"], pa.int64()),
                            "key": pa.array(self.rows["key"], pa.string())}, 1024)
        storage.write_bytes(self.fs, storage.join(self.root, rel), data)
        self.shards.append({"path": rel, "records": len(self.rows["label"]), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.rows = {"latent": [], "label": [], "key": []}
        self.pending_bytes = 0

    def close(self) -> None:
        self.flush()


def latents_to_images(z: "torch.Tensor", manifest: Manifest, vae) -> "torch.Tensor":  # noqa: F821
    """Normalised latents (as the pipeline yields them) -> images in [-1, 1]."""
    return LatentCodec(vae, manifest.data["latent_mean"], manifest.data["latent_std"]).decode(z)


# ---------------------------------------------------------------------------
# The frozen autoencoder of a latent shard set
# ---------------------------------------------------------------------------


def latent_info(manifest: Manifest, override: str = "") -> dict[str, Any]:
    """The decoding record of a latent shard set: autoencoder id, per-channel mean and std."""
    return {"autoencoder": autoencoder_source(manifest, override), "latent_mean": list(manifest.data["latent_mean"]),
            "latent_std": list(manifest.data["latent_std"])}


def autoencoder_source(manifest: Manifest, override: str = "", key: str = "data.autoencoder") -> str:
    """The autoencoder that decodes ``manifest``'s latents: ``override`` (a local
    folder or hub id, from ``data.autoencoder``) or the id the manifest recorded."""
    name = override or str(manifest.data.get("autoencoder") or "")
    if not name:
        raise UserError(f"{manifest.uri} holds latents but names no autoencoder to decode them; set {key} "
                        "to a local diffusers AutoencoderKL folder or a hub id")
    return name


def autoencoder_latent_shape(name_or_path: str, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents an AutoencoderKL makes from ``image_size`` px images,
    read from its config alone (no weights)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:  # pragma: no cover
        raise UserError("latents need diffusers: pip install 'biflow[latents]'") from None
    try:
        config = AutoencoderKL.load_config(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load AutoencoderKL {name_or_path!r}: {str(exc).splitlines()[0]} "
                        "(give a local folder with config.json + weights, or a hub id with network access)") from None
    factor = 2 ** (len(config.get("block_out_channels", (0,))) - 1)
    side = image_size // factor
    return int(config.get("latent_channels", 4)), side, side


def check_latent_setup(manifest: Manifest, flow_channels: int, flow_image_size: int, override: str = "") -> str:
    """Before any worker starts: an autoencoder exists for a latent shard set, and its
    latents, the shards' and the flow's shapes agree. Returns the autoencoder source."""
    want = (flow_channels, flow_image_size, flow_image_size)
    stored = tuple(int(v) for v in manifest.data.get("latent_shape", ()))
    if stored and stored != want:
        raise UserError(f"{manifest.uri} holds latents of shape {stored}, but flow.channels/flow.image_size "
                        f"give {want}: set flow.channels={stored[0]} flow.image_size={stored[1]}")
    source = autoencoder_source(manifest, override)
    pixels = int(manifest.data.get("source_image_size") or 0)
    if pixels:
        made = autoencoder_latent_shape(source, pixels)
        if made != want:
            raise UserError(f"autoencoder {source!r} makes latents of shape {made} from {pixels}-px images, "
                            f"but flow.channels/flow.image_size give {want}; use the autoencoder that encoded "
                            f"{manifest.uri} (data.autoencoder)")
    return source


class LatentCodec:
    """A frozen ``AutoencoderKL`` plus the per-channel normalisation of a latent
    shard set: ``decode`` maps normalised latents (what the pipeline yields and
    the models see) to images in [-1, 1], ``encode`` maps images back.

    Decoding keeps the autograd graph when asked (``grad=True``), so a loss on
    decoded images (the perceptual term) trains the model through the frozen
    decoder; the decoder's own weights never need gradients."""

    def __init__(self, vae, mean, std, source: str = ""):
        import torch

        self.source = source  # the autoencoder's folder or hub id, as given
        self.vae = vae.eval().requires_grad_(False)
        p = next(vae.parameters())
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=p.device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=p.device).view(1, -1, 1, 1)

    @classmethod
    def from_manifest(cls, manifest: Manifest, override: str = "", device: Any = "cpu") -> "LatentCodec":
        return cls.from_info(latent_info(manifest), override, device)

    @classmethod
    def from_info(cls, info: dict[str, Any], override: str = "", device: Any = "cpu") -> "LatentCodec":
        """From :func:`latent_info`'s record (kept in checkpoints and exported models, so
        decoding needs no shards); ``override``: another folder or hub id of the autoencoder."""
        source = override or str(info.get("autoencoder") or "")
        if not source:
            raise UserError("these latents name no autoencoder to decode them; give a local diffusers "
                            "AutoencoderKL folder or a hub id (data.autoencoder / --autoencoder)")
        return cls(load_autoencoder(source, str(device)), info["latent_mean"], info["latent_std"], source)

    def info(self) -> dict[str, Any]:
        """What decoding needs besides the weights: the autoencoder's id and the latent statistics."""
        return {"autoencoder": self.source, "latent_mean": [float(v) for v in self.mean.flatten()],
                "latent_std": [float(v) for v in self.std.flatten()]}

    @classmethod
    def from_data_config(cls, data_cfg, device: Any = "cpu") -> "LatentCodec":
        return cls.from_manifest(read_manifest(data_cfg.uri, data_cfg.endpoint, data_cfg.region),
                                 data_cfg.autoencoder, device)

    def to(self, device: Any) -> "LatentCodec":
        import torch

        self.vae.to(device)
        if torch.device(device).type == "cuda":  # channels_last: the layout cuDNN's bf16 convolutions want
            self.vae.to(memory_format=torch.channels_last)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @property
    def device(self):
        return self.mean.device

    def decode(self, z, grad: bool = False, clamp: bool = True):
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (float32)."""
        import torch

        dtype = next(self.vae.parameters()).dtype
        gpu = self.mean.device.type == "cuda"  # bf16 autocast on a GPU: the decoder is conv-heavy
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), \
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            raw = z.to(self.mean.device, torch.float32) * self.std + self.mean
            raw = raw.to(dtype).contiguous(memory_format=torch.channels_last) if gpu else raw.to(dtype)
            x = self.vae.decode(raw).sample.float()
        return x.clamp(-1, 1) if clamp else x

    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (posterior means, as the shards hold)."""
        import torch

        dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            z = self.vae.encode(images.to(self.mean.device, dtype)).latent_dist.mean.float()
        return (z - self.mean) / self.std
