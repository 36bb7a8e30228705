"""`biflow bench levers`: the reverse-model harness trains every variant on the same cached
flow trajectories and reports held-out PSNR at fixed steps (a tiny run, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.unit


def _forward_checkpoint(tmp_path):
    """A committed forward checkpoint of a small Fashion-MNIST-shaped TARFlow, as the loop writes it."""
    from biflow.config import load_config, to_dict
    from biflow.models import TARFlow
    from biflow.train import checkpoint as ckpt_io
    from biflow.data import storage

    cfg = load_config({"name": "tiny-forward", "stage": "forward",
                       "flow": {"image_size": 28, "channels": 1, "patch_size": 4, "width": 16, "depth": 1,
                                "num_blocks": 2, "num_heads": 2, "num_classes": 10}})
    torch.manual_seed(0)
    flow = TARFlow(cfg.flow)
    directory = tmp_path / "runs" / "tiny-forward" / ckpt_io.checkpoint_dir_name(5)
    directory.mkdir(parents=True)
    ckpt_io.write_rank0_files(directory, flow.state_dict(), {"stage": "forward", "step": 5, "config": to_dict(cfg),
                                                             "commit_marker": True})
    fs, path = storage.resolve(str(directory))
    ckpt_io.commit(fs, path)
    return cfg


def test_levers_harness_reports_psnr_per_variant(tmp_path, fashion_mnist_dir):
    from biflow.bench.levers import DEFAULT_VARIANTS, bench_levers

    _forward_checkpoint(tmp_path)
    variants = {k: DEFAULT_VARIANTS[k] for k in ("old", "old+skip-dense-ridge", "job")}
    lines = []
    r = bench_levers("tiny-forward", tmp_path / "bench", steps=4, eval_every=2, batch=8, train_images=512,
                     test_images=32, variants=variants, storage=str(tmp_path / "runs"), log=lines.append)
    saved = json.loads((tmp_path / "bench" / "levers.json").read_text())
    assert (tmp_path / "bench" / "levers.png").stat().st_size > 0
    assert saved["variants"].keys() == variants.keys() and saved["forward_step"] == 5
    for name, v in r["variants"].items():
        assert set(v["psnr_db"]) >= {2, 4} and all(5 < p < 40 for p in v["psnr_db"].values())
        assert v["ms_per_step"] > 0 and v["overrides"] == variants[name]
    # the job's dense z skip adds (N*D)^2 + N*D weights; ridge starts G at a measured PSNR (step 0)
    assert r["variants"]["job"]["params"] - r["variants"]["old"]["params"] == 784 * 784 + 784
    assert 0 in r["variants"]["old+skip-dense-ridge"]["psnr_db"] and 0 not in r["variants"]["old"]["psnr_db"]
    assert any("held-out PSNR at step 4" in ln for ln in lines)
