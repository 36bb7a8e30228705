"""The prepared GPU check (`make device-check`) in its CPU dry mode: the same
steps at tiny shapes, so the script cannot rot between device sessions.

The default tier runs it the way a device machine meets it: from a bare Python
that holds only torch and numpy, the check installing what its steps need."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_goal_logic_and_exit_status():
    from biflow.bench.device import GOALS, check_goals, goal_values, passed

    steps = {"forward_mfu": {"status": "ok", "mfu": 0.47},
             "sampling": {"status": "ok", "batches": {"1": {"speedup_vs_exact_cfg_tweedie": 180.0},
                                                      "256": {"biflow_best_ms_per_image": 0.31}}},
             "flops": {"status": "ok", "worst_rel_error": -0.002},
             "train_smoke": {"status": "ok", "forward": {"loss_falls": True}, "reverse": {"loss_falls": True}}}
    goals = check_goals(goal_values(steps))
    assert set(goals) == set(GOALS)
    assert goals["forward_mfu"]["met"] is True and goals["biflow_ms_per_image_b256"]["met"] is True
    assert goals["speedup_vs_exact_cfg_b1"] == {**GOALS["speedup_vs_exact_cfg_b1"], "value": 180.0, "met": False}
    assert goals["flops_rel_error"]["met"] is True and goals["smoke_loss_falls"]["value"] == 1.0
    gpu = {"mode": "gpu", "steps": steps, "goals": goals}
    assert passed(gpu) is False  # one goal missed: the check fails
    goals["speedup_vs_exact_cfg_b1"]["met"] = True
    assert passed(gpu) is True
    # a step that did not run leaves its goal unmeasured, and a GPU check with it fails
    steps["train_smoke"] = {"status": "skipped", "reason": "not installed here: ray[train,data]"}
    assert check_goals(goal_values(steps))["smoke_loss_falls"]["met"] is None
    assert passed({"mode": "gpu", "steps": steps, "goals": check_goals(goal_values(steps))}) is False
    # the dry mode's status counts steps only (CPU figures say nothing about the goals)
    assert passed({"mode": "cpu-dry", "steps": {"flops": {"status": "ok"}}, "goals": goals}) is True


def test_constraints_leave_what_the_machine_has_alone():
    from biflow.bench.device import constraints, installer_command

    pins = dict(line.split("==", 1) for line in constraints())
    assert pins["torch"] == torch.__version__  # never replaced
    assert pins["numpy"] == np.__version__
    assert pins["ray"] == "2.60.0" and pins["deepspeed"] == "0.19.8"  # the lock's, for what is missing
    cmd = installer_command(["deepspeed"], Path("c.txt"), wheels="/w")
    assert cmd[-1] == "deepspeed" and "--no-index" in cmd and "/w" in cmd


def test_unknown_step_is_named():
    from biflow.bench.device import device_check
    from biflow.errors import UserError

    with pytest.raises(UserError, match="unknown device-check step.*mfu.*choose from cuda_tests, flops"):
        device_check(cpu=True, only=["mfu"])


def _uv() -> str:
    uv = ROOT / ".venv-tools" / "bin" / "uv"
    return str(uv) if uv.exists() else (shutil.which("uv") or pytest.fail("uv not found (make install puts it in "
                                                                          ".venv-tools)"))


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with only torch and numpy, the versions this venv has (as on a GPU box)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    uv = _uv()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    links = [a for d in os.environ.get("PIP_FIND_LINKS", "").split() for a in ("--find-links", d)]
    subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *links,
                    f"torch=={torch.__version__}", f"numpy=={np.__version__}"], check=True, timeout=600)
    return venv / "bin" / "python"


def test_dry_mode_from_a_bare_python(tmp_path, bare_python):
    """bf16 (DeepSpeed ZeRO-2, CPU), the MFU section eager and compiled, the FLOP check, sampling,
    the CUDA tests' collection and the goal logic, after installing what they need. The Ray smoke
    training is left to the slow test below (Ray Train runs in many default-tier tests)."""
    listed = subprocess.run([str(bare_python), "-c", "import importlib.util as u; "
                             "print([m for m in ('yaml', 'pytest', 'deepspeed', 'ray', 'scipy', 'pyarrow') "
                             "if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert listed.stdout.strip() == "[]", listed.stdout  # bare indeed
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(_uv()).parent}:{os.environ['PATH']}"}
    env.pop("DS_ACCELERATOR", None)  # the check sets what it needs itself
    proc = subprocess.run([str(bare_python), "-m", "biflow.bench.device", "--cpu", "--out", str(tmp_path),
                           "--only", "cuda_tests,flops,sampling,forward_mfu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "device-check-cpu-dry.json").read_text())
    assert saved["install"]["status"] == "ok" and set(saved["install"]["requested"]) == {"pytest", "deepspeed"}
    steps = saved["steps"]
    assert list(steps) == ["cuda_tests", "flops", "sampling", "forward_mfu"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["cuda_tests"]["counts"].get("skipped", 0) >= 1  # collected from tests/test_cuda.py alone
    assert abs(steps["flops"]["worst_rel_error"]) < 0.01
    assert set(steps["flops"]["shapes"]) == {"B/2", "XL/2"}
    runs = steps["forward_mfu"]["runs"]
    assert {r["engine"] for r in runs.values()} == {"deepspeed"} and {r["precision"] for r in runs.values()} == {"bf16"}
    assert runs["compiled"]["compiled"] is True and runs["compiled"]["compile_error"] is None
    assert runs["eager"]["compiled"] is False and all(r["step_s"] > 0 for r in runs.values())
    goals = saved["goals"]
    assert goals["flops_rel_error"]["met"] is True
    assert goals["speedup_vs_exact_cfg_b1"]["value"] == steps["sampling"]["batches"]["1"]["speedup_vs_exact_cfg_tweedie"]
    assert goals["smoke_loss_falls"]["met"] is None  # not run
    sampling = steps["sampling"]
    assert sampling["compile_backend"] == "aot_eager" and sampling["compile_error"] is None
    for row in sampling["batches"].values():  # the compiled single pass was timed; the goal takes the better
        assert row["ms_per_image"]["biflow_1nfe_compiled"] > 0
        assert row["biflow_best_ms_per_image"] == min(row["ms_per_image"]["biflow_1nfe"],
                                                      row["ms_per_image"]["biflow_1nfe_compiled"])
    assert "[device-check] goal flops_rel_error" in proc.stdout
    torch_after = subprocess.run([str(bare_python), "-c", "import torch; print(torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    assert torch_after == torch.__version__  # the machine's torch is left alone


@pytest.mark.slow  # out of CI's budget (make test-slow runs it): every step, Ray Train included, in this venv
def test_device_check_dry_mode_runs_every_step(tmp_path, ray_local):
    from biflow.bench.device import device_check

    results = device_check(tmp_path, cpu=True, steps=4, do_install=False, log=print)
    saved = json.loads((tmp_path / "device-check-cpu-dry.json").read_text())
    assert saved["mode"] == "cpu-dry" and set(saved["steps"]) == {"cuda_tests", "flops", "sampling", "forward_mfu",
                                                                   "train_smoke"}
    steps = results["steps"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["train_smoke"]["forward"]["step"] == steps["train_smoke"]["reverse"]["step"] == 4
    assert len(steps["train_smoke"]["forward"]["losses"]) >= 2
    assert steps["sampling"]["batches"]["1"]["ms_per_image"]["biflow_1nfe"] > 0
    assert steps["forward_mfu"]["step_s"] > 0 and steps["forward_mfu"]["mfu"] is None  # no bf16 peak on a CPU
