"""Recipes (jobs/eval/*.yaml): strict loading, per-stage configs, goal checks."""

import json
from pathlib import Path

import pytest

from biflow.config import ConfigError
from biflow.recipe import Goals, check_goals, load_recipe

pytestmark = pytest.mark.unit


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "jobs" / "eval").glob("*.yaml"))


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"quickstart", "fashion-mnist"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_both_stage_configs(path, tmp_path):
    recipe = load_recipe(path)
    fwd = recipe.stage_config("forward", tmp_path, 2, ["train.log_every=7"])
    rev = recipe.stage_config("reverse", tmp_path, 2, [])
    assert (fwd.stage, rev.stage) == ("forward", "reverse")
    assert fwd.name == f"{recipe.name}-forward" and rev.name == f"{recipe.name}-reverse"
    assert rev.train.forward_checkpoint == fwd.name
    assert fwd.data.uri == rev.data.uri == str(tmp_path / "data")
    assert fwd.ray.storage == str(tmp_path / "runs") and fwd.ray.workers == 2
    assert fwd.train.log_every == 7
    # the reverse stage trains on the forward stage's flow
    assert rev.flow == fwd.flow


def test_quality_recipe_has_the_issue_goals():
    recipe = load_recipe(ROOT / "jobs" / "eval" / "fashion-mnist.yaml")
    assert recipe.goals.fid_ratio_max == 0.6 and recipe.goals.recon_psnr_min_db == 26.0
    assert recipe.goals.biflow_fid_max == 50.0 and recipe.goals.total_time_max_s == 3000


def test_caller_overrides_win_over_the_recipe(tmp_path):
    recipe = load_recipe(ROOT / "jobs" / "eval" / "fashion-mnist.yaml")
    cfg = recipe.stage_config("reverse", tmp_path, 1, ["train.steps=5"])
    assert cfg.train.steps == 5 and cfg.ray.workers == 1


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_bad_recipes_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'evaluate.samples'"):
        load_recipe(_write(tmp_path, "name: x\nevaluate: {samples: 3}\n"))
    with pytest.raises(ConfigError, match=r"forward.job='nope.yaml' not found"):
        load_recipe(_write(tmp_path, "name: x\nforward: {job: nope.yaml}\nreverse: {job: nope.yaml}\n"))
    with pytest.raises(ConfigError, match="forward.job is empty"):
        load_recipe(_write(tmp_path, "name: x\n"))
    with pytest.raises(ConfigError, match=r"evaluate.guidance\[1\]: expected a number"):
        load_recipe(_write(tmp_path, "evaluate: {guidance: [0, high]}\n"))
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_goals_are_checked_per_guidance():
    results = {"recon_psnr_db": 29.0, "samplers": {
        "biflow@w=0": {"guidance": 0.0, "fid_ratio_vs_exact": 0.7},
        "exact@w=0": {"guidance": 0.0},
        "biflow@w=1": {"guidance": 1.0, "fid_ratio_vs_exact": 0.85}}}
    goals = check_goals(results, Goals(fid_ratio_max=0.8, recon_psnr_min_db=30.0))
    assert goals["fid_ratio@w=0"]["met"] and not goals["fid_ratio@w=1"]["met"]
    assert goals["recon_psnr_db"] == {"value": 29.0, "min": 30.0, "met": False}
    assert check_goals(results, Goals()) == {}


def test_kid_ratio_and_wall_time_goals():
    results = {"timings": {"total_s": 610.0}, "samplers": {
        "biflow@w=1": {"guidance": 1.0, "fid_ratio_vs_exact": 0.6, "kid_ratio_vs_exact": 0.75}}}
    goals = check_goals(results, Goals(fid_ratio_max=0.7, kid_agrees=True, kid_ratio_max=0.7, total_time_max_s=600))
    assert goals["fid_ratio@w=1"]["met"]
    assert goals["kid_ratio@w=1"] == {"value": 0.75, "max": 0.7, "met": False}  # the ratio goal, not just < 1
    assert goals["total_time_s"] == {"value": 610.0, "max": 600, "met": False}


