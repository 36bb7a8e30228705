"""Model FLOPs of forward-flow training (a formula, checked against torch's FLOP
counter on the meta device), GPU bf16 peaks, and measured MFU on the training
path (one process: the DeepSpeed ZeRO-2 engine at world size 1, or DDP)."""

from __future__ import annotations

import time
from typing import Any

import torch

from biflow.config import FlowConfig


# bf16 dense tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name()
GPU_BF16_PEAK: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.4e12),
    (("H100", "PCIE"), 756.0e12),
    (("H100",), 989.4e12),  # SXM / HBM3
    (("A100",), 312.0e12),
    (("L40S",), 362.05e12),
    (("L4",), 121.0e12),
]


def gpu_bf16_peak(device_name: str) -> float | None:
    name = device_name.upper()
    for keys, peak in GPU_BF16_PEAK:
        if all(k in name for k in keys):
            return peak
    return None


def flow_train_flops(cfg: FlowConfig, batch: int) -> dict:
    """Model FLOPs of one forward-flow training step (forward + backward), PaLM-style.

    Every one of the ``B * N`` tokens of a batch (N = ``cfg.num_tokens``) passes
    through every flow block, so with P the dense parameters of all blocks
    (everything except the position-embedding and label-embedding tables, which
    are lookups) and L = ``num_blocks * depth`` attention layers of width W::

        flops = B * N * (6 * P + 12 * L * W * N)

    ``6 * P`` per token is 2 FLOPs per multiply-add times 3 (forward, and the
    backward's input and weight gradients). ``12 * L * W * N`` per token is the
    attention scores ``Q K^T`` and ``A V`` (2 * 2 * W * N per token and layer),
    times 3 for training. Causal attention is counted in full, as in PaLM's MFU;
    elementwise work (softmax, GELU, norms, the affine coupling) is not counted.
    """
    from biflow.models import TARFlow

    with torch.device("meta"):  # shapes only: XL/2 costs no memory
        flow = TARFlow(cfg)
    dense = sum(p.numel() for n, p in flow.named_parameters()
                if not n.endswith("pos_embed") and ".label_embed." not in n)
    n_tok, layers = cfg.num_tokens, cfg.num_blocks * cfg.depth
    per_token = 6 * dense + 12 * layers * cfg.width * n_tok
    return {"dense_params": dense, "tokens_per_step": batch * n_tok, "attention_layers": layers,
            "flops_per_token": per_token, "flops_per_step": batch * n_tok * per_token,
            "formula": "B*N*(6*P_dense + 12*L*W*N)"}


def measure_mfu(cfg: FlowConfig, batch: int, steps: int = 20, warmup: int = 5, precision: str = "bf16",
                peak_flops: float | None = None, compile_model: bool = False, device: str | None = None,
                engine: str = "deepspeed", zero_stage: int = 2, compile_backend: str = "inductor") -> dict:
    """Forward-flow training speed in one process, on the path training takes: the
    engine the jobs use (DeepSpeed ZeRO-2 by default, world size 1; ``engine="ddp"``
    is the plain one), AdamW, clipping, ``precision``; and its model-FLOP utilisation.

    ``compile_model`` compiles the module (:func:`biflow.train.engine.compile_module`);
    a compile failure at the first step falls back to eager and is recorded
    (``compile_error``). Runs on any device; MFU needs ``peak_flops``."""
    from biflow.config import ExperimentConfig, OptimConfig, TrainConfig
    from biflow.losses import forward_loss
    from biflow.models import TARFlow
    from biflow.train.engine import build_engine, compile_module, first_call, single_process_group

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    exp = ExperimentConfig(flow=cfg, optim=OptimConfig(warmup_steps=0),
                           train=TrainConfig(steps=steps + warmup, batch_size=batch, engine=engine,
                                             zero_stage=zero_stage, precision=precision))
    torch.manual_seed(0)
    module = TARFlow(cfg)
    if compile_model:
        compile_module(module, compile_backend)
    with single_process_group(dev):
        eng = build_engine(module, exp, dev)
        gen = torch.Generator(dev).manual_seed(0)
        x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev, generator=gen) * 2 - 1
        x = x.to(eng.input_dtype)
        y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=dev, generator=gen) if cfg.num_classes else None
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def step() -> None:
            with eng.autocast():
                loss, _ = forward_loss(eng.model, x, y, cfg, generator=gen)
            eng.backward(loss)
            eng.step()

        t_first = time.perf_counter()
        compile_error = first_call(module, step)  # compiles here; falls back to eager on failure
        sync()
        first_s = time.perf_counter() - t_first
        for _ in range(warmup - 1):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = (time.perf_counter() - t0) / steps
        precision_used = eng.precision
    flops = flow_train_flops(cfg, batch)
    achieved = flops["flops_per_step"] / seconds
    return {"device": str(dev), "engine": engine, "zero_stage": zero_stage if engine == "deepspeed" else None,
            "precision": precision_used, "compiled": compile_model and compile_error is None,
            "compile_backend": compile_backend if compile_model else None,
            "compile_error": compile_error, "first_step_s": first_s, "batch": batch,
            "steps_timed": steps, "step_s": seconds, "samples_per_s": batch / seconds, **flops,
            "achieved_flops_per_s": achieved, "peak_flops_per_s": peak_flops,
            "mfu": achieved / peak_flops if peak_flops else None}


