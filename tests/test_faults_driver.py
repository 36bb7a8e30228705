"""Faults around the driver, the data and the object store, with `biflow train`
run as a real subprocess against S3 (moto) behind a loopback TCP proxy.

The proxy stands for the S3 endpoint: stopping it refuses and resets every
connection exactly like a stopped server, and restarting it on the same port
brings the same data back (moto keeps its objects in memory, so stopping moto
itself would also wipe the bucket).

One dataset with bad shards (one truncated, one overwritten with garbage, one
valid shard holding undecodable images) and distinctive fake credentials serve
every case here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest


pytestmark = pytest.mark.faults

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
FWD = str(REPO / "jobs" / "smoke-forward.yaml")
CANARY_KEY = "AKIAFAULTCANARY7Q2XZ"
CANARY_SECRET = "canarySecret+faults/9f3b2cQWERTY"
CORRUPT_IMAGES = 5


class S3Proxy:
    """A TCP proxy on loopback in front of the S3 server; ``stop()`` / ``start()`` an outage.
    With ``trip`` set, the first request whose bytes contain it is not forwarded: the proxy
    stops right there (an outage that begins in the middle of that request) and sets ``tripped``."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = 0  # picked by the OS at the first start(), then kept across outages
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server: socket.socket | None = None
        self.trip = b""
        self.tripped = threading.Event()

    def start(self) -> "S3Proxy":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        self.port = srv.getsockname()[1]
        srv.listen(64)
        self.server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def stop(self) -> None:
        srv, self.server = self.server, None
        if srv is not None:
            srv.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()  # RST, like a server that went away
            except OSError:
                pass

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, watch), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if watch and self.trip and self.trip in data:
                    self.trip = b""
                    self.tripped.set()
                    self.stop()
                    return
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_dataset(client, bucket: str, prefix: str) -> dict:
    """6 train shards of 128 images: #1 has CORRUPT_IMAGES undecodable images, #4 is
    truncated, #5 overwritten with garbage (the manifest describes the good files)."""
    from biflow.data.shards import table_bytes
    from tests.test_train_ray import _images

    x, y = _images(6 * 128)
    shards = []
    for i in range(6):
        rows = range(i * 128, (i + 1) * 128)
        images = [_png(x[r, 0]) for r in rows]
        if i == 1:
            for j in range(CORRUPT_IMAGES):
                images[j * 20] = b"\x89PNG garbage " + bytes(range(200))
        data = table_bytes({"image": images, "label": [int(y[r]) for r in rows],
                            "key": [f"train/{r}" for r in rows]}, 64)
        path = f"train/train-faults-{i:05d}-of-00006.parquet"
        shards.append({"path": path, "records": 128, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        if i == 4:
            data = data[: len(data) // 2]
        elif i == 5:
            data = os.urandom(len(data) // 3)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path}", Body=data)
    manifest = {"format_version": 1, "kind": "pixels", "fingerprint": "faults", "image_size": 28, "channels": 1,
                "encoding": "png", "columns": ["image", "label", "key"], "classes": [str(c) for c in range(10)],
                "splits": {"train": {"records": 768, "bytes": sum(s["bytes"] for s in shards), "num_skipped": 0,
                                     "skipped": [], "shards": shards}}}
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())
    return manifest


@pytest.fixture(scope="module")
def store(s3_server):
    proxy = S3Proxy(int(s3_server.endpoint.rsplit(":", 1)[1])).start()
    bucket = s3_server.make_bucket("faults-driver")
    write_bad_dataset(s3_server.client(), bucket, "data")
    yield {"proxy": proxy, "endpoint": f"http://127.0.0.1:{proxy.port}", "bucket": bucket,
           "client": s3_server.client()}
    proxy.stop()


def train_cmd(store, name: str, extra: list[str]) -> list[str]:
    ep = store["endpoint"]
    return [str(BIN / "biflow"), "train", "forward", "-c", FWD, "--name", name,
            "--storage", f"s3://{store['bucket']}/runs",
            "--set", f"data.uri=s3://{store['bucket']}/data", "--set", f"data.endpoint={ep}",
            "--set", f"ray.storage_endpoint={ep}", "--set", "train.log_every=1",
            "--set", "train.keep_checkpoints=10", "--set", "data.shuffle_buffer=64", *extra]


def canary_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update(AWS_ACCESS_KEY_ID=CANARY_KEY, AWS_SECRET_ACCESS_KEY=CANARY_SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    return env


def committed(client, bucket: str, run: str) -> list[int]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"runs/{run}/")
            for o in page.get("Contents", [])]
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"checkpoint_(\d+)/COMMITTED$", k)))


