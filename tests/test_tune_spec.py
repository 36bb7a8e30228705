"""Ray Tune search specs: the search-space checks (no Ray), moved from test_tune.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from biflow.cli import app
from biflow.config import ConfigError
from biflow.tune import load_search

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "tune" / "smoke.yaml"


def space(entries: str) -> list[str]:
    return [f"space={entries}"]


@pytest.mark.parametrize("entries, expected", [
    ('{"flow.nois_std": {"uniform": [0.1, 0.2]}}', "unknown parameter 'flow.nois_std'"),
    ('{"reverse.align_wieght": {"uniform": [0.1, 0.2]}}', "unknown parameter 'reverse.align_wieght'"),
    ('{"flow.noise_std": {"uniform": [0.3, 0.2]}}', "space.flow.noise_std: empty range"),
    ('{"optim.lr": {"loguniform": [0.001, 0.001]}}', "space.optim.lr: empty range"),
    ('{"flow.noise_std": {"choice": []}}', "space.flow.noise_std: choice needs a non-empty list"),
    ('{"flow.noise_std": {"normal": [0, 1]}}', "space.flow.noise_std: unknown distribution 'normal'"),
    ('{"flow.depth": {"uniform": [1, 3]}}', "space.flow.depth: value 1.0 makes an invalid config"),
    ('{"flow.noise_std": {"uniform": [-0.1, 0.2]}}', "space.flow.noise_std: value -0.1 makes an invalid config"),
    ('{"flow.noise_std": {"grid": [0.1, 0.2]}}', "grid does not mix with search: optuna"),
    ('{"flow": {"uniform": [0.1, 0.2]}}', "'flow' is a section"),
    ('{"train.steps": {"randint": [10, 20]}}', "'train.steps' cannot be searched"),
    ('{"eval.guidance": {"uniform": [0.0, 2.0]}}', "eval.* settings only matter with metric: fid"),
    ('{}', "space: required"),
])
def test_bad_search_space_names_the_key(entries, expected):
    with pytest.raises(ConfigError) as err:
        load_search(SMOKE, space(entries))
    assert expected in str(err.value)


def test_search_spec_checks():
    with pytest.raises(ConfigError, match="unknown key 'num_trials'"):
        load_search(SMOKE, ["num_trials=3"])
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'"):
        load_search(SMOKE, ["base.train.stpes=3"])
    with pytest.raises(ConfigError, match="flow.noise_std: a reverse-only search reuses one frozen forward"):
        load_search(SMOKE, ["stage=reverse", "base=jobs/smoke-reverse.yaml"])
    spec, bases, params = load_search(SMOKE, ["num_samples=6", "base.train.batch_size=16"])
    assert spec.num_samples == 6 and bases["forward"]["train"]["batch_size"] == 16
    assert [p.key for p in params] == ["flow.noise_std", "optim.lr"]
    # stage both: flow.* goes to the forward job, the rest to the reverse job
    spec, bases, params = load_search(SMOKE, ["stage=both", "base=jobs/smoke-reverse.yaml",
                                              "forward=jobs/smoke-forward.yaml",
                                              'space={"flow.noise_std": {"choice": [0.05, 0.1]}, '
                                              '"reverse.align_weight": {"uniform": [0.5, 2.0]}}'])
    assert set(bases) == {"forward", "reverse"} and bases["reverse"]["stage"] == "reverse"


def test_cli_bad_space_exits_2_naming_the_key():
    result = CliRunner().invoke(app, ["tune", "--config", str(SMOKE), "--set",
                                      'space={"reverse.denoise_wieght": {"uniform": [0, 1]}}'])
    assert result.exit_code == 2
    assert "unknown parameter 'reverse.denoise_wieght'" in result.output


def test_shipped_searches_validate():
    for path in sorted((ROOT / "jobs" / "tune").glob("*.yaml")):
        spec, bases, params = load_search(path)
        assert params, path
