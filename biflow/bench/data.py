"""``biflow bench data``: the data plane's numbers, as JSON.

1. conversion throughput of ``prepare-data`` (images/s into parquet on S3);
2. images/s through the Ray Data pipeline (read from a local S3 server,
   decode, flip, collate to float) vs a plain single-process PIL loop that
   reads the same shards from the same server on the same cores;
3. the fraction of a training step spent waiting for data, for a model step
   passed in by the caller (the CLI passes the quickstart TARFlow) or a
   fixed-cost stand-in conv net.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from biflow.config import DataConfig
from biflow.data import storage
from biflow.data.shards import FASHION_MNIST_DIR, FASHION_MNIST_FILES, ensure_ray, prepare_data, read_manifest
from biflow.errors import UserError

BENCH_BUCKET = "biflow-bench"


def start_moto_server(timeout_s: float = 30.0) -> tuple[subprocess.Popen, int]:
    """``moto_server`` on loopback on a port it picks itself (``-p 0``), read back
    from the address it logs: no free-port guess that another process can take."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if not exe:
        raise UserError("a local S3 server needs moto: pip install 'moto[server]' (in biflow[test])")
    # the log goes to a file, not a pipe: the server logs every request and would block on a full pipe
    log = tempfile.NamedTemporaryFile(prefix="biflow-moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", "0"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", Path(log.name).read_text(errors="replace"))
            if found:
                port = int(found.group(1))
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        return proc, port
                except OSError:
                    pass
            time.sleep(0.1)
        proc.kill()
        raise UserError(f"moto_server did not start: {Path(log.name).read_text(errors='replace')[-500:]}")
    finally:
        os.unlink(log.name)


def start_local_s3() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on loopback, with throwaway credentials in this process's
    environment (Ray started afterwards inherits them)."""
    proc, port = start_moto_server()
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ.setdefault(key, value)
    return proc, f"http://127.0.0.1:{port}"


def synthetic_jpeg_tree(root: Path, images: int, size: int = 64, classes: int = 10, seed: int = 0) -> Path:
    """Class-per-folder RGB JPEGs with smooth random content (compresses like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        img.save(d / f"img{i:06d}.jpg", quality=90)
    return root


def pil_baseline(uri: str, endpoint: str, split: str, batch_size: int, image_size: int, channels: int) -> dict:
    """Single process: read shards with pyarrow, PIL-decode, flip, float [-1, 1] torch batches."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    manifest = read_manifest(uri, endpoint)
    fs, root = storage.resolve(uri, endpoint)
    mode = "L" if channels == 1 else "RGB"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    n, pending = 0, []
    for rel in manifest.shard_paths(split):
        with fs.open_input_file(storage.join(root, rel)) as f:
            table = pq.read_table(f, columns=["image", "label"])
        for data, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
            img = Image.open(io.BytesIO(data)).convert(mode)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BICUBIC)
            a = np.asarray(img, np.uint8)
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            if rng.random() < 0.5:
                a = a[:, :, ::-1]
            pending.append((a, label))
            if len(pending) == batch_size:
                x = torch.from_numpy(np.stack([p[0] for p in pending])).float().div_(127.5).sub_(1.0)
                torch.tensor([p[1] for p in pending])
                n += len(x)
                pending = []
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)}


def pipeline_throughput(cfg: DataConfig, split: str, batch_size: int, epochs: int = 2) -> dict:
    from biflow.data.pipeline import build_dataset, iter_worker_batches

    ds = build_dataset(cfg, split, train=True)
    runs = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        first = None
        n = 0
        for x, _ in iter_worker_batches(ds, batch_size, epoch=epoch, shuffle_buffer=cfg.shuffle_buffer,
                                        device="cpu"):
            if first is None:
                first = time.perf_counter() - t0
            n += len(x)
        seconds = time.perf_counter() - t0
        runs.append({"epoch": epoch, "images": n, "seconds": round(seconds, 3),
                     "first_batch_s": round(first or 0.0, 3), "images_per_s": round(n / seconds, 1),
                     "steady_images_per_s": round((n - batch_size) / max(seconds - (first or 0), 1e-9), 1)})
    return {"epochs": runs, "images_per_s": max(r["images_per_s"] for r in runs)}


def standin_step(channels: int, image_size: int, num_classes: int = 10) -> tuple[Callable, str]:
    """A fixed-cost conv net step (AdamW), for when no real model is at hand."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, num_classes))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)

    def step(x, y):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    params = sum(p.numel() for p in net.parameters())
    return step, f"stand-in conv net ({params / 1e3:.0f}k params), not the real model"


def data_wait(cfg: DataConfig, split: str, batch_size: int, steps: int, train_step: Callable,
              warmup: int = 5) -> dict:
    """Time blocked in next(batch) vs time in the step, per step, after ``warmup`` steps."""
    from biflow.data.pipeline import build_dataset, iter_worker_batches

    ds = build_dataset(cfg, split, train=True)
    wait, compute, epoch, done = [], [], 0, 0
    t_start = time.perf_counter()
    while done < steps + warmup:
        it = iter(iter_worker_batches(ds, batch_size, epoch=epoch, shuffle_buffer=cfg.shuffle_buffer,
                                      prefetch_batches=cfg.prefetch_batches, device="cpu"))
        while done < steps + warmup:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            train_step(x, y)
            t2 = time.perf_counter()
            wait.append(t1 - t0)
            compute.append(t2 - t1)
            done += 1
        epoch += 1
    w, c = np.array(wait[warmup:]), np.array(compute[warmup:])
    return {
        "steps": len(w), "warmup_steps": warmup, "epochs_touched": epoch,
        "step_ms_median": round(1e3 * float(np.median(w + c)), 2),
        "compute_ms_median": round(1e3 * float(np.median(c)), 2),
        "wait_ms_median": round(1e3 * float(np.median(w)), 3),
        "wait_ms_p95": round(1e3 * float(np.percentile(w, 95)), 3),
        "data_wait_fraction": round(float(w.sum() / (w.sum() + c.sum())), 4),
        "data_wait_fraction_incl_warmup": round(float(sum(wait) / (sum(wait) + sum(compute))), 4),
        "startup_wait_s": round(float(sum(wait[:warmup])), 3),
        "wall_s": round(time.perf_counter() - t_start, 2),
    }


def bench_data(out: Path, *, source: str = "", images: int = 10000, batch_size: int = 64, steps: int = 60,
               train_step: Callable | None = None, model_desc: str = "", num_cpus: int = 2,
               endpoint: str = "", bucket: str = BENCH_BUCKET) -> dict[str, Any]:
    """Run the three measurements and write ``out/data.json``."""
    import ray
    import torch

    proc = None
    if not endpoint:
        proc, endpoint = start_local_s3()
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        try:
            s3.create_bucket(Bucket=bucket)
        except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            pass
        ensure_ray(num_cpus)
        fmnist = Path(source or FASHION_MNIST_DIR)
        tmp = None
        if source != "synthetic" and (fmnist / FASHION_MNIST_FILES["train"][0]).is_file():
            fmt, src, image_size, desc = "fashion-mnist", str(fmnist), 28, "Fashion-MNIST 28x28x1 PNG"
        else:
            tmp = Path(tempfile.mkdtemp(prefix="biflow-bench-"))
            fmt, image_size, desc = "folder", 64, "synthetic 64x64x3 JPEG"
            train_step = None  # the model step is for 28x28x1; use the stand-in
            src = str(synthetic_jpeg_tree(tmp / "src", images))
        uri = f"s3://{bucket}/{fmt}-{images}"
        t0 = time.perf_counter()
        manifest = prepare_data(src, uri, fmt, endpoint=endpoint, splits=["train"], limit=images,
                                image_size=0 if fmt == "fashion-mnist" else image_size, force=True, progress=False)
        convert_s = time.perf_counter() - t0
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        records = manifest.records("train")
        cfg = DataConfig(uri=uri, endpoint=endpoint, shuffle_buffer=min(2048, records // 4))
        pipe = pipeline_throughput(cfg, "train", batch_size)
        base = pil_baseline(uri, endpoint, "train", batch_size, image_size, manifest.channels)
        if train_step is None:
            train_step, model_desc = standin_step(manifest.channels, image_size)
        wait = data_wait(cfg, "train", batch_size, steps, train_step)
        result = {
            "benchmark": "data",
            "dataset": desc,
            "records": records,
            "storage": "moto S3 server on loopback" if proc else "given S3 endpoint",
            "machine": {"cpus": os.cpu_count(), "ray_cpus": ray.cluster_resources().get("CPU"),
                        "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
            "conversion": {"images": records, "seconds": round(convert_s, 2),
                           "images_per_s": round(records / convert_s, 1),
                           "shards": len(manifest.shard_paths("train")),
                           "bytes": manifest.split("train")["bytes"]},
            "pipeline": pipe,
            "pil_baseline": base,
            "pipeline_vs_pil": round(pipe["images_per_s"] / base["images_per_s"], 3),
            "batch_size": batch_size,
            "model": model_desc,
            "data_wait": wait,
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("conversion", "pipeline_vs_pil")}, indent=1))
    print(f"pipeline {pipe['images_per_s']} img/s vs PIL {base['images_per_s']} img/s; data wait "
          f"{100 * wait['data_wait_fraction']:.2f}% of a {wait['step_ms_median']} ms step ({model_desc}); "
          f"wrote {out / 'data.json'}")
    return result
