"""The prepared GPU check (`make device-check`) in its CPU dry mode: the same
steps at tiny shapes, so the script cannot rot between device sessions."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.slow  # out of CI's 30-min budget (make test-slow runs it): 2.5 min; make device-check DEVICE_ARGS=--cpu
def test_device_check_dry_mode_runs_every_step(tmp_path, ray_local):
    from biflow.bench.device import device_check

    results = device_check(tmp_path, cpu=True, steps=2, log=print)
    saved = json.loads((tmp_path / "device-check-cpu-dry.json").read_text())
    assert saved["mode"] == "cpu-dry" and set(saved["steps"]) == {"cuda_tests", "train_smoke", "sampling_b2",
                                                                   "forward_mfu"}
    steps = results["steps"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["train_smoke"]["forward"]["step"] == steps["train_smoke"]["reverse"]["step"] == 2
    assert steps["sampling_b2"]["ms_per_image"]["biflow_1nfe"] > 0
    assert steps["sampling_b2"]["speedup_vs_exact_cfg_tweedie"] > 0  # a figure, not a timed goal (noisy CPU)
    assert steps["forward_mfu"]["step_s"] > 0 and steps["forward_mfu"]["mfu"] is None  # no bf16 peak on a CPU
