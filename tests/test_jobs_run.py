"""The `jobs` tier: every YAML under jobs/ runs end to end at toy scale.

Files are discovered, not listed: a new job, search or recipe is covered
without editing this file. Each runs through the CLI exactly as a user would
type it, shrunk only by ``--set`` overrides of sizes, steps, batch and
intervals, with the data pointed at small generated fixtures
(tests/jobdata.py: an ImageNet-layout JPEG tree, its shards, a tiny random
``AutoencoderKL`` and its latents; Fashion-MNIST shards). Everything else
stays as shipped: latents, perceptual loss, crops, CFG, engine, ZeRO stage,
sample grids (the GPU jobs' ``ray.use_gpu: yes`` becomes ``no`` on a CPU machine).

Asserted for each job: committed checkpoints at the last step, a sample grid
PNG (decoded to RGB for latent jobs); for searches the trial table and
best.yaml; for recipes and evaluations the results JSON.

Every run here is marked ``slow``: `make test-jobs` runs the whole tier (about
25 minutes on 2 cores), outside CI's 30-minute budget. `make test` keeps the
discovery check below; the smoke search also runs in the integration tier
(tests/test_tune.py), the latent path in tests/test_latents.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from biflow.cli import app
from biflow.config import load_config, read_yaml
from tests import jobdata

pytestmark = pytest.mark.jobs

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
ALL_JOBS = sorted(JOBS_DIR.rglob("*.yaml"))
TRAIN_JOBS = [p for p in ALL_JOBS if p.parent == JOBS_DIR]
SEARCHES = [p for p in ALL_JOBS if p.parent.name == "tune"]
RECIPES = [p for p in ALL_JOBS if p.parent.name == "eval"]
STEPS = 2

# Toy sizes. Only sizes, steps, batch and intervals are changed.
FLOW_SIZE = ["flow.width=32", "flow.depth=1", "flow.num_blocks=2", "flow.num_heads=2", "flow.glow.hidden=16",
             "flow.resflow.hidden=16"]
REVERSE_SIZE = ["reverse.width=32", "reverse.depth=2", "reverse.num_heads=2", "reverse.perceptual.resize=75"]
TRAIN_SIZE = [f"train.steps={STEPS}", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=1",
              f"train.sample_every={STEPS}", "optim.warmup_steps=1", "ray.workers=1", "ray.cpus_per_worker=1",
              "data.shuffle_buffer=16", "data.prefetch_batches=1",
              "ray.use_gpu=no"]  # the GPU jobs say use_gpu: yes; this machine has none


def test_every_job_file_is_run_by_this_tier():
    assert {p.parent for p in ALL_JOBS} <= {JOBS_DIR, JOBS_DIR / "tune", JOBS_DIR / "eval"}, \
        "a job folder this tier does not know how to run"
    assert len(TRAIN_JOBS) >= 10 and SEARCHES and RECIPES


@pytest.fixture(scope="module")
def data(tmp_path_factory, fashion_mnist_dir, ray_local) -> jobdata.JobData:
    return jobdata.build(tmp_path_factory.mktemp("jobdata"), fashion_mnist_dir)


def data_for(cfg, data: jobdata.JobData) -> Path:
    """The fixture shard set of the shape a job trains on."""
    if cfg.data.kind == "latents":
        return data.latents
    return data.imagenet if cfg.flow.channels == 3 else data.fashion_mnist


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"biflow {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}" \
                                  f"\n{result.exception!r}"
    return result.output


def train_args(path: Path, data: jobdata.JobData, storage: Path) -> list[str]:
    cfg = load_config(path)
    if cfg.stage == "reverse":  # its flow comes from the forward checkpoint; data as the forward job's
        cfg = load_config(path.with_name(path.name.replace("-reverse", "-forward")))
    sets = [*FLOW_SIZE, *REVERSE_SIZE, *TRAIN_SIZE, f"data.uri={data_for(cfg, data)}", f"ray.storage={storage}"]
    return ["train", path, *[x for s in sets for x in ("--set", s)]]  # the stage comes from the file


def assert_checkpoint_and_grid(run: Path, latent: bool) -> None:
    ckpt = run / f"checkpoint_{STEPS:08d}"
    assert (ckpt / "COMMITTED").is_file() and (ckpt / "ema.safetensors").is_file(), sorted(run.iterdir())
    assert json.loads((ckpt / "metadata.json").read_text())["step"] == STEPS
    grid = run / "tensorboard" / "samples" / f"step_{STEPS:08d}.png"
    assert grid.is_file(), f"no sample grid at {grid}"
    image = np.asarray(Image.open(grid))
    if latent:  # decoded through the autoencoder: RGB at the image size, 8 per row, 2 px padding
        assert image.ndim == 3 and image.shape[2] == 3
        assert image.shape[1] == 8 * (jobdata.IMAGE_SIZE + 2) + 2


def scalar_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


# In the default (CI) run; the rest of the tier is `slow` (make test-jobs runs all of it).
IN_CI: set[str] = set()  # each pair costs 3-4 min of CI's budget: the whole tier is make test-jobs


def tiered(items, name=lambda x: x):
    return [pytest.param(x, id=Path(str(name(x))).stem, marks=() if name(x) in IN_CI else pytest.mark.slow)
            for x in items]


PAIRS = sorted({p.stem.rsplit("-", 1)[0] for p in TRAIN_JOBS})


@pytest.mark.parametrize("base", tiered(PAIRS))
def test_train_job_pair_runs(base, data, tmp_path):
    """Stage 1 then stage 2 of each shipped pair, as `biflow train` (latent pairs: perceptual
    loss through the decoder, decoded grids), then `biflow sample` from the reverse run."""
    forward, reverse = JOBS_DIR / f"{base}-forward.yaml", JOBS_DIR / f"{base}-reverse.yaml"
    latent = load_config(forward).data.kind == "latents"
    for path in (forward, reverse):
        cli(*train_args(path, data, tmp_path))
        assert_checkpoint_and_grid(tmp_path / load_config(path).name, latent)
    rev_cfg = load_config(reverse)
    if rev_cfg.reverse.perceptual_weight > 0:
        assert "train/perceptual" in scalar_tags(tmp_path / rev_cfg.name)
    out = cli("sample", rev_cfg.name, "--storage", tmp_path, "--out", tmp_path / "samples", "--num", 4,
              "--guidance", 1)
    assert "decoded latents" in out if latent else "pixels" in out
    with np.load(tmp_path / "samples" / "samples-biflow-w1.npz") as npz:
        shape = (4, 3, jobdata.IMAGE_SIZE, jobdata.IMAGE_SIZE) if latent else (4, *npz["images"].shape[1:])
        assert npz["images"].shape == shape and npz["images"].dtype == np.uint8
    if latent and base == "imagenet256-b2":  # evaluation in pixel space
        cli("evaluate", rev_cfg.name, "--storage", tmp_path, "--out", tmp_path / "eval", "--num-samples", 8,
            "--batch-size", 8, "--guidance", 0)
        results = json.loads((tmp_path / "eval" / "results.json").read_text())
        assert results["space"] == "latents" and results["fid_reference"] == str(data.imagenet)
        b = results["samplers"]["biflow@w=0"]
        assert np.isfinite(b["fid"]) and b["ms_per_image_with_decode"] > b["ms_per_image"] > 0
        assert np.isfinite(results["recon_psnr_db"]) and results["recon_psnr_latent_db"] is not None


def search_args(path: Path, data: jobdata.JobData, storage: Path) -> list[str]:
    spec = read_yaml(path)
    sets = ["num_samples=2", "max_concurrent=1", "fid_samples=8", "fid_batch_size=8", f"storage={storage}",
            "resources.workers=1", "resources.cpus_per_worker=1", "resources.trial_cpus=0.25",
            "resources.trial_gpus=0"]
    jobs = {"base": spec["base"], **({"forward": spec["forward"]} if spec.get("forward") else {})}
    for prefix, job in jobs.items():
        job_path = Path(job) if Path(job).is_file() else path.parent / job  # as biflow tune resolves it
        cfg = load_config(job_path)
        if cfg.stage == "reverse":
            cfg = load_config(job_path.with_name(job_path.name.replace("-reverse", "-forward")))
        sets += [f"{prefix}.{s}" for s in [*FLOW_SIZE, *REVERSE_SIZE, *TRAIN_SIZE, f"data.uri={data_for(cfg, data)}",
                                           f"ray.storage={storage}"]]
    return ["tune", path, "--name", path.stem, *[x for s in sets for x in ("--set", s)]]


@pytest.mark.parametrize("path", tiered(SEARCHES, lambda p: p.name))
def test_search_runs(path, data, tmp_path):
    """Each search is its own `biflow tune` process with its own local Ray, as a user runs it: the
    worker groups of trials that ASHA stops are freed by that Ray, not left in the tests' shared one."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "biflow.cli", *map(str, search_args(path, data, tmp_path))],
                          cwd=JOBS_DIR.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"biflow tune exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    results = tmp_path / path.stem / "results"
    trials = json.loads((results / "trials.json").read_text())
    assert len(trials) == 2 and any(t["status"] == "completed" for t in trials), trials
    best = load_config(results / "best.yaml")
    assert best.train.steps == STEPS


