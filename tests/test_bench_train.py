"""`biflow bench train`: the FLOP formula against a hand count and torch's FLOP
counter, the MFU code path on CPU, and a tiny end-to-end run (real Ray Train
workers, real DeepSpeed) whose JSON ratios must be the ones computed from its
own measured numbers. The full-size benchmark is marked slow."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from biflow.bench import bench_train, flow_train_flops, gpu_bf16_peak, measure_mfu
from biflow.config import FlowConfig

pytestmark = pytest.mark.unit


TINY = dict(image_size=8, channels=1, patch_size=4, width=8, depth=1, num_blocks=2, num_heads=2, num_classes=10)


def test_flow_train_flops_matches_a_hand_count():
    cfg = FlowConfig(**TINY)  # token dim d = 1*4*4 = 16, N = 4 tokens, W = 8
    w, d, n = 8, 16, 4
    layer = (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w) + 2 * 2 * w  # 12W^2 + 13W
    assert layer == 872
    block = (d * w + w) + (w * 2 * d + 2 * d) + 1 * layer  # proj_in, proj_out, layers (no out norm)
    dense = 2 * block
    assert dense == 2592
    per_token = 6 * dense + 12 * (2 * 1) * w * n  # 6P + 12 L W N
    f = flow_train_flops(cfg, batch=3)
    assert f["dense_params"] == dense
    assert f["flops_per_token"] == per_token == 16320
    assert f["flops_per_step"] == 3 * n * per_token == 195840
    # flow.out_norm adds a LayerNorm (2W parameters) before each block's proj_out
    block = (d * w + w) + (w * 2 * d + 2 * d) + 2 * w + 1 * layer  # proj_in, proj_out, norm, layers
    dense = 2 * block
    assert dense == 2624
    per_token = 6 * dense + 12 * (2 * 1) * w * n
    f = flow_train_flops(FlowConfig(**TINY, out_norm=True), batch=3)
    assert f["dense_params"] == dense
    assert f["flops_per_token"] == per_token == 16512
    assert f["flops_per_step"] == 3 * n * per_token == 198144
    # the tables left out are exactly the position and label embeddings
    from biflow.models import TARFlow

    total = sum(p.numel() for p in TARFlow(FlowConfig(**TINY, out_norm=True)).parameters())
    assert total == dense + 2 * (n * w + (10 + 1) * w)
    assert sum(p.numel() for p in TARFlow(cfg).parameters()) == 2592 + 2 * (n * w + (10 + 1) * w)


def _math_sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
    """Attention as plain matmuls (torch's FLOP counter does not see the CPU SDPA kernel)."""
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if is_causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def test_flow_train_flops_agrees_with_torch_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from biflow.losses import forward_loss
    from biflow.models import TARFlow, layers

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", _math_sdpa)

    cfg = FlowConfig(image_size=16, channels=3, patch_size=2, width=64, depth=2, num_blocks=2, num_heads=4,
                     num_classes=10)
    batch = 4
    flow = TARFlow(cfg)
    x = torch.rand(batch, 3, 16, 16) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = forward_loss(flow, x, y, cfg)
        loss.backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts.get("aten.bmm", 0) > 0  # the attention matmuls are counted
    counted = counter.get_total_flops()  # matmuls + attention, forward and backward
    formula = flow_train_flops(cfg, batch)["flops_per_step"]
    # the formula also counts biases/norms (6 per parameter) and the first block's
    # input gradient that autograd skips: a few percent, no more
    assert abs(formula - counted) / counted < 0.05, (formula, counted)


def test_flops_formula_within_one_percent_of_the_counter_at_b2_and_xl2():
    """The MFU's formula against torch's FLOP counter at the paper's shapes (meta device:
    no memory, no time): within 1%, as the device check requires."""
    from biflow.bench.flops import counted_train_flops

    for size in ("B/2", "XL/2"):
        cfg = FlowConfig.from_size(size, image_size=32, channels=4, num_classes=1000)
        counted, formula = counted_train_flops(cfg, 8), flow_train_flops(cfg, 8)["flops_per_step"]
        assert abs(formula / counted - 1) < 0.01, (size, formula, counted)
        assert counted > {"B/2": 1e12, "XL/2": 8e12}[size]  # the whole step was counted, not one block


def test_measure_mfu_code_path_on_cpu():
    cfg = FlowConfig(**TINY)
    r = measure_mfu(cfg, batch=4, steps=2, warmup=1, precision="fp32", peak_flops=1e12, device="cpu", engine="ddp")
    assert r["device"] == "cpu" and r["precision"] == "fp32" and r["steps_timed"] == 2
    assert r["flops_per_step"] == flow_train_flops(cfg, 4)["flops_per_step"]
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"])
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 1e12)
    assert r["samples_per_s"] == pytest.approx(4 / r["step_s"])
    assert measure_mfu(cfg, batch=2, steps=1, warmup=1, precision="fp32", device="cpu", engine="ddp")["mfu"] is None
    # (DeepSpeed ZeRO-2 in bf16, eager and compiled, the path the device check measures: test_device_check.py)


