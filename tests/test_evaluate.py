"""`biflow evaluate` on hand-made checkpoints (tiny models) and real Fashion-MNIST shards."""

import json

import pytest
import torch
from typer.testing import CliRunner

from biflow.cli import app
from biflow.config import load_config, to_dict
from biflow.models import ReverseModel, TARFlow
from biflow.train.checkpoint import checkpoint_dir_name, write_rank0_files

pytestmark = pytest.mark.integration


FLOW = dict(image_size=28, channels=1, patch_size=7, width=16, depth=1, num_blocks=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, fashion_mnist_dir, ray_local):
    from biflow.data.shards import prepare_data

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    prepare_data(str(fashion_mnist_dir), str(data), "fashion-mnist", limit=64, progress=False)
    storage = root / "runs"
    torch.manual_seed(0)
    for stage in ("forward", "reverse"):
        cfg = load_config({"name": f"t-{stage}", "stage": stage, "flow": FLOW, "data": {"uri": str(data)},
                           "reverse": {"width": 16, "depth": 2, "num_heads": 2},
                           "train": {"forward_checkpoint": "t-forward"}, "ray": {"storage": str(storage)}})
        model = TARFlow(cfg.flow) if stage == "forward" else ReverseModel(cfg.reverse, cfg.flow)
        d = storage / cfg.name / checkpoint_dir_name(5)
        d.mkdir(parents=True)
        write_rank0_files(d, model.state_dict(), {"stage": stage, "step": 5, "config": to_dict(cfg)})
    return storage


def test_evaluate_writes_every_field(trained_pair, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "t-reverse", "--storage", str(trained_pair), "--out", str(out),
                                      "--num-samples", "24", "--num-reference", "32", "--num-eval-images", "24",
                                      "--batch-size", "12", "--guidance", "0", "--guidance", "2",
                                      "--exact-annealed"])
    assert result.exit_code == 0, result.output[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["checkpoint"]["forward_step"] == 5 and res["checkpoint"]["reverse_step"] == 5
    assert res["checkpoint"]["forward"].endswith("t-forward/checkpoint_00000005")
    assert res["num_samples"] == 24
    # an untrained flow is the identity: bpd of N(0, I) on noisy data in [-1, 1] is finite and large
    assert 5 < res["bpd"] < 15 and res["recon_psnr_db"] is not None
    # 0.5 log(2 pi e 0.01) nats + log(128), in bits: the entropy of sigma = 0.1 noise on the 8-bit grid
    assert res["bpd_noise_floor"] == pytest.approx(5.7252, abs=1e-3)
    assert res["bpd_excess_over_floor"] == pytest.approx(res["bpd"] - res["bpd_noise_floor"])
    assert res["bpd_excess_over_floor"] > 0 and 5 < res["bpd_dequantized"] < 15
    assert res["denoise_psnr_db"] == res["recon_psnr_db"] and res["inversion_psnr_db"] is not None
    assert res["num_reference"] == 32
    floor = res["real_vs_real"]
    assert floor["num"] == 24 and floor["split"] == "train" and floor["fid"] > 0 and floor["kid_se"] > 0
    assert set(res["samplers"]) == {"biflow@w=0", "exact@w=0", "biflow@w=2", "exact@w=2"}
    for key, r in res["samplers"].items():
        assert {"fid", "kid", "kid_se", "ms_per_image", "grid", "guidance", "timing_batch"} <= set(r)
        assert r["fid"] > 0 and r["ms_per_image"] > 0 and (out / r["grid"].split("/")[-1]).is_file()
        assert r["annealed_guidance"] == (r["sampler"] == "exact")
        # untrained models: their samples are further from the data than real images are
        assert r["fid"] > floor["fid"] and r["kid"] > floor["kid"]
    b = res["samplers"]["biflow@w=0"]
    assert b["speedup_vs_exact"] == pytest.approx(res["samplers"]["exact@w=0"]["ms_per_image"] / b["ms_per_image"])
    assert res["machine"]["device"] == "cpu"


def test_evaluate_default_folder_export_card_and_evaluating_the_export(trained_pair, tmp_path, monkeypatch):
    """Without --out, evaluate writes runs/eval/<run>/step-<N>; export finds that evaluation for its
    card; evaluating the exported folder gives the same figures as evaluating the run."""
    monkeypatch.chdir(tmp_path)
    args = ["--num-samples", "16", "--num-reference", "16", "--num-eval-images", "16", "--batch-size", "8"]
    result = CliRunner().invoke(app, ["evaluate", "t-reverse", "--storage", str(trained_pair), *args])
    assert result.exit_code == 0, result.output[-2000:]
    first = tmp_path / "runs" / "eval" / "t-reverse" / "step-5" / "results.json"
    assert first.is_file() and "wrote runs/eval/t-reverse/step-5/results.json" in result.output
    res = json.loads(first.read_text())
    result = CliRunner().invoke(app, ["export", "t-reverse", "model", "--storage", str(trained_pair)])
    assert result.exit_code == 0 and "with evaluation" in result.output, result.output
    card = (tmp_path / "model" / "README.md").read_text()
    fid = res["samplers"]["biflow@w=0"]["fid"]
    assert f"| biflow@w=0 | {fid:.2f} |" in card and "real vs real (floor)" in card
    assert json.loads((tmp_path / "model" / "results.json").read_text()) == res
    result = CliRunner().invoke(app, ["evaluate", "model", "--out", "again", *args])
    assert result.exit_code == 0, result.output[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["checkpoint"]["reverse"] == "model"
    for key in ("biflow@w=0", "exact@w=0"):
        assert again["samplers"][key]["fid"] == pytest.approx(res["samplers"][key]["fid"], rel=1e-6)
    assert again["bpd"] == pytest.approx(res["bpd"], rel=1e-6)


def test_evaluate_missing_checkpoint_is_clear(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["evaluate", "nope", "--storage", str(tmp_path)])
    assert result.exit_code == 2
    assert "CHECKPOINT='nope': no checkpoint found" in result.output
    assert f"looked in {tmp_path}/nope" in result.output  # names where it looked
    # a bare run name without --storage is looked up where every command looks: runs/, and says so
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BIFLOW_STORAGE", raising=False)
    result = CliRunner().invoke(app, ["evaluate", "nope"])
    assert result.exit_code == 2
    assert "looked in runs/nope" in result.output
    monkeypatch.setenv("BIFLOW_STORAGE", str(tmp_path / "fleet"))
    result = CliRunner().invoke(app, ["evaluate", "nope"])
    assert result.exit_code == 2 and f"looked in {tmp_path}/fleet/nope" in result.output


def test_device_option_resolves_and_rejects_clearly():
    from typer.testing import CliRunner

    from biflow.cli import app
    from biflow.errors import UserError
    from biflow.evaluate import device_option

    assert device_option("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_option("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device 'tpu': allowed values: auto, cpu, cuda, cuda:N"):
        device_option("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device here"):
            device_option("cuda")
    res = CliRunner().invoke(app, ["sample", "nosuchrun", "--device", "gpu0"])  # checked before any loading
    assert res.exit_code != 0 and "--device 'gpu0': allowed values" in res.output
