"""Checkpoints: what is in one, where runs keep them, how to find and load one (exports: biflow.pretrained).

A checkpoint directory, as Ray Train stores it under ``STORAGE/RUN/``::

    checkpoint_00000200/
      metadata.json        step, epoch, data position, config, versions (rank 0)
      ema.safetensors      full fp32 EMA weights + config in the header (rank 0)
      deepspeed/...        DeepSpeed engine state, one file per rank for ZeRO
      ddp_state.pt         (plain DDP engine instead of DeepSpeed)
      COMMITTED            written last, once every rank's upload finished

Every rank writes its engine state into its own local temp dir and reports it;
Ray merges the directories. The directory name carries the global step, so the
latest checkpoint of a run is the one with the largest number among the
committed ones (a run killed during an upload leaves a directory without
``COMMITTED``; it is never taken as a checkpoint).

Nothing here reads environment variables or credentials: the filesystem comes
from :func:`biflow.data.storage.resolve`.
"""

from __future__ import annotations

import json
import platform
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from biflow.config import ConfigError, ExperimentConfig
from biflow.data import storage
from biflow.errors import UserError

METADATA = "metadata.json"
EMA_FILE = "ema.safetensors"
# Written by rank 0 after every rank's upload finished: ``ray.train.report`` has no
# barrier after the upload, so ema.safetensors alone may sit beside missing ZeRO files.
COMMIT_FILE = "COMMITTED"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def versions() -> dict[str, str]:
    """Library versions recorded with every checkpoint."""
    import biflow

    out = {"biflow": biflow.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("ray", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - optional at export time
            pass
    return out


def write_rank0_files(directory: str | Path, ema_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """metadata.json and ema.safetensors (config JSON in the safetensors header)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    metadata = {**metadata, "versions": versions()}
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    header = {"format": "biflow-ema", "stage": str(metadata.get("stage", "")), "step": str(metadata.get("step", "")),
              "config": json.dumps(metadata.get("config", {}), sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in ema_state.items()}
    save_file(tensors, str(directory / EMA_FILE), metadata=header)


@dataclass
class CheckpointRef:
    """A checkpoint found in storage: filesystem, path and its step."""

    fs: pafs.FileSystem
    path: str
    uri: str
    step: int

    def read(self, name: str) -> bytes:
        try:
            return storage.read_bytes(self.fs, storage.join(self.path, name))
        except (OSError, FileNotFoundError) as exc:
            raise UserError(f"cannot read {name} from checkpoint {self.uri}: {str(exc).splitlines()[0]}") from None

    def metadata(self) -> dict[str, Any]:
        return json.loads(self.read(METADATA))

    def ema_state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.read(EMA_FILE))


def _join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_committed(fs: pafs.FileSystem, path: str) -> bool:
    """A complete checkpoint: EMA weights and the commit marker written after every
    rank's upload. Checkpoints written before the marker existed (no
    ``commit_marker`` in their metadata) count when their EMA file exists."""
    if not storage.exists(fs, storage.join(path, EMA_FILE)):
        return False
    if storage.exists(fs, storage.join(path, COMMIT_FILE)):
        return True
    try:
        return not json.loads(storage.read_bytes(fs, storage.join(path, METADATA))).get("commit_marker", False)
    except (OSError, ValueError):
        return False


def commit(fs: pafs.FileSystem, path: str) -> None:
    storage.write_bytes(fs, storage.join(path, COMMIT_FILE), b"ok\n")


DIVERGED_FILE = "DIVERGED"


def mark_diverged(run_uri: str, endpoint: str, region: str, message: str) -> None:
    """Rank 0, when the run stops on non-finite steps: Ray's FailureConfig would
    otherwise restart it from the same checkpoint into the same divergence."""
    fs, path = storage.resolve(run_uri, endpoint, region, check=False)
    storage.write_bytes(fs, storage.join(path, DIVERGED_FILE), message.encode())


def diverged(run_uri: str, endpoint: str = "", region: str = "") -> str | None:
    """The message of a run stopped for divergence, or None."""
    fs, path = storage.resolve(run_uri, endpoint, region, check=False)
    try:
        return storage.read_bytes(fs, storage.join(path, DIVERGED_FILE)).decode()
    except FileNotFoundError:
        return None


def clear_diverged(run_uri: str, endpoint: str = "", region: str = "") -> None:
    """A new ``fit`` of the run is a deliberate retry (e.g. with a lower lr)."""
    fs, path = storage.resolve(run_uri, endpoint, region, check=False)
    if storage.exists(fs, storage.join(path, DIVERGED_FILE)):
        fs.delete_file(storage.join(path, DIVERGED_FILE))


def _checkpoints_in(fs: pafs.FileSystem, run_path: str) -> list[tuple[int, str]]:
    selector = pafs.FileSelector(run_path, recursive=False, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        m = CHECKPOINT_RE.match(posixpath.basename(info.path))
        if m and info.type == pafs.FileType.Directory and is_committed(fs, info.path):
            found.append((int(m.group(1)), posixpath.basename(info.path)))
    return sorted(found)


def find_checkpoint(ref: str, storage_uri: str = "", endpoint: str = "", region: str = "",
                    key: str = "train.forward_checkpoint", check: bool = True) -> CheckpointRef:
    """Resolve ``ref`` to one checkpoint.

    ``ref`` may be a checkpoint directory (local path, s3:// or gs:// URI), a run
    directory (the latest checkpoint in it is used) or a bare run name, looked
    up under ``storage_uri``. Errors name ``key`` and where it looked. ``check``
    asks first whether the bucket exists (quickly; see :func:`storage.resolve`).
    """
    ref = ref.strip()
    if not ref:
        raise UserError(f"{key} is empty: give a stage-1 run name or a checkpoint path/URI")
    candidates = []
    is_uri = "://" in ref or ref.startswith(("/", ".", "~")) or Path(ref).exists()
    if is_uri:
        candidates.append(ref)
    if storage_uri and "://" not in ref and not ref.startswith(("/", "~")):
        candidates.append(_join_uri(storage_uri, ref))
    looked = []
    for uri in candidates:
        fs, path = storage.resolve(uri, endpoint, region, check=check)
        looked.append(uri)
        if is_committed(fs, path):
            m = CHECKPOINT_RE.match(posixpath.basename(path))
            step = int(m.group(1)) if m else -1
            return CheckpointRef(fs, path, uri, step)
        found = _checkpoints_in(fs, path)
        if found:
            step, name = found[-1]
            return CheckpointRef(fs, storage.join(path, name), _join_uri(uri, name), step)
    if not looked:
        raise UserError(f"{key}={ref!r}: no checkpoint found: it is not a path, and no run storage was given to look "
                        f"the run name up in; pass --storage (a local dir, s3:// or gs:// URI) or a checkpoint path")
    hint = "train the forward stage first, or give" if "forward" in key else "give"
    raise UserError(f"{key}={ref!r}: no checkpoint found (looked in {', '.join(looked)}); "
                    f"{hint} a run name under the run storage, a run dir, a checkpoint URI"
                    + ("" if "forward" in key else " or a `biflow export` folder"))


def check_world_size(saved: Any, workers: int, run_uri: str) -> None:
    """ZeRO state (partitioned optimizer and parameters) only loads at the world
    size it was written with: the one rule, checked on the driver before workers
    start and again by the worker that restores."""
    if saved != workers:
        raise ConfigError(f"ray.workers={workers}: run {run_uri} was checkpointed with {saved} workers and ZeRO "
                          f"state only resumes at the same world size; use --workers {saved} or a new --name")


def latest_checkpoint(run_uri: str, endpoint: str = "", region: str = "") -> CheckpointRef | None:
    """The latest complete checkpoint of a run directory, or None. Workers ask this while
    training, so it takes the storage's long retry budget (the driver checked the bucket)."""
    fs, path = storage.resolve(run_uri, endpoint, region, check=False)
    found = _checkpoints_in(fs, path)
    if not found:
        return None
    step, name = found[-1]
    return CheckpointRef(fs, storage.join(path, name), _join_uri(run_uri, name), step)


# ---------------------------------------------------------------------------
# Loading trained models (EMA weights) from a checkpoint
# ---------------------------------------------------------------------------


@dataclass
class Loaded:
    model: torch.nn.Module | None  # None: an export's flow whose weights were left out
    config: ExperimentConfig
    stage: str
    step: int
    uri: str
    latents: dict[str, Any] | None = None  # the latent codec's record (autoencoder id, statistics), when kept
    name: str = ""  # the run's name


def _clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def saved_config(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config, with the defaults it was written under: a flow saved before
    ``flow.out_norm`` existed had the LayerNorm before its output projections."""
    config = json.loads(json.dumps(meta["config"]))
    flow = config.get("flow")
    if isinstance(flow, dict) and "out_norm" not in flow:
        flow["out_norm"] = True
    return config


def load_checkpoint(ref: str, storage: str = "", endpoint: str = "", region: str = "",
                    device: str | torch.device = "cpu", key: str = "CHECKPOINT", check: bool = True) -> Loaded:
    """The EMA model of a checkpoint (run name, run dir or checkpoint dir/URI)."""
    from biflow.config import load_config
    from biflow.models import ReverseModel, build_flow

    ckpt = find_checkpoint(ref, storage, endpoint, region, key=key, check=check)
    meta = ckpt.metadata()
    cfg = load_config(saved_config(meta))
    stage = meta.get("stage", cfg.stage)
    model = build_flow(cfg.flow) if stage == "forward" else ReverseModel(cfg.reverse, cfg.flow)
    missing, unexpected = model.load_state_dict(_clean_state(ckpt.ema_state()), strict=False)
    if missing or unexpected:
        raise UserError(f"{key}={ref!r}: weights do not match the {stage} model of its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if stage == "forward":
        model.after_load()  # weight-derived buffers (resflow's spectral norms) follow the loaded EMA weights
    return Loaded(model.to(device).eval(), cfg, stage, ckpt.step, ckpt.uri, meta.get("latents"),
                  str(meta.get("run") or cfg.name))


def load_pair(checkpoint: str, forward: str = "", storage: str = "", endpoint: str = "", region: str = "",
              device: str | torch.device = "cpu", with_flow: bool = True) -> tuple[Loaded, Loaded | None]:
    """(forward flow, reverse model or None) from a reverse or forward checkpoint or run
    (:func:`biflow.pretrained.load_pair` also takes export folders). ``with_flow=False``: a
    reverse run's flow is not looked up (its Loaded has no model)."""
    first = load_checkpoint(checkpoint, storage, endpoint, region, device)
    if first.stage == "forward":
        return first, None
    if with_flow is False:
        return Loaded(None, first.config, "forward", -1, "", first.latents), first
    ref = forward or first.config.train.forward_checkpoint
    store = storage or first.config.ray.storage
    flow = load_checkpoint(ref, store, endpoint or first.config.ray.storage_endpoint, region, device,
                           key="--forward (or the reverse run's train.forward_checkpoint)")
    return flow, first
