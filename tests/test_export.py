"""A model you can hand over: `biflow export` folders, `BiFlow.from_pretrained`, and
`biflow sample` / `evaluate` on runs, checkpoints and exports, with no training data.

Checkpoints are hand-made (tiny random models written the way training writes them);
their data.uri points at nothing, so every command that works here needs no shards."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from biflow.cli import app
from biflow.config import load_config, to_dict
from biflow.models import ReverseModel, TARFlow
from biflow.pretrained import BiFlow
from biflow.train.checkpoint import checkpoint_dir_name, write_rank0_files
from tests import jobdata

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
FLOW = dict(image_size=28, channels=1, patch_size=7, width=16, depth=1, num_blocks=2, num_heads=2, num_classes=10)
LATENT_FLOW = dict(image_size=32, channels=4, patch_size=4, width=16, depth=1, num_blocks=2, num_heads=2, num_classes=4)


def write_pair(storage: Path, flow: dict, data: dict, prefix: str = "t", latents: dict | None = None) -> dict:
    """A forward and a reverse checkpoint (step 5) as training writes them; returns the EMA states."""
    torch.manual_seed(0)
    states = {}
    for stage in ("forward", "reverse"):
        cfg = load_config({"name": f"{prefix}-{stage}", "stage": stage, "flow": flow, "data": data,
                           "reverse": {"width": 16, "depth": 2, "num_heads": 2},
                           "train": {"forward_checkpoint": f"{prefix}-forward"}, "ray": {"storage": str(storage)}})
        model = TARFlow(cfg.flow) if stage == "forward" else ReverseModel(cfg.reverse, cfg.flow)
        for p in model.parameters():  # not the init: a loaded model must be told apart from a fresh one
            p.data.add_(0.01 * torch.randn_like(p))
        d = storage / cfg.name / checkpoint_dir_name(5)
        d.mkdir(parents=True)
        meta = {"stage": stage, "step": 5, "run": cfg.name, "config": to_dict(cfg),
                **({"latents": latents} if latents else {})}
        write_rank0_files(d, model.state_dict(), meta)
        states[stage] = model.state_dict()
    return states


@pytest.fixture(scope="module")
def pixel_runs(tmp_path_factory):
    """Pixel runs whose training data does not exist (nothing here may need it)."""
    root = tmp_path_factory.mktemp("export")
    storage = root / "runs"
    states = write_pair(storage, FLOW, {"uri": str(root / "no-such-data")})
    return storage, states


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    print(f"$ biflow {' '.join(args)}\n{result.output}")
    return result


def test_export_writes_a_self_contained_readable_folder(pixel_runs, tmp_path, monkeypatch):
    storage, states = pixel_runs
    monkeypatch.chdir(tmp_path)
    res = invoke("export", "t-reverse", "--storage", str(storage))
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "models" / "t-reverse"  # the default: runs/models/<run>
    assert f"wrote runs/models/t-reverse/ (model.safetensors" in res.output and "reverse, flow" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "forward.yaml", "model.safetensors",
                                                     "reverse.yaml"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():  # readable by others: not the temp files' 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "biflow-export" and config["with_flow"] is True and config["latents"] is None
    assert config["reverse"]["name"] == "t-reverse" and config["forward"]["name"] == "t-forward"
    assert config["info"]["step"] == 5 and config["info"]["forward_checkpoint"].endswith("t-forward/checkpoint_00000005")
    weights = load_file(str(out / "model.safetensors"))
    assert {k.split(".")[0] for k in weights} == {"reverse", "flow"}
    for stage, prefix in (("reverse", "reverse."), ("forward", "flow.")):
        for k, v in states[stage].items():
            assert torch.equal(weights[prefix + k], v), k
    card = (out / "README.md").read_text()
    assert "library_name: biflow" in card and "BiFlow.from_pretrained(\"runs/models/t-reverse\")" in card
    assert "No evaluation was found" in card
    assert no_stray_files(tmp_path / "runs" / "models")


def no_stray_files(folder: Path) -> bool:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_from_pretrained_samples_the_same_images_as_the_run(pixel_runs, tmp_path):
    storage, states = pixel_runs
    out = tmp_path / "model"
    assert invoke("export", "t-reverse", str(out), "--storage", str(storage)).exit_code == 0
    model = BiFlow.from_pretrained(out)
    assert not model.training and model.reverse is not None and model.flow is not None
    for k, v in states["reverse"].items():
        assert torch.equal(model.reverse.state_dict()[k], v)
    images = model.sample(8, guidance=1.0)
    assert images.shape == (8, 1, 28, 28) and images.abs().max() <= 1
    assert torch.equal(images, model.sample(8, guidance=1.0))  # deterministic in the seed
    assert not torch.equal(images, model.sample(8, guidance=1.0, seed=1))
    labelled = model.sample(2, labels=[3, 3])
    assert labelled.shape == (2, 1, 28, 28)
    # `biflow sample` on the run, on the checkpoint and on the export: the same images
    npz = {}
    for ref in ("t-reverse", str(storage / "t-reverse" / "checkpoint_00000005"), str(out)):
        res = invoke("sample", ref, "--storage", str(storage), "--num", "8", "--guidance", "1",
                     "--out", str(tmp_path / f"s{len(npz)}"))
        assert res.exit_code == 0, res.output
        npz[ref] = np.load(tmp_path / f"s{len(npz)}" / "samples-biflow-w1.npz")["images"]
    first = list(npz.values())[0]
    assert all(np.array_equal(first, v) for v in npz.values())
    expected = torch.round((images.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    assert np.array_equal(first, expected)
    exact = model.sample(4, sampler="exact")
    assert exact.shape == (4, 1, 28, 28)


def test_sampling_needs_no_training_data_and_writes_per_run_folders(pixel_runs, tmp_path, monkeypatch):
    storage, _ = pixel_runs
    monkeypatch.chdir(tmp_path)
    for run, sampler in (("t-reverse", "biflow"), ("t-forward", "exact")):
        res = invoke("sample", run, "--storage", str(storage), "--num", "4", "--sampler", sampler)
        assert res.exit_code == 0, res.output  # data.uri points at nothing
        folder = tmp_path / "runs" / "samples" / run / "step-5"
        assert (folder / f"samples-{sampler}-w0.png").is_file(), res.output
        assert f"runs/samples/{run}/step-5/samples-{sampler}-w0.png" in res.output


def test_no_flow_export_samples_in_one_step_and_says_what_it_lacks(pixel_runs, tmp_path):
    storage, _ = pixel_runs
    out = tmp_path / "small"
    res = invoke("export", "t-reverse", str(out), "--storage", str(storage), "--no-flow")
    assert res.exit_code == 0 and "(model.safetensors" in res.output and ": reverse;" in res.output, res.output
    assert {k.split(".")[0] for k in load_file(str(out / "model.safetensors"))} == {"reverse"}
    assert not (out / "forward.yaml").exists()
    model = BiFlow.from_pretrained(out)
    assert model.flow is None and model.sample(3).shape == (3, 1, 28, 28)
    res = invoke("sample", str(out), "--sampler", "exact", "--num", "2", "--out", str(tmp_path / "s"))
    assert res.exit_code == 2 and "holds no forward flow weights (exported with --no-flow)" in res.output
    res = invoke("evaluate", str(out), "--out", str(tmp_path / "e"))
    assert res.exit_code == 2 and "evaluation needs the flow" in res.output


def test_a_single_file_export_of_earlier_versions_still_samples(pixel_runs, tmp_path):
    """`biflow sample out/model.safetensors` ended in a NotADirectoryError traceback."""
    storage, states = pixel_runs
    config = json.loads((storage / "t-reverse" / "checkpoint_00000005" / "metadata.json").read_text())["config"]
    old = tmp_path / "out" / "model.safetensors"
    old.parent.mkdir()
    save_file(states["reverse"], str(old), metadata={"format": "biflow-ema", "stage": "reverse", "step": "5",
                                                       "config": json.dumps(config)})
    res = invoke("sample", str(old), "--num", "4", "--out", str(tmp_path / "s"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "samples-biflow-w0.png").is_file()
    res = invoke("sample", str(tmp_path / "out"), "--num", "4")  # a folder without config.json is not an export
    assert res.exit_code == 2 and "no checkpoint found" in res.output


def test_damaged_export_is_named(pixel_runs, tmp_path):
    storage, _ = pixel_runs
    out = tmp_path / "model"
    assert invoke("export", "t-reverse", str(out), "--storage", str(storage)).exit_code == 0
    weights = load_file(str(out / "model.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(out / "model.safetensors"))
    res = invoke("sample", str(out), "--num", "2")
    assert res.exit_code == 2 and "model.safetensors does not match the models of" in res.output, res.output
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    res = invoke("sample", str(out), "--num", "2")
    assert res.exit_code == 2 and "v99; this biflow reads biflow-export up to v1" in res.output, res.output


def test_readme_python_example_runs(pixel_runs, tmp_path, monkeypatch):
    """The README's three lines, as written, against an exported folder at the path they name."""
    storage, _ = pixel_runs
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(from biflow import BiFlow\n.*?)```", readme, re.S)
    assert block, "README.md has no ```python block starting `from biflow import BiFlow`"
    code = block.group(1)
    assert len(code.strip().splitlines()) == 3, code
    folder = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    monkeypatch.chdir(tmp_path)
    assert invoke("export", "t-reverse", folder, "--storage", str(storage)).exit_code == 0
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = scope["images"]
    assert isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1:] == (1, 28, 28)
    assert images.abs().max() <= 1