def counted_train_flops(cfg: FlowConfig, batch: int) -> int:
    """FLOPs of one forward-flow training step (forward + backward of the NLL) as
    ``torch.utils.flop_counter`` counts them, on the meta device (no memory, no time):
    the check on :func:`flow_train_flops`'s formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from biflow.losses import nll_per_dim
    from biflow.models import TARFlow

    with torch.device("meta"):
        flow = TARFlow(cfg)
        x = torch.empty(batch, cfg.channels, cfg.image_size, cfg.image_size)
        y = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None
    counter = FlopCounterMode(display=False)
    with counter:
        nll_per_dim(flow(x, y)).mean().backward()
    return int(counter.get_total_flops())


def embedding_params(cfg: FlowConfig) -> int:
    per_block = cfg.num_tokens * cfg.width + ((cfg.num_classes + 1) * cfg.width if cfg.num_classes > 0 else 0)
    return per_block * cfg.num_blocks


def mfu_runs(cfg: FlowConfig, batch: int, **kwargs: Any) -> dict[str, dict]:
    """:func:`measure_mfu` eager and compiled, in one process group (DeepSpeed keeps the
    group it first saw for the life of the process)."""
    from biflow.train.engine import single_process_group

    dev = torch.device(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    with single_process_group(dev):
        return {mode: measure_mfu(cfg, batch, compile_model=mode == "compiled", **kwargs)
                for mode in ("eager", "compiled")}


MFU_GOAL = 0.45  # issue 21: forward-flow B/2 training MFU on one H200, bf16, on the training path


def mfu_section(mfu_flow: dict, mfu_batch: int, peak_tflops: float | None, steps: int = 20,
                warmup: int = 5) -> dict:
    """bf16 training MFU of ``mfu_flow`` (FlowConfig fields, or a ``size`` name) on CUDA, on
    the path training takes (DeepSpeed ZeRO-2, bf16), eager and compiled; ``mfu`` is the better."""
    if not torch.cuda.is_available():
        return {"mfu": None, "reason": "no CUDA device: MFU is measured in bf16 on a GPU only (a CPU has no "
                                       "comparable bf16 peak); the FLOP formula is checked against torch's "
                                       "FLOP counter (counted_train_flops)",
                "formula": flow_train_flops(FlowConfig(), 1)["formula"], "goal": MFU_GOAL}
    cfg = FlowConfig.from_size(mfu_flow["size"], **{k: v for k, v in mfu_flow.items() if k != "size"}) \
        if "size" in mfu_flow else FlowConfig(**mfu_flow)
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops * 1e12 if peak_tflops else gpu_bf16_peak(name)
    runs = mfu_runs(cfg, mfu_batch, steps=steps, warmup=warmup, precision="bf16", peak_flops=peak)
    best = max(runs.values(), key=lambda r: r["samples_per_s"])
    res = {**best, "runs": runs, "device_name": name, "goal": MFU_GOAL}
    if peak is None:
        res["reason"] = f"unknown bf16 peak for {name!r}: pass --peak-tflops"
    else:
        res["meets_goal"] = res["mfu"] >= MFU_GOAL
    return res
