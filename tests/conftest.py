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
