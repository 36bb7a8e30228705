"""``biflow bench sampling``: BiFlow 1-NFE against the exact inverse of the same
forward flow (KV-cached, +Tweedie, +guidance), and the cached decode against
naive prefix recompute. Writes ``sampling-PRESET.json`` and ``.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from biflow.config import FlowConfig, ReverseConfig
from biflow.errors import UserError
from biflow.timing import machine_info, pyplot, timeit, write_results


def bar_chart(path: str | Path, labels: list[str], values: list[float], ylabel: str, title: str,
              log: bool = False, lines: dict[str, float] | None = None) -> None:
    """A labelled bar per value; ``lines`` draws named horizontal references (a baseline, a floor)."""
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    bars = ax.bar(labels, values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    for (name, y), style in zip((lines or {}).items(), ("--", ":", "-.")):
        ax.axhline(y, color="#C44E52", linestyle=style, linewidth=1.2, label=f"{name} ({y:.3g})")
    if lines:
        ax.legend(fontsize=8, loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class SamplingPreset:
    flow: FlowConfig
    reverse: ReverseConfig
    batch_sizes: tuple[int, ...]
    dtype: str


PRESETS: dict[str, Callable[[], SamplingPreset]] = {
    # 64x64x3, patch 4 -> 256 tokens, 8 blocks: the CPU comparison of the issue
    "cpu-256tok": lambda: SamplingPreset(
        FlowConfig(image_size=64, channels=3, patch_size=4, width=256, depth=2, num_blocks=8, num_heads=4,
                   num_classes=10, noise_std=0.05),
        ReverseConfig(width=256, depth=16, num_heads=4, denoise_depth=1),
        (1, 16), "fp32"),
    # the paper's shape: ImageNet-256 VAE latents 32x32x4, patch 2, B/2 models
    "b2-latent": lambda: SamplingPreset(
        FlowConfig.from_size("B/2", image_size=32, channels=4, num_classes=1000, noise_std=0.05),
        ReverseConfig.from_size("B/2"),
        (1, 16, 256), "bf16"),
    # a seconds-long smoke run for tests
    "tiny": lambda: SamplingPreset(
        FlowConfig(image_size=16, channels=1, patch_size=4, width=32, depth=1, num_blocks=2, num_heads=2,
                   num_classes=10, noise_std=0.05),
        ReverseConfig(width=32, depth=2, num_heads=2, denoise_depth=1),
        (1, 4), "fp32"),
}


def bench_sampling(out_dir: str | Path = "runs/bench", preset: str = "cpu-256tok", guidance: float = 1.0,
                   batch_sizes: tuple[int, ...] | None = None, reps: int = 3, naive_blocks: int = 1,
                   log: Callable[[str], None] = print, compile_backend: str | None = "auto") -> dict:
    """Time BiFlow 1-NFE against the exact inverse (KV-cached, +Tweedie, with and
    without guidance) and the cached decode against naive prefix recompute.

    ``compile_backend`` also times BiFlow's single pass compiled (``auto``: inductor with
    CUDA graphs, ``mode="reduce-overhead"``, on a GPU; none on a CPU); a compile failure is
    recorded and the eager figure stands.

    The naive decode costs O(N^2) token passes per block, so it is timed on
    ``naive_blocks`` of the flow's (identical-cost) blocks and scaled to all of
    them, and compared with the cached decode timed on the same blocks.
    """
    from biflow.models import ReverseModel, build_flow
    from biflow.sampling import sample_biflow, sample_exact

    if preset not in PRESETS:
        raise UserError(f"unknown sampling preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (p.dtype == "bf16" and device == "cuda") else torch.float32
    torch.manual_seed(0)
    flow = build_flow(p.flow).to(device, dtype).eval()
    rev = ReverseModel(p.reverse, p.flow).to(device, dtype).eval()
    with torch.no_grad():  # non-trivial weights: the zero-init heads would make decoding look cheap
        for prm in list(flow.parameters()) + list(rev.parameters()):
            prm.add_(torch.randn_like(prm) * 0.02)
    fcfg = p.flow
    backend = ("inductor" if device == "cuda" else None) if compile_backend == "auto" else compile_backend
    rev_compiled, compile_error = None, None
    if backend:
        rev_compiled = torch.compile(rev, backend=backend, mode="reduce-overhead" if device == "cuda" else None)
    rows = []
    for b in batch_sizes or p.batch_sizes:
        g = torch.Generator(device).manual_seed(b)
        y = torch.randint(0, fcfg.num_classes, (b,), device=device, generator=g)
        z = torch.randn(b, fcfg.channels, fcfg.image_size, fcfg.image_size, device=device, dtype=dtype, generator=g)
        slow_reps = max(1, reps // 2) if b > 1 or device == "cuda" else reps
        t = {
            "biflow_1nfe": timeit(lambda: sample_biflow(rev, y, guidance=guidance, z=z), reps),
            "exact_kv": timeit(lambda: sample_exact(flow, y, z=z, tweedie=False), slow_reps),
            "exact_kv_tweedie": timeit(lambda: sample_exact(flow, y, z=z, tweedie=True), slow_reps),
            "exact_kv_cfg_tweedie": timeit(lambda: sample_exact(flow, y, z=z, guidance=guidance, tweedie=True),
                                           slow_reps),
        }
        if rev_compiled is not None:
            try:
                t["biflow_1nfe_compiled"] = timeit(lambda: sample_biflow(rev_compiled, y, guidance=guidance, z=z),
                                                   reps, warmup=3)
            except Exception as exc:  # noqa: BLE001 - the eager figure stands
                compile_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
                rev_compiled = None
                log(f"compiled BiFlow pass failed ({compile_error}); eager figures only")
        tokens = flow.to_tokens(z)
        k = min(naive_blocks, len(flow.blocks))
        blocks = list(flow.blocks)[:k]
        scale = len(flow.blocks) / k

        def decode(use_cache: bool):
            with torch.no_grad():
                for blk in blocks:
                    blk.inverse(tokens, y, use_cache=use_cache)

        t["decode_cached_scaled"] = timeit(lambda: decode(True), slow_reps) * scale
        t["decode_naive_scaled"] = timeit(lambda: decode(False), 1, warmup=0) * scale
        ms = {key: 1000 * v / b for key, v in t.items()}
        row = {
            "batch": b,
            "ms_per_image": ms,
            "images_per_s": {key: 1000.0 / v for key, v in ms.items() if not key.startswith("decode")},
            "speedup_biflow_vs_exact_kv": t["exact_kv"] / t["biflow_1nfe"],
            "speedup_biflow_vs_exact_tweedie": t["exact_kv_tweedie"] / t["biflow_1nfe"],
            "speedup_biflow_vs_exact_cfg_tweedie": t["exact_kv_cfg_tweedie"] / t["biflow_1nfe"],
            # the faster of the eager and the compiled single pass
            "speedup_best_biflow_vs_exact_cfg_tweedie": t["exact_kv_cfg_tweedie"] / min(
                t["biflow_1nfe"], t.get("biflow_1nfe_compiled", float("inf"))),
            "speedup_kv_cache_vs_naive": t["decode_naive_scaled"] / t["decode_cached_scaled"],
        }
        rows.append(row)
        log(f"batch {b:4d}: biflow {ms['biflow_1nfe']:.2f} ms/img | exact+cfg+tweedie "
            f"{ms['exact_kv_cfg_tweedie']:.1f} ms/img ({row['speedup_biflow_vs_exact_cfg_tweedie']:.1f}x) | "
            f"kv cache vs naive {row['speedup_kv_cache_vs_naive']:.1f}x")
    results = {
        "preset": preset,
        "dtype": str(dtype).replace("torch.", ""),
        "guidance": guidance,
        "flow": {"tokens": fcfg.num_tokens, "blocks": fcfg.num_blocks, "width": fcfg.width, "depth": fcfg.depth,
                 "image": [fcfg.channels, fcfg.image_size, fcfg.image_size],
                 "params": sum(q.numel() for q in flow.parameters())},
        "reverse": {"width": p.reverse.width, "depth": p.reverse.depth,
                    "params": sum(q.numel() for q in rev.parameters())},
        "naive_blocks_timed": naive_blocks,
        "compile_backend": backend, "compile_error": compile_error,
        "rows": rows,
    }
    path = write_results(out_dir, f"sampling-{preset}", results)
    labels, values = [], []
    for r in rows:
        for key in ("biflow_1nfe", "exact_kv", "exact_kv_tweedie", "exact_kv_cfg_tweedie"):
            labels.append(f"{key}\nB={r['batch']}")
            values.append(r["ms_per_image"][key])
    bar_chart(path.with_suffix(".png"), labels, values, "ms / image (log)",
              f"Sampling on {machine_info()['device_name'][:40]} ({preset})", log=True)
    log(f"wrote {path} and {path.with_suffix('.png')}")
    return results