def download(client, bucket: str, prefix: str) -> dict[str, bytes]:
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])}


@pytest.mark.slow  # passes alone; failed when run after the whole default tier in one process (open: see notes)
def test_driver_killed_rerun_resumes_skipping_bad_data_and_leaking_no_credentials(store, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="bff-", dir="/tmp")
    env = canary_env(ray_tmp)
    cmd = train_cmd(store, "drv", ["--set", "train.steps=12", "--set", "train.checkpoint_every=3",
                                   "--set", "ray.max_failures=0"])
    log1 = tmp_path / "run1.log"
    t0 = time.perf_counter()
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and 6 not in committed(store["client"], store["bucket"], "drv"):
            time.sleep(0.5)
        assert proc.poll() is None, log1.read_text()[-3000:]
        # the whole driver dies: SIGKILL to its process group (driver, its local Ray, the workers)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    killed_at = committed(store["client"], store["bucket"], "drv")
    t_kill = time.perf_counter() - t0
    first = log1.read_text()
    assert 6 in killed_at and 12 not in killed_at, first[-3000:]

    rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=480)
    second = rerun.stdout + rerun.stderr
    (tmp_path / "run2.log").write_text(second)
    print(f"killed after {t_kill:.0f}s with checkpoints {killed_at}; rerun {time.perf_counter() - t0 - t_kill:.0f}s")
    assert rerun.returncode == 0, second[-4000:]
    resumed = re.findall(r"resumed drv at step (\d+)", second)
    assert resumed and int(resumed[0]) == max(killed_at), (killed_at, resumed)
    assert "finished at step 12" in second
    assert committed(store["client"], store["bucket"], "drv") == sorted({*killed_at, *range(3, 13, 3)})

    # bad data: 2 shards skipped by the driver, corrupt images dropped and counted, the run went on
    for text in (first, second):
        assert "skipping 2 of 6 train shards" in text and "train-faults-00004-of-00006.parquet" in text
        assert "train-faults-00005-of-00006.parquet" in text
    assert re.search(r"skipped \d+ corrupt image\(s\)", first + second)
    objects = download(store["client"], store["bucket"], "runs/drv")
    tb = tmp_path / "tb"
    tb.mkdir()
    for key, data in objects.items():
        if "/tensorboard/events.out.tfevents" in key:
            (tb / key.rsplit("/", 1)[1]).write_bytes(data)
    from tests.test_train_ray import tb_scalars

    scalars = tb_scalars(tb)
    assert max(scalars["data/corrupt_records"].values()) >= 1
    print("corrupt records in TensorBoard:", scalars["data/corrupt_records"])

    # credentials: nowhere in logs, TensorBoard, checkpoints, results, Ray's session files
    scanned, hits = 0, []
    local = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
    blobs = [(str(p), p.read_bytes) for p in [log1, tmp_path / "run2.log", *local]]
    blobs += [(f"s3://{store['bucket']}/{k}", lambda v=v: v) for k, v in objects.items()]
    for path, read in blobs:
        try:
            data = read()
        except OSError:
            continue
        scanned += 1
        for secret in (CANARY_KEY, CANARY_SECRET):
            if secret.encode() in data:
                hits.append(f"{path}: {secret[:8]}...")
    print(f"credential scan: {scanned} files ({len(objects)} S3 objects), {len(hits)} hits")
    assert scanned > 50 and not hits, hits