@pytest.mark.parametrize("path", tiered(RECIPES, lambda p: p.name))
def test_recipe_runs(path, tmp_path, fashion_mnist_dir, ray_local):
    sets = [*FLOW_SIZE, *REVERSE_SIZE, *TRAIN_SIZE, "recipe.dataset.limit=512", "recipe.evaluate.num_samples=16",
            "recipe.evaluate.num_eval_images=16", "recipe.evaluate.num_reference=16", "recipe.evaluate.batch_size=16",
            "recipe.evaluate.timing_batch=4", "recipe.report="]  # report="": the committed docs stay as they are
    cli("recipe", path, "--out", tmp_path, *[x for s in sets for x in ("--set", s)])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    spec = read_yaml(path)
    if spec.get("families"):  # per family a forward flow and its reverse model, both samplers scored
        assert [r["family"] for r in results["rows"]] == [f["name"] for f in spec["families"]]
        for r in results["rows"]:
            assert r["forward_steps"] == r["reverse_steps"] == STEPS
            assert all(np.isfinite(r[k]) for k in ("fid_biflow", "fid_exact", "bpd_dequantized", "speedup_b16"))
            assert (r["fixed_point_iterations"] is not None) == (r["flow_family"] == "resflow")
            for stage in ("forward", "reverse"):
                assert_checkpoint_and_grid(tmp_path / "runs" / f"{results['recipe']['name']}-{r['family']}-{stage}",
                                           latent=False)
        if path.stem == "families":  # the comparison covers every family
            assert {r["flow_family"] for r in results["rows"]} == {"tarflow", "glow", "resflow"}
        return
    if spec.get("ablations"):  # one reverse run per row, each scored by its own sampler
        names = [a["name"] for a in spec["ablations"]]
        guidance = spec.get("evaluate", {}).get("guidance", [0.0, 1.0])
        assert [(r["ablation"], r["guidance"]) for r in results["rows"]] == [(n, w) for n in names for w in guidance]
        assert all(np.isfinite(r["fid"]) and np.isfinite(r["kid"]) for r in results["rows"])
        assert {r["nfe"] for r in results["rows"] if r["sampler"] == "biflow-cfg2" and r["guidance"]} <= {2}
        assert set(results["exact"]) == {f"exact@w={w:g}" for w in guidance}
        for name in names:
            assert_checkpoint_and_grid(tmp_path / "runs" / f"{results['recipe']['name']}-reverse-{name}", latent=False)
        return
    assert results["recipe"]["forward_steps"] == results["recipe"]["reverse_steps"] == STEPS
    guidance = spec.get("evaluate", {}).get("guidance", [0.0, 1.0])  # the quickstart scores w=1 only
    assert set(results["samplers"]) == {f"{s}@w={w:g}" for s in ("biflow", "exact") for w in guidance}
    assert all(np.isfinite(r["fid"]) and np.isfinite(r["kid"]) and Path(r["grid"]).is_file()
               for r in results["samplers"].values())
    if spec.get("goals"):  # every goal of the recipe is checked and recorded with its value
        assert results["goals"] and all(isinstance(g["met"], bool) and np.isfinite(g["value"])
                                        for g in results["goals"].values()), results["goals"]
    for stage in ("forward", "reverse"):
        assert_checkpoint_and_grid(tmp_path / "runs" / f"{results['recipe']['name']}-{stage}", latent=False)
