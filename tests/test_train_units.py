"""Training spine without Ray workers: engine config, schedule, EMA, NaN guard,
checkpoint lookup and the checks that must fail before any worker starts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from biflow.config import ConfigError, load_config
from biflow.errors import UserError
from biflow.train import checkpoint as ckpt_io
from biflow.train import launch
from biflow.ema import EMA
from biflow.train.engine import DDPEngine, deepspeed_config, warmup_cosine

pytestmark = pytest.mark.integration


JOBS = Path(__file__).resolve().parents[1] / "jobs"


def smoke(stage: str = "forward", overrides: list[str] | None = None):
    return load_config(JOBS / f"smoke-{stage}.yaml", overrides)


def test_deepspeed_config_follows_typed_config():
    cfg = smoke(overrides=["train.zero_stage=3", "train.grad_accum=4", "train.batch_size=8", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2, precision="bf16")
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert "bf16" not in deepspeed_config(cfg, world_size=2, precision="fp32")
    # reduce-scatter overlapped with backward on GPUs only (gloo gains nothing)
    assert ds["zero_optimization"]["overlap_comm"] is False
    gpu = deepspeed_config(smoke(overrides=["train.zero_stage=2"]), world_size=8, precision="bf16", device_type="cuda")
    assert gpu["zero_optimization"]["overlap_comm"] is True


def test_adamw_is_fused_on_cuda_only():
    from biflow.train.engine import build_optimizer

    opt = build_optimizer(torch.nn.Linear(4, 4), smoke().optim)
    assert opt.defaults["fused"] in (None, False) and opt.defaults["foreach"] is False
    assert build_optimizer(torch.nn.Linear(4, 4), smoke().optim, fused=True).defaults["fused"] is True
    if torch.cuda.is_available():
        assert build_optimizer(torch.nn.Linear(4, 4).cuda(), smoke().optim).defaults["fused"] is True
    # the DeepSpeed engine builds its optimizer before it moves the module, so it passes its device's
    # choice instead of reading the (still CPU) parameters
    import inspect

    from biflow.train.engine import DeepSpeedEngine

    assert 'fused=device.type == "cuda"' in inspect.getsource(DeepSpeedEngine.__init__)


def test_compile_failure_at_the_first_step_falls_back_to_eager():
    from biflow.train.engine import compile_module, first_call

    class Breaks(torch.nn.Module):  # eager works; the compiled call raises (as a compiler failure would)
        def forward(self, x):
            return x * 2

    m = compile_module(Breaks())
    calls, said = [], []

    def step():
        if m._compiled_call_impl is not None:
            raise RuntimeError("inductor: no C++ compiler\nmore lines")
        calls.append(m(torch.ones(2)).sum().item())

    assert first_call(m, step, say=said.append) == "RuntimeError: inductor: no C++ compiler"
    assert calls == [4.0] and m._compiled_call_impl is None and "running eager" in said[0]
    assert first_call(torch.nn.Linear(2, 2), lambda: calls.append(1.0)) is None and calls == [4.0, 1.0]


def test_warmup_cosine_schedule():
    cfg = smoke(overrides=["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = warmup_cosine(cfg.optim, total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half way down the cosine
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(10, 110))


def test_warmup_cosine_follows_a_time_budget():
    from biflow.train.loop import StageClock

    cfg = smoke(overrides=["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    clock = StageClock(budget_s=100.0)
    f = warmup_cosine(cfg.optim, total_steps=1000, clock=clock)
    clock.elapsed = 40.0  # slow first steps: the warmup used 40% of the budget
    assert f(5) == pytest.approx(0.6)  # warmup counts steps
    assert clock.warmup_end is None
    assert f(10) == pytest.approx(1.0)  # the peak, right after the warmup, whatever time it took
    assert clock.warmup_end == 40.0  # recorded once, when the warmup ended
    assert f(20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 990)))  # steps lead
    clock.elapsed = 70.0  # half of the 60 s left after the warmup
    assert f(20) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half way down
    clock.elapsed = 100.0
    assert f(20) == pytest.approx(0.1)  # budget spent: at the floor, far before step 1000
    free = StageClock(budget_s=0.0)  # no budget: steps only
    g = warmup_cosine(cfg.optim, total_steps=110, clock=free)
    assert g(60) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6) and free.warmup_end is None


def test_stage_clock_counts_over_resumes():
    from biflow.train.loop import StageClock

    clock = StageClock(budget_s=10.0)
    clock.resume(9.5)  # an earlier attempt had spent 9.5 s
    assert not clock.expired and clock.fraction() == pytest.approx(0.95)
    assert clock.remaining() == pytest.approx(0.5)
    clock.sync(torch.device("cpu"))
    assert 9.5 <= clock.elapsed < 10.0
    clock.resume(10.0)
    assert clock.expired and clock.fraction() == 1.0
    free = StageClock(budget_s=0.0)
    free.resume(1e6)
    assert not free.expired and free.fraction() == 0.0 and free.remaining() == float("inf")
    with pytest.raises(ConfigError, match=r"train.time_budget_s=-1.*>= 0"):
        smoke(overrides=["train.time_budget_s=-1"])


def test_checkpoints_from_before_out_norm_load_with_their_norm():
    old = {"config": {"stage": "forward", "flow": {"width": 32}}}
    assert ckpt_io.saved_config(old)["flow"]["out_norm"] is True  # written when every block had the norm
    assert "out_norm" not in old["config"]["flow"]  # the metadata itself is left as it was
    new = {"config": {"stage": "forward", "flow": {"width": 32, "out_norm": False}}}
    assert ckpt_io.saved_config(new)["flow"]["out_norm"] is False


def test_param_ema_tracks_weights():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(30):
        ema.update()
    state = ema.full_state_dict()
    assert torch.allclose(state["weight"], torch.ones(2, 3), atol=1e-6)
    ema2 = EMA(torch.nn.Linear(3, 2), decay=0.5)
    ema2.load_full_state_dict(state)
    assert torch.equal(ema2.full_state_dict()["weight"], state["weight"])


def test_ddp_engine_skips_non_finite_gradients():
    cfg = smoke(overrides=["train.engine=ddp", "optim.warmup_steps=0"])
    net = torch.nn.Linear(4, 1)
    engine = DDPEngine(net, cfg, torch.device("cpu"), "fp32")
    before = net.weight.detach().clone()
    engine.backward(net(torch.full((2, 4), float("inf"))).sum())
    assert engine.step() is False and engine.overflow_steps == 1
    assert torch.equal(net.weight, before) and net.weight.grad is None
    engine.backward(net(torch.ones(2, 4)).sum())
    assert engine.step() is True
    assert not torch.equal(net.weight, before)
    assert math.isfinite(engine.last_grad_norm)


def test_bad_config_fails_before_any_worker(monkeypatch, tmp_path):
    def no_workers(*args, **kwargs):
        raise AssertionError("Ray was started for a bad config")

    monkeypatch.setattr(launch, "init_ray", no_workers)
    monkeypatch.setattr(launch, "build_trainer", no_workers)
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        launch.fit(smoke(overrides=["train.zero_stage=4"]), storage=str(tmp_path))
    with pytest.raises(ConfigError, match=r"train\.steps"):
        cfg = smoke()
        cfg.train.steps = 0
        launch.fit(cfg, storage=str(tmp_path), datasets={"train": None})
    with pytest.raises(UserError, match=r"train\.forward_checkpoint='missing-run'"):
        launch.fit(smoke("reverse", ["train.forward_checkpoint=missing-run"]), storage=str(tmp_path),
                   datasets={"train": None})
    with pytest.raises(UserError, match=r"data\.uri|manifest"):
        launch.fit(smoke(overrides=[f"data.uri={tmp_path}/no-data"]), storage=str(tmp_path))


def test_cli_bad_config_names_the_key(tmp_path):
    from biflow.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "forward", "--config", str(JOBS / "smoke-forward.yaml"),
                              "--set", "train.zero_stage=9", "--storage", str(tmp_path)])
    assert res.exit_code == 2
    assert "train.zero_stage=9" in res.output and "0, 1, 2, 3" in res.output
    res = runner.invoke(app, ["train", "sideways", "--config", str(JOBS / "smoke-forward.yaml")])
    assert res.exit_code == 2 and "forward, reverse" in res.output
    res = runner.invoke(app, ["train", "forward", "--config", str(JOBS / "smoke-forward.yaml"),
                              "--set", "optim.lrr=1"])
    assert res.exit_code == 2 and "optim.lrr" in res.output


def test_find_checkpoint_picks_the_latest(tmp_path):
    run = tmp_path / "runs" / "fwd"
    for step in (4, 12, 8):
        d = run / ckpt_io.checkpoint_dir_name(step)
        d.mkdir(parents=True)
        ckpt_io.write_rank0_files(d, {"w": torch.full((2,), float(step))},
                                  {"stage": "forward", "step": step, "config": {"flow": {"width": 32}}})
    (run / "checkpoint_00000099").mkdir()  # incomplete: no weights
    ref = ckpt_io.find_checkpoint("fwd", str(tmp_path / "runs"))
    assert ref.step == 12 and ref.metadata()["step"] == 12
    assert ref.ema_state()["w"][0].item() == 12.0
    assert ckpt_io.find_checkpoint(str(run / "checkpoint_00000004")).step == 4
    meta = (run / "checkpoint_00000012" / ckpt_io.METADATA).read_text()
    assert '"torch"' in meta and "AWS" not in meta
    with pytest.raises(UserError, match="no checkpoint found"):
        ckpt_io.find_checkpoint("nope", str(tmp_path / "runs"))



DS_SKIP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from biflow.config import load_config
from biflow.train.engine import DeepSpeedEngine
dist.init_process_group("gloo", rank=0, world_size=1)
for stage in (0, 2, 3):
    cfg = load_config(sys.argv[1], [f"train.zero_stage={stage}", "optim.warmup_steps=0"])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    engine = DeepSpeedEngine(net, cfg, torch.device("cpu"), "fp32")
    before = [p.detach().clone() for p in net.parameters()] if stage == 0 else None
    x = torch.ones(2, 4)
    loss = torch.sqrt(engine.model(x) * 0).sum()  # finite loss (0), NaN gradients
    assert torch.isfinite(loss)
    engine.backward(loss)
    assert engine.step() is False and engine.overflow_steps == 1, stage
    if before is not None:
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
        assert engine.lr == cfg.optim.lr  # the schedule did not advance either
    engine.backward(engine.model(x).sum())
    assert engine.step() is True, stage
    print("stage", stage, "ok", flush=True)
"""


