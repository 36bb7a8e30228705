"""Ray Tune search: one smoke search run through the CLI in its own process
(2 trials of a tiny forward flow, ASHA), whose best config is then trained by
``biflow train`` unchanged (slow). The search-space checks are in test_tune_spec.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from biflow.cli import app
from biflow.config import load_config

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "tune" / "smoke.yaml"


@pytest.fixture(scope="module")
def tiny_shards(fashion_mnist_dir, tmp_path_factory, ray_local):
    from biflow.data.shards import prepare_data

    out = tmp_path_factory.mktemp("tune-data") / "fmnist"
    prepare_data(str(fashion_mnist_dir), str(out), "fashion-mnist", limit=1024, progress=False)
    return out


@pytest.fixture(scope="module")
def smoke_search(tiny_shards, tmp_path_factory):
    """`biflow tune` on jobs/tune/smoke.yaml in a subprocess (its own Ray, with the state
    API Ray Train's placement-group cleaner uses when ASHA stops a trial)."""
    store = tmp_path_factory.mktemp("tune-store")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "BIFLOW_TORCH_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "biflow.cli", "tune", "--config", str(SMOKE),
                           "--storage", str(store), "--set", f"base.data.uri={tiny_shards}",
                           "--set", "num_samples=2"],  # ~2 min a trial; seeded: the 2nd is stopped at a rung
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return store / "smoke-search", seconds, proc.stdout


def test_smoke_search_table_asha_and_best(smoke_search):
    root, seconds, stdout = smoke_search
    results = root / "results"
    rows = list(csv.DictReader(open(results / "trials.csv")))
    assert len(rows) == 2, rows  # every trial, stopped ones included
    assert json.loads((results / "trials.json").read_text()) and (results / "metric-vs-params.png").stat().st_size
    statuses = [r["status"] for r in rows]
    assert statuses.count("stopped early") >= 1, rows  # ASHA cut at least one trial at a rung
    assert statuses.count("completed") >= 1, rows
    assert "error" not in statuses
    for r in rows:
        assert float(r["loss"]) == float(r["loss"])  # a finite number for every trial
        assert 0.02 <= float(r["flow.noise_std"]) <= 0.4 and 1e-5 <= float(r["optim.lr"]) <= 1e-2
        if r["status"] == "stopped early":
            assert int(r["step"]) < 8
        else:
            assert int(r["step"]) == 8
        # each trial's runs carry their TensorBoard logs
        assert list(Path(r["runs"]).glob("tensorboard/events.*")), r["runs"]
    best_cfg = load_config(results / "best.yaml")  # strict loader: the best config is a valid job
    assert best_cfg.stage == "forward" and best_cfg.train.steps == 8
    summary = json.loads((results / "best.json").read_text())
    best = summary["best"]
    completed = [float(r["loss"]) for r in rows if r["status"] == "completed"]
    assert best["loss"] == pytest.approx(min(completed))
    assert summary["trials"] == 2


@pytest.mark.slow  # out of CI's 30-min budget (make test-slow runs it): best.yaml's strict load is checked in the smoke-search test
def test_best_config_trains_unchanged(smoke_search, ray_local, tmp_path):
    root, _, _ = smoke_search
    best_yaml = root / "results" / "best.yaml"
    best = json.loads((root / "results" / "best.json").read_text())["best"]
    cfg = load_config(best_yaml)  # strict loader: every key known
    assert cfg.flow.noise_std == pytest.approx(best["params"]["flow.noise_std"])
    assert cfg.optim.lr == pytest.approx(best["params"]["optim.lr"])
    assert yaml.safe_load(best_yaml.read_text())["stage"] == "forward"
    result = CliRunner().invoke(app, ["train", "forward", "--config", str(best_yaml), "--storage", str(tmp_path),
                                      "--set", "train.steps=2", "--set", "train.checkpoint_every=2"])
    assert result.exit_code == 0, result.output
    assert "finished at step 2" in result.output


@pytest.mark.slow
def test_reverse_search_fid_objective_and_resume(tiny_shards, tmp_path):
    """A reverse-only search: the forward flow is trained once and shared; each trial
    reports FID of 1-NFE samples; rerunning the same name resumes (no new trials)."""
    store = tmp_path / "store"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "BIFLOW_TORCH_THREADS": "1",
           "BIFLOW_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "biflow.cli", "tune", "--config", str(SMOKE), "--storage", str(store),
            "--name", "rev", "--set", "stage=reverse", "--set", "base=jobs/smoke-reverse.yaml",
            "--set", "forward=jobs/smoke-forward.yaml", "--set", "metric=fid", "--set", "num_samples=2",
            "--set", "fid_samples=16", "--set", "fid_batch_size=16", "--set", "scheduler.kind=none",
            "--set", 'space={"reverse.align_weight": {"loguniform": [0.1, 10.0]}, '
                     '"eval.guidance": {"uniform": [0.0, 2.0]}}',
            "--set", "base.train.forward_checkpoint=", "--set", f"base.data.uri={tiny_shards}",
            "--set", f"forward.data.uri={tiny_shards}"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = store / "rev" / "results"
    rows = list(csv.DictReader(open(results / "trials.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    assert all(0 < float(r["fid"]) < 1000 for r in rows)
    assert (store / "rev" / "runs" / "rev-forward").is_dir()  # the one shared flow
    best = load_config(results / "best.yaml")
    assert best.stage == "reverse" and best.train.forward_checkpoint.endswith("rev-forward")
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resuming search rev" in again.stdout, again.stdout[-2000:]
    assert list(csv.DictReader(open(results / "trials.csv"))) == rows
