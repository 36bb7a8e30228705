"""`biflow bench flow-ref`: our forward flow against apple/ml-tarflow's model.

The reference's code is not part of biflow: the comparison loads it from a checkout the
user names. Here: a wrong path is rejected with a message that names it and says what to
clone; with ``BIFLOW_ML_TARFLOW`` pointing at a checkout, a tiny end-to-end run checks the
JSON against its own runs and the NLL accounting of both models (slow)."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch

pytestmark = pytest.mark.unit


def test_cli_rejects_a_missing_reference(tmp_path):
    from typer.testing import CliRunner

    from biflow.cli import app

    res = CliRunner().invoke(app, ["bench", "flow-ref", "--reference", str(tmp_path / "nope"), "--out",
                                   str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "no transformer_flow.py there" in res.output and "apple/ml-tarflow" in res.output
    assert not (tmp_path / "out" / "flow-ref.json").exists()


REFERENCE = os.environ.get("BIFLOW_ML_TARFLOW", "")


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE, reason="set BIFLOW_ML_TARFLOW to a checkout of apple/ml-tarflow")
def test_flow_ref_tiny_run_against_the_reference(tmp_path, fashion_mnist_dir):
    from biflow.bench.flow_reference import (build_reference, flow_config, load_reference,
                                             reference_nll_per_dim, bench_flow_reference)
    from biflow.losses import nll_per_dim
    from biflow.models import TARFlow

    mod = load_reference(REFERENCE)
    cfg = flow_config({"width": 32, "depth": 1, "num_blocks": 2, "patch_size": 4, "num_heads": 2}, 0.1)
    ref, ours = build_reference(mod, cfg), TARFlow(cfg)
    # both start as the identity map (zero output projections): NLL = the standard normal's of x
    x = torch.randn(4, 1, 28, 28) * 0.3
    expected = 0.5 * x.pow(2).flatten(1).mean(1) + 0.5 * math.log(2 * math.pi)
    assert torch.allclose(nll_per_dim(ours(x)), expected, atol=1e-6)
    ref.eval()
    for blk in ref.blocks:  # the reference leaves its output bias at PyTorch's default init
        torch.nn.init.zeros_(blk.proj_out.bias)
    assert torch.allclose(reference_nll_per_dim(ref, x), expected, atol=1e-6)
    assert all(a.num_heads == 2 for a in ref.modules() if type(a).__name__ == "Attention")

    r = bench_flow_reference(REFERENCE, tmp_path, shapes=["quickstart"], steps=6, batch=8, train_images=64,
                             test_images=32, log=lambda s: None)
    on_disk = json.loads((tmp_path / "flow-ref.json").read_text())
    s = on_disk["shapes"]["quickstart"]
    run = s["runs"][0]
    assert run["nll_gap_nats_per_dim"] == pytest.approx(run["ours"]["heldout_nll_nats_per_dim"] -
                                                        run["reference"]["heldout_nll_nats_per_dim"])
    assert run["step_time_ratio"] == pytest.approx(run["ours"]["ms_per_step"] / run["reference"]["ms_per_step"])
    assert s["mean_nll_gap_nats_per_dim"] == pytest.approx(statistics.fmean([run["nll_gap_nats_per_dim"]]))
    assert r["max_mean_nll_gap_nats_per_dim"] == pytest.approx(s["mean_nll_gap_nats_per_dim"])
    assert run["ours"]["params"] > 0 and run["reference"]["params"] > 0
    assert (tmp_path / "flow-ref.png").stat().st_size > 0

    # the exact samplers being timed are each their own flow's inverse, and the JSON is their ratio
    from biflow.bench.flow_reference import bench_flow_ref_sampling
    from biflow.sampling import sample_exact

    z = torch.randn(2, 1, 28, 28)
    for model in (ours, ref):
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm) * 0.02)
    with torch.no_grad():
        assert torch.allclose(ours(sample_exact(ours, None, z=z, tweedie=False)).z, z, atol=1e-4)
        x_ref = ref.reverse(ref.patchify(z.clone()))
        assert torch.allclose(ref.unpatchify(ref(x_ref)[0]), z, atol=1e-4)
    s = bench_flow_ref_sampling(REFERENCE, tmp_path, shapes=["quickstart"], batches=(2,), reps=1, log=lambda m: None)
    row = json.loads((tmp_path / "flow-ref-sampling.json").read_text())["shapes"]["quickstart"]["2"]
    assert row["time_ratio"] == pytest.approx(row["ours_ms_per_image"] / row["reference_ms_per_image"])
    assert s["max_time_ratio"] == pytest.approx(row["time_ratio"])