def test_deepspeed_engine_skips_non_finite_gradients(tmp_path):
    """A finite loss with NaN gradients: ZeRO 0, 2 and 3 all skip the update and count it."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run([sys.executable, "-c", DS_SKIP_SCRIPT, str(JOBS / "smoke-forward.yaml")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stdout.splitlines() if line.endswith(" ok")] == [
        "stage 0 ok", "stage 2 ok", "stage 3 ok"]


def test_prepare_makes_local_paths_absolute(tmp_path, monkeypatch):
    """Ray workers run in their own working directory: a relative run storage once put every
    commit marker under Ray's session dir, so no checkpoint of `biflow train` counted."""
    from biflow.train.launch import prepare

    monkeypatch.chdir(tmp_path)
    cfg, run = prepare(smoke(overrides=["ray.storage=runs/x", "data.uri=data/shards"]))
    assert cfg.ray.storage == run.storage == str(tmp_path / "runs" / "x")
    assert cfg.data.uri == str(tmp_path / "data" / "shards")
    cfg, _ = prepare(smoke(overrides=["ray.storage=s3://bucket/runs"]), storage=str(tmp_path / "abs"))
    assert cfg.ray.storage == str(tmp_path / "abs")


def test_train_compile_is_opt_in_and_falls_back_to_eager_at_the_first_step(capsys):
    from biflow.train.engine import build_engine

    plain = build_engine(torch.nn.Linear(2, 2), smoke(overrides=["train.engine=ddp"]), torch.device("cpu"))
    assert plain.module._compiled_call_impl is None and not plain.compile_pending
    eng = build_engine(torch.nn.Linear(2, 2), smoke(overrides=["train.engine=ddp", "train.compile=true"]),
                       torch.device("cpu"))
    assert eng.module._compiled_call_impl is not None and eng.compile_pending

    def forward():  # as a compiler failure would: only the compiled call raises
        if eng.module._compiled_call_impl is not None:
            raise RuntimeError("inductor: no C++ compiler")
        return 7

    assert eng.call(forward) == 7 and eng.module._compiled_call_impl is None and not eng.compile_pending
    assert "torch.compile failed at the first step (RuntimeError: inductor: no C++ compiler); running eager" \
        in capsys.readouterr().out
    assert eng.call(lambda: 8) == 8


def test_cli_answers_dash_h_and_version_as_people_type_them():
    from typer.testing import CliRunner

    from biflow import __version__
    from biflow.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == __version__
    for argv in (["-h"], ["train", "-h"], ["bench", "-h"], ["cluster", "-h"]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 0 and "Usage: " in res.output, (argv, res.output)
    assert runner.invoke(app, ["version"]).output.strip() == __version__  # the old command still works