def test_gpu_peak_table():
    assert gpu_bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_bf16_peak("Some Future GPU") is None


def test_cli_rejects_unknown_preset(tmp_path):
    from typer.testing import CliRunner

    from biflow.cli import app

    res = CliRunner().invoke(app, ["bench", "train", "--out", str(tmp_path), "--preset", "nope"])
    assert res.exit_code == 2
    assert "unknown train preset 'nope'" in res.output


def _check_results(r: dict, out_dir, workers: int = 2) -> None:
    on_disk = json.loads((out_dir / "train.json").read_text())
    assert (out_dir / "train.png").stat().st_size > 0
    assert on_disk["benchmark"] == "train" and {"cpu_count", "torch"} <= set(on_disk["machine"])
    assert on_disk["throughput"]["samples_per_s"] == r["throughput"]["samples_per_s"]
    loads = r["load_average"]
    assert {"start", "end"} <= set(loads) and all(len(v) == 3 for v in loads.values())

    t = r["throughput"]
    sps = t["samples_per_s"]
    # each figure is the median of its own measured windows...
    sessions = t["plain_sessions"][f"{workers}_threads"]
    assert len(sessions) == 5  # before, between and after the four Ray runs
    pooled = [w for sess in sessions for w in sess["window_samples_per_s"]]
    assert sps["plain_pytorch"] == pytest.approx(statistics.median(pooled))
    med = [statistics.median(sess["window_samples_per_s"]) for sess in sessions]
    assert sps["deepspeed_zero2_ray"] == pytest.approx(
        statistics.median(t["ray_runs"]["deepspeed_zero2"]["window_samples_per_s"]))
    assert sps["ddp_ray"] == pytest.approx(statistics.median(t["ray_runs"]["ddp"]["window_samples_per_s"]))
    assert all(v > 0 for v in sps.values())
    # ...and the ratios are computed from those figures: each Ray run against the
    # plain sessions right before and after it
    assert t["ratio_zero2_vs_plain"] == pytest.approx(sps["deepspeed_zero2_ray"] / ((med[0] + med[1]) / 2))
    assert t["ratio_ddp_vs_plain"] == pytest.approx(sps["ddp_ray"] / ((med[1] + med[2]) / 2))
    one = [statistics.median(sess["window_samples_per_s"]) for sess in t["plain_sessions"]["1_threads"]]
    best = max((med[0] + med[1]) / 2, (one[0] + one[1]) / 2)
    assert t["ratio_zero2_vs_best_plain"] == pytest.approx(sps["deepspeed_zero2_ray"] / best)
    assert t["ratio_zero2_vs_plain_pooled"] == pytest.approx(sps["deepspeed_zero2_ray"] / sps["plain_pytorch"])
    assert t["meets_goal"] == (t["ratio_zero2_vs_plain"] >= 0.90)
    # one worker with every core (the quickstart's layout), against the plain sessions around it
    for i, key in enumerate((f"1x{workers}cpu_ddp", f"1x{workers}cpu_deepspeed_zero2")):
        lay = t["layouts"][key]
        assert lay["samples_per_s"] == pytest.approx(statistics.median(t["ray_runs"][key]["window_samples_per_s"]))
        assert lay["ratio_vs_plain"] == pytest.approx(lay["samples_per_s"] / ((med[2 + i] + med[3 + i]) / 2))
        assert lay["batch_per_worker"] == workers * r["setup"]["batch_per_worker"]
    assert t["quickstart_layout"] == "ddp" and t["quickstart_layout_meets_goal"] == (t["ratio_ddp_vs_plain"] >= 0.9)
    b = t["step_breakdown"]
    assert b["ms_per_step"] == pytest.approx(sum(b["ms_per_phase"].values()))
    assert set(b["ms_per_phase"]) == {"data", "forward", "host_sync", "backward", "optimizer", "ema"}
    assert all(v > 0 for v in b["ms_per_phase"].values())
    for sess in t["plain_sessions"].values():
        for s in sess:
            assert s["torch_threads"] == s["threads"]
    assert r["setup"]["threads"]["total"] == workers
    assert r["setup"]["global_batch"] == workers * r["setup"]["batch_per_worker"]
    assert r["setup"]["precision"] == "fp32"
    # the reverse stage in the quickstart's layout, against plain sessions of the same stage around it
    rev = r["reverse"]
    rmed = [statistics.median(s["window_samples_per_s"]) for s in rev["plain_sessions"][f"{workers}_threads"]]
    assert len(rmed) == 2
    assert rev["samples_per_s"]["ddp_ray"] == pytest.approx(statistics.median(rev["ray_run"]["window_samples_per_s"]))
    assert rev["ratio_ddp_vs_plain"] == pytest.approx(rev["samples_per_s"]["ddp_ray"] / statistics.fmean(rmed))
    assert rev["meets_goal"] == (rev["ratio_ddp_vs_plain"] >= 0.9)
    assert rev["step_breakdown"]["stage"] == "reverse" and rev["step_breakdown"]["ms_per_step"] > 0
    assert b["stage"] == "forward"

    m = r["memory"]
    z0, z3 = m["breakdown_per_rank"]["zero0"], m["breakdown_per_rank"]["zero3"]
    assert len(z0) == len(z3) == workers
    assert m["ratio_zero3_vs_zero0"] == pytest.approx(max(x["model_states"] for x in z3) /
                                                      max(x["model_states"] for x in z0))
    nbytes = 4 * m["params"]
    for rank0, rank3 in zip(z0, z3):
        assert rank0["model_states"] == sum(rank0[k] for k in ("params", "master_params", "grads",
                                                                "optimizer_states"))
        assert rank0["params"] == nbytes and rank0["grads"] == nbytes  # ZeRO-0: full copies
        assert rank0["optimizer_states"] >= 2 * nbytes  # two AdamW moments (+ step counters)
        assert rank3["params"] <= nbytes / workers + 4 * 64 * 1024  # the rank's partition (+ padding)
        assert rank3["optimizer_states"] < rank0["optimizer_states"] / workers * 1.05
    assert m["worker_threads"]["torch_threads"] == 1  # 1 CPU per Ray Train worker

    if torch.cuda.is_available():
        assert r["mfu"]["mfu"] is not None or "reason" in r["mfu"]
    else:
        assert r["mfu"]["mfu"] is None and "no CUDA" in r["mfu"]["reason"]


@pytest.mark.slow  # ~2 min: 3 Ray Train runs and 6 subprocesses; the figures come from `biflow bench train`
def test_bench_train_tiny_writes_json_with_ratios_from_measurements(ray_local, tmp_path):
    r = bench_train(tmp_path, preset="tiny", window=1, windows=2, log=lambda s: None)
    _check_results(r, tmp_path)


@pytest.mark.slow
def test_bench_train_full(ray_local, tmp_path):
    r = bench_train(tmp_path, preset="quickstart")
    _check_results(r, tmp_path)
    assert r["memory"]["params"] > 2_000_000  # states dominate
