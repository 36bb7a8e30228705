"""`biflow submit` against a real `ray start --head` cluster with token auth on."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(32)
    port, dash = free_port(), free_port()
    # RAY_ADDRESS (set by this process's own local Ray) would point the head's agent elsewhere
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # jobs run `python` from this venv
    # own process group, so the whole head (gcs, raylet, dashboard) is stopped without `ray stop`,
    # which would stop every Ray instance on the machine
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=4", "--object-store-memory=200000000",
                             "--disable-usage-stats", "--block"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    import urllib.request

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except Exception as exc:  # 401 means the server is up and enforcing auth
            if "401" in str(exc):
                break
            time.sleep(1)
    yield address, token
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def run_cli(args, env_extra, timeout=420):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(env_extra)
    env["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/biflow-test-token"  # only the env token counts here
    return subprocess.run([str(BIN / "biflow"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_submit_without_token_fails_clearly(ray_head):
    address, _ = ray_head
    out = run_cli(["submit", "jobs/smoke-forward.yaml", "--address", address], {})
    assert out.returncode == 2
    assert "could not submit to" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr


def test_submit_rejects_bad_config_before_contacting_cluster(ray_head):
    address, token = ray_head
    out = run_cli(["submit", "jobs/smoke-forward.yaml", "--address", address, "--set", "train.stepz=3"],
                  {"RAY_AUTH_TOKEN": token})
    assert out.returncode == 2 and "unknown key 'train.stepz'" in out.stderr


@pytest.mark.slow  # passes alone; failed when run after the whole default tier in one process (open: see notes)
def test_submitted_training_job_finishes(ray_local, ray_head, tmp_path, fashion_mnist_dir):
    from biflow.data.shards import prepare_data

    address, token = ray_head
    data = tmp_path / "data"
    prepare_data(str(fashion_mnist_dir), str(data), "fashion-mnist", limit=256, progress=False)
    out = run_cli(["submit", "jobs/smoke-forward.yaml", "--address", address,
                   "--set", f"data.uri={data}", "--set", f"ray.storage={tmp_path / 'runs'}",
                   "--set", "train.steps=4", "--set", "train.checkpoint_every=4", "--set", "ray.max_failures=0"],
                  {"RAY_AUTH_TOKEN": token})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted job" in out.stdout and "SUCCEEDED" in out.stdout
    assert "finished at step 4" in out.stdout
    assert token not in out.stdout + out.stderr
    assert (tmp_path / "runs" / "smoke-forward" / "checkpoint_00000004" / "metadata.json").is_file()