def test_auto_layout_gives_a_small_machine_plain_pytorch_ranks(monkeypatch):
    from biflow.recipe import auto_layout

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    recipe = load_recipe(ROOT / "jobs" / "eval" / "quickstart.yaml")
    job = recipe.stage_config("forward", Path("/tmp/x"), 2, [])
    assert (job.ray.workers, job.train.batch_size, job.train.engine) == (2, 32, "deepspeed")
    assert auto_layout(job, cpus=2) == ["ray.workers=2", "ray.cpus_per_worker=1", "train.engine=ddp",
                                        "train.batch_size=32"]
    assert auto_layout(job, cpus=1) == ["ray.workers=1", "ray.cpus_per_worker=1", "train.engine=ddp",
                                        "train.batch_size=64"]  # one core: the same global batch on one rank
    assert auto_layout(job, cpus=16) == ["ray.workers=2"]  # a bigger machine: the job's ranks and engine
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert auto_layout(job, cpus=2) == ["ray.workers=2"]  # a cluster: the job's ranks and engine
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    fwd, rev = recipe.stage_configs(Path("/tmp/x"), 0, [])  # workers 0: the automatic layout
    assert (fwd.ray.workers, fwd.ray.cpus_per_worker, fwd.train.engine, fwd.train.batch_size) == (2, 1, "ddp", 32)
    assert (rev.ray.workers, rev.train.engine) == (2, "ddp")
    fwd, _ = recipe.stage_configs(Path("/tmp/x"), 0, ["train.engine=deepspeed"])  # the caller's --set wins
    assert fwd.train.engine == "deepspeed"


def test_cli_rejects_a_bad_recipe_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from biflow.cli import app

    bad = _write(tmp_path, f"name: x\nforward: {{job: {ROOT / 'jobs' / 'quickstart-forward.yaml'}}}\n"
                           "reverse: {job: missing.yaml}\n")
    result = CliRunner().invoke(app, ["recipe", str(bad)])
    assert result.exit_code == 2
    assert "reverse.job='missing.yaml' not found" in result.output


def test_ablation_recipe_rows_are_valid_reverse_configs(tmp_path):
    from biflow.recipe import apply_overrides_cfg

    recipe = load_recipe(ROOT / "jobs" / "eval" / "ablation.yaml")
    names = [a.name for a in recipe.ablations]
    assert names[0] == "full" and {"no-alignment", "tweedie", "no-norm-control", "no-perceptual",
                                   "inference-cfg"} <= set(names)
    rev = recipe.stage_config("reverse", tmp_path, 2, [])
    assert rev.reverse.perceptual_weight > 0 and rev.reverse.guidance_max > 0  # the full model has every term
    for ab in recipe.ablations:
        cfg = apply_overrides_cfg(rev, ab.set)
        assert cfg.train.steps == rev.train.steps and cfg.flow == rev.flow  # same budget, same flow
    cfg = apply_overrides_cfg(rev, next(a for a in recipe.ablations if a.name == "inference-cfg").set)
    assert cfg.reverse.guidance_max == 0
    # "no norm control" is the paper's "clip" row: its own forward flow, without the clip
    row = next(a for a in recipe.ablations if a.name == "no-norm-control")
    fwd = recipe.stage_config("forward", tmp_path, 2, [])
    assert fwd.flow.clip > 0 and apply_overrides_cfg(fwd, row.forward_set).flow.clip == 0
    assert apply_overrides_cfg(rev, row.set).reverse.norm_control is False
    assert [a.name for a in recipe.ablations if a.forward_set] == ["no-norm-control"]
    with pytest.raises(ConfigError, match="ablations need distinct names"):
        load_recipe(ROOT / "jobs" / "eval" / "ablation.yaml", ["ablations=[{name: a}, {name: a}]"])


