"""End to end: the README's main command on real Fashion-MNIST (slow tier)."""

import json

import pytest

from biflow.cli import app


pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_quickstart_end_to_end_short(tmp_path, fashion_mnist_dir):
    from typer.testing import CliRunner

    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--num-samples", "64",
                                      "--set", "train.steps=30", "--set", "train.log_every=10"])
    assert result.exit_code == 0, result.output[-3000:]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["checkpoint"]["forward_step"] == 30 and res["checkpoint"]["reverse_step"] == 30
    from biflow.recipe import builtin_recipe

    guidance = builtin_recipe("eval/quickstart").evaluate.guidance  # the quickstart scores w=1 only
    assert set(res["samplers"]) == {f"{s}@w={w:g}" for s in ("biflow", "exact") for w in guidance}
    for r in res["samplers"].values():
        assert r["fid"] > 0 and r["ms_per_image"] > 0
        assert (out / "eval" / r["grid"].split("/")[-1]).stat().st_size > 500
    assert 0 < res["bpd"] < 10 and res["recon_psnr_db"] > 5
    assert res["timings"]["total_s"] > 0
    # the trained pair is left as a model folder that loads and samples in one call
    from biflow.pretrained import BiFlow

    model = BiFlow.from_pretrained(out / "model")
    assert model.info["step"] == 30 and model.sample(4, guidance=1.0).shape == (4, 1, 28, 28)
    assert f"{res['samplers']['biflow@w=1']['fid']:.2f}" in (out / "model" / "README.md").read_text()
