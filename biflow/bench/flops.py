"""Model FLOPs of forward-flow training, GPU bf16 peaks, and measured MFU
(one process, the DDP engine at world size 1)."""

from __future__ import annotations

import time

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

    flow = TARFlow(cfg)
    dense = sum(p.numel() for n, p in flow.named_parameters()
                if not n.endswith("pos_embed") and ".label_embed." not in n)
    n_tok, layers = cfg.num_tokens, cfg.num_blocks * cfg.depth
    per_token = 6 * dense + 12 * layers * cfg.width * n_tok
    return {"dense_params": dense, "tokens_per_step": batch * n_tok, "attention_layers": layers,
            "flops_per_token": per_token, "flops_per_step": batch * n_tok * per_token,
            "formula": "B*N*(6*P_dense + 12*L*W*N)"}


def measure_mfu(cfg: FlowConfig, batch: int, steps: int = 20, warmup: int = 5, precision: str = "bf16",
                peak_flops: float | None = None, compile_model: bool = False, device: str | None = None) -> dict:
    """Forward-flow training speed in one process (the DDP engine at world size 1:
    AdamW, clipping, ``precision`` autocast) and its model-FLOP utilisation.

    Runs on any device; MFU needs ``peak_flops`` (looked up for known GPUs)."""
    from biflow.config import ExperimentConfig, OptimConfig, TrainConfig
    from biflow.losses import forward_loss
    from biflow.models import TARFlow
    from biflow.train.engine import build_engine

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    exp = ExperimentConfig(flow=cfg, optim=OptimConfig(warmup_steps=0),
                           train=TrainConfig(steps=steps + warmup, batch_size=batch, engine="ddp",
                                             precision=precision))
    torch.manual_seed(0)
    engine = build_engine(TARFlow(cfg), exp, dev)
    model = engine.model
    compiled = False
    if compile_model:
        try:
            model = torch.compile(engine.model)
            compiled = True
        except Exception:  # fall back to eager; recorded in the result
            model = engine.model
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev, generator=gen) * 2 - 1
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=dev, generator=gen) if cfg.num_classes else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        with engine.autocast():
            loss, _ = forward_loss(model, x, y, cfg, generator=gen)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    flops = flow_train_flops(cfg, batch)
    achieved = flops["flops_per_step"] / seconds
    return {"device": str(dev), "precision": engine.precision, "compiled": compiled, "batch": batch,
            "steps_timed": steps, "step_s": seconds, "samples_per_s": batch / seconds, **flops,
            "achieved_flops_per_s": achieved, "peak_flops_per_s": peak_flops,
            "mfu": achieved / peak_flops if peak_flops else None}



def embedding_params(cfg: FlowConfig) -> int:
    per_block = cfg.num_tokens * cfg.width + ((cfg.num_classes + 1) * cfg.width if cfg.num_classes > 0 else 0)
    return per_block * cfg.num_blocks


def mfu_section(mfu_flow: dict, mfu_batch: int, peak_tflops: float | None) -> dict:
    """bf16 training MFU of ``mfu_flow`` (FlowConfig fields, or a ``size`` name) on CUDA."""
    if not torch.cuda.is_available():
        return {"mfu": None, "reason": "no CUDA device: MFU is measured in bf16 on a GPU only (a CPU has no "
                                       "comparable bf16 peak); the FLOP formula is documented in "
                                       "flow_train_flops and unit-tested",
                "formula": flow_train_flops(FlowConfig(), 1)["formula"], "goal": 0.45}
    cfg = FlowConfig.from_size(mfu_flow["size"], **{k: v for k, v in mfu_flow.items() if k != "size"}) \
        if "size" in mfu_flow else FlowConfig(**mfu_flow)
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops * 1e12 if peak_tflops else gpu_bf16_peak(name)
    res = measure_mfu(cfg, mfu_batch, precision="bf16", peak_flops=peak, compile_model=True)
    res.update(device_name=name, goal=0.45)
    if peak is None:
        res["reason"] = f"unknown bf16 peak for {name!r}: pass --peak-tflops"
    else:
        res["meets_goal"] = res["mfu"] >= 0.45
    return res