OUTAGE_S = 60


@pytest.mark.slow  # passes alone; failed when run after the whole default tier in one process (open: see notes)
def test_s3_outage_of_a_minute_mid_checkpoint_upload_is_ridden_out_losing_nothing(store, tmp_path):
    """S3 goes away for OUTAGE_S in the middle of the upload of checkpoint 4 (at rank 1's ZeRO
    file, while the run also reads data), then comes back. With ``max_failures=0`` the run must
    ride it out on retries alone: every step once, all 16, every committed checkpoint complete."""
    env = canary_env(tempfile.mkdtemp(prefix="bfo-", dir="/tmp"))
    cmd = train_cmd(store, "outage", ["--set", "train.steps=16", "--set", "train.checkpoint_every=2",
                                      "--set", "ray.max_failures=0"])
    client, bucket, proxy = store["client"], store["bucket"], store["proxy"]
    proxy.trip = b"/runs/outage/checkpoint_00000004/deepspeed/zero_pp_rank_1"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.perf_counter(), ln) for ln in proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not proxy.tripped.wait(0.3):
            pass
        t_down = time.perf_counter()
        before = committed(client, bucket, "outage")
        time.sleep(OUTAGE_S)
        proxy.start()
        t_up = time.perf_counter()
        proc.wait(600)
    finally:
        proxy.trip = b""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if proxy.server is None:
            proxy.start()
    time.sleep(0.5)
    out = "".join(ln for _, ln in lines)
    (tmp_path / "outage.log").write_text(out)
    steps = [(t, int(m.group(1))) for t, ln in lines if (m := re.search(r"\[forward\] step\s+(\d+)/16 \|", ln))]
    after = [t for t, step in steps if step == 5]
    print(f"outage {t_down - t0:.0f}s..{t_up - t0:.0f}s ({t_up - t_down:.0f}s) after checkpoints {before}, "
          f"in the upload of checkpoint 4; step 5 at {after[0] - t0 if after else float('nan'):.0f}s "
          f"({after[0] - t_up if after else float('nan'):.0f}s after S3 came back); exit {proc.returncode} "
          f"after {time.perf_counter() - t0:.0f}s")
    assert proxy.tripped.is_set() and before == [2], (before, out[-3000:])
    assert proc.returncode == 0, out[-4000:]
    assert "resumed outage" not in out and not re.search(r"^error:|failed:", out, re.M)  # no restart, no failure
    # every step once, in order; training stood still through the outage
    assert [step for _, step in steps] == list(range(1, 17)), steps
    assert after[0] > t_up, "step 5 ran while S3 was unreachable: checkpoint 4 was not waited for"

    # every checkpoint committed and complete
    objects = download(client, bucket, "runs/outage/")
    assert committed(client, bucket, "outage") == list(range(2, 17, 2))
    need = {"ema.safetensors", "metadata.json", "COMMITTED", "deepspeed/mp_rank_00_model_states.pt",
            "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    dirs = {m.group(1) for k in objects if (m := re.search(r"/(checkpoint_\d+)/", k))}
    assert len(dirs) == 8
    for d in dirs:
        files = {k.split(f"/{d}/", 1)[1] for k in objects if f"/{d}/" in k}
        assert need <= files, (d, files)
    from biflow.train import checkpoint as ckpt_io

    ref = ckpt_io.find_checkpoint("outage", f"s3://{bucket}/runs", store["endpoint"])
    assert ref.step == 16 and ref.metadata()["samples_seen"] == 16 * 64

    # TensorBoard, uploaded after each commit: one file, every step once
    tb = tmp_path / "tb"
    tb.mkdir()
    events = [k for k in objects if "/tensorboard/events.out.tfevents" in k]
    for key in events:
        (tb / key.rsplit("/", 1)[1]).write_bytes(objects[key])
    from tests.test_train_ray import tb_scalars

    assert len(events) == 1 and sorted(tb_scalars(tb)["train/loss"]) == list(range(1, 17))