def test_latent_export_keeps_its_codec_and_decodes_without_shards(tmp_path):
    """A latent run's checkpoint records the autoencoder and the statistics; the export keeps them,
    and sampling decodes to images with no shards and no manifest anywhere."""
    vae = jobdata.write_tiny_vae(tmp_path / "tiny-vae")
    latents = {"autoencoder": str(vae), "latent_mean": [0.1, -0.2, 0.0, 0.3], "latent_std": [1.5, 0.5, 1.0, 2.0]}
    storage = tmp_path / "runs"
    write_pair(storage, LATENT_FLOW, {"uri": str(tmp_path / "gone"), "kind": "latents"}, prefix="lat",
               latents=latents)
    out = tmp_path / "lat-model"
    res = invoke("export", "lat-reverse", str(out), "--storage", str(storage))
    assert res.exit_code == 0 and f"latent codec {vae}" in res.output, res.output
    assert json.loads((out / "config.json").read_text())["latents"] == latents
    model = BiFlow.from_pretrained(out)
    images = model.sample(2)
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1  # decoded through the tiny VAE
    moved = tmp_path / "vae-elsewhere"
    vae.rename(moved)
    res = invoke("sample", str(out), "--num", "2", "--out", str(tmp_path / "s"))
    assert res.exit_code == 2 and f"cannot load AutoencoderKL '{vae}'" in res.output, res.output
    res = invoke("sample", str(out), "--num", "2", "--out", str(tmp_path / "s"), "--autoencoder", str(moved))
    assert res.exit_code == 0, res.output
    again = BiFlow.from_pretrained(out, autoencoder=str(moved)).sample(2)
    assert torch.allclose(again, images)
