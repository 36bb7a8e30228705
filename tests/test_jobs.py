"""Every ready job config loads, validates, and builds its models at the stated size."""

from pathlib import Path

import pytest

from biflow.config import FlowConfig, load_config

pytestmark = pytest.mark.unit

JOBS = sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml"))


def test_jobs_exist_for_each_stage():
    names = {p.stem for p in JOBS}
    for base in ("quickstart", "smoke", "imagenet64", "imagenet256-b2", "imagenet256-xl2"):
        assert {f"{base}-forward", f"{base}-reverse"} <= names, base


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_loads_and_names_itself(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.stage == ("forward" if path.stem.endswith("forward") else "reverse")
    if cfg.stage == "reverse":
        assert cfg.train.forward_checkpoint.endswith("-forward")


def test_paper_sized_jobs_have_paper_shapes():
    b2 = load_config(JOBS[0].parent / "imagenet256-b2-forward.yaml").flow
    assert (b2.image_size, b2.channels, b2.patch_size, b2.num_tokens, b2.token_dim) == (32, 4, 2, 256, 16)
    assert b2.width == FlowConfig.from_size("B/2").width
    assert load_config(JOBS[0].parent / "imagenet64-forward.yaml").flow.num_tokens == 256