def test_results_report_copies_grids_and_marks_missed_goals(tmp_path):
    from biflow.recipe import write_results_report

    grid = tmp_path / "eval" / "samples-biflow-w1.png"
    grid.parent.mkdir()
    grid.write_bytes(b"png")
    results = {"num_samples": 2000, "num_reference": 10000, "noise_std": 0.1, "bpd": 6.4461, "recon_psnr_db": 18.7,
               "inversion_psnr_db": 18.71, "real_vs_real": {"fid": 7.94, "kid": 0.0, "kid_se": 1e-5, "num": 2000,
                                                            "split": "train"},
               "samplers": {"biflow@w=1": {"sampler": "biflow", "guidance": 1.0, "fid": 106.936, "kid": 0.0782,
                                           "kid_se": 0.0002, "ms_per_image": 3.71, "timing_batch": 16,
                                           "speedup_vs_exact": 12.13, "grid": str(grid)}}}
    results["goals"] = check_goals(results, Goals(recon_psnr_min_db=30.0, biflow_fid_max=40.0))
    recipe = load_recipe(ROOT / "jobs" / "eval" / "fashion-mnist.yaml")
    md = write_results_report(results, recipe, tmp_path / "docs" / "quality")
    text = md.read_text()
    assert "| biflow@w=1 | 1 | 106.94 | 78.20 ± 0.20 | 3.71 | 12.1x |" in text
    assert "| fid@biflow@w=1 | 106.936 | ≤ 40 | **missed** |" in text
    assert "| denoising PSNR of G(F(x̃)) vs x (dB) | 18.700 | ≥ 30 | **missed** |" in text
    assert "bits/dim 6.446 at σ = 0.1." in text
    assert (tmp_path / "docs" / "quality" / "samples-biflow-w1.png").read_bytes() == b"png"
    import json

    saved = json.loads((tmp_path / "docs" / "quality" / "results.json").read_text())
    assert saved["samplers"]["biflow@w=1"]["grid"] == "samples-biflow-w1.png"
    assert results["samplers"]["biflow@w=1"]["grid"] == str(grid)  # the caller's dict is left as it was


def test_ablation_report_writes_table_chart_and_json(tmp_path):
    import json

    from biflow.recipe import ablation_table, write_ablation_report

    row = {"description": "", "sampler": "biflow", "nfe": 1, "guidance": 1.0, "kid": 0.3, "kid_se": 4e-4,
           "recon_psnr_db": 12.3, "paper": ""}
    summary = {"recipe": {"name": "ablation"}, "num_samples": 300,
               "rows": [{**row, "ablation": "full", "fid": 270.45}, {**row, "ablation": "no-alignment", "fid": 279.96,
                                                                    "paper": "43.41 vs 36.93"}],
               "exact": {"exact@w=1": {"guidance": 1.0, "fid": 212.59, "kid": 0.169, "kid_se": 4e-4}},
               "real_vs_real": {"fid": 39.07, "kid": -2.5e-4, "kid_se": 3e-5}}
    write_ablation_report(summary, ablation_table(summary), tmp_path)
    md = (tmp_path / "ablation.md").read_text()
    assert "| no-alignment | biflow | 1 | 1 | 279.96 | 300.00 ± 0.40 | 12.30 | 43.41 vs 36.93 |" in md
    assert "| exact inverse | exact | serial | 1 | 212.59 |" in md and "| real vs real (floor) | | | | 39.07 |" in md
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][0]["fid"] == 270.45
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_families_report_shows_the_table_and_both_samplers_grids(tmp_path):
    """biflow.families.write_report on the committed family run's summary: the table, the goals
    and, per family, the BiFlow and exact-inverse grids copied next to the report."""
    from PIL import Image

    from biflow.families import write_report

    summary = json.loads((Path(__file__).parents[1] / "docs" / "families" / "families.json").read_text())
    results = {}
    for row in summary["rows"]:
        samplers = {}
        for sampler in ("biflow", "exact"):
            grid = tmp_path / "eval" / row["family"] / f"samples-{sampler}-w{row['guidance']:g}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 17 if sampler == "biflow" else 99).save(grid)
            samplers[f"{sampler}@w={row['guidance']:g}"] = {"grid": str(grid)}
        results[row["family"]] = {"samplers": samplers}
    results[summary["rows"][-1]["family"]]["samplers"]["exact@w=1"]["grid"] = str(tmp_path / "gone.png")  # a lost grid
    write_report(summary, results, tmp_path / "report", "Families")
    md = (tmp_path / "report" / "families.md").read_text()
    assert md.startswith("# Families\n") and "| goal | measured | target |" in md
    assert json.loads((tmp_path / "report" / "families.json").read_text()) == summary
    first, last = summary["rows"][0]["family"], summary["rows"][-1]["family"]
    assert (f"| {first} | ![{first} biflow](img/{first}-samples-biflow-w1.png) | "
            f"![{first} exact](img/{first}-samples-exact-w1.png) |") in md
    assert f"![{last} biflow](img/{last}-samples-biflow-w1.png) | (no grid) |" in md
    assert Image.open(tmp_path / "report" / "img" / f"{first}-samples-exact-w1.png").getpixel((0, 0)) == 99
    assert len(list((tmp_path / "report" / "img").iterdir())) == 2 * len(summary["rows"]) - 1
