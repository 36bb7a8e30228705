"""``biflow bench device`` (``make device-check``): the prepared GPU check.

One command, sized for <= 8 minutes on one H200 from a bare machine:

1. the CUDA-only tests (``pytest -m cuda``);
2. the smoke forward and reverse jobs trained for 50 steps on one GPU
   (bf16, NCCL, DeepSpeed ZeRO-2 under Ray Train);
3. ``bench sampling`` at the paper's B/2 shape on 4x32x32 latents at batch 256:
   BiFlow 1-NFE against the exact inverse + CFG + Tweedie;
4. the bf16 training MFU of the B/2 forward flow.

Every step is recorded (ok, failed with its error, or skipped with the reason:
a device machine may lack Ray or DeepSpeed), the goals are checked, and one
JSON named after the device goes to ``docs/``. ``--cpu`` runs the same steps at
tiny shapes on the CPU (CI runs it, so the check cannot rot); its figures mean
nothing about speed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from biflow.errors import UserError
from biflow.timing import machine_info

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"biflow_ms_per_image_max": 1.5, "speedup_vs_exact_cfg_min": 224.0, "forward_mfu_min": 0.40}
B2_FLOW = {"size": "B/2", "image_size": 32, "channels": 4, "num_classes": 1000}


def _tiny_image_folder(root: Path, n_per_class: int = 32, classes: int = 4, size: int = 28) -> Path:
    """A class-per-folder tree of small grayscale PNGs (no data set ships on a device machine)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            coarse = rng.random((4, 4)) * 0.5 + 0.5 * c / classes
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC).save(
                folder / f"{i:03d}.png")
    return root


def _cuda_tests(cpu: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail[0])}
    ok = proc.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")
    if not cpu and not counts.get("passed"):
        ok = False  # on a GPU the CUDA tests must actually run
    return {"ok": ok, "summary": tail[0], "counts": counts, "returncode": proc.returncode}


def _train_smoke(work: Path, steps: int, cpu: bool) -> dict[str, Any]:
    from biflow.config import load_config
    from biflow.data.shards import prepare_data
    from biflow.train.launch import fit

    shards = work / "shards"
    prepare_data(str(_tiny_image_folder(work / "images")), str(shards), "folder", image_size=28, channels=1,
                 progress=False)
    common = [f"data.uri={shards}", f"ray.storage={work / 'runs'}", f"train.steps={steps}", "train.log_every=10",
              f"train.checkpoint_every={steps}", "train.sample_every=0", "ray.workers=1", "ray.max_failures=0",
              "data.eval_split=train"]
    if cpu:
        common += ["ray.use_gpu=no", "train.batch_size=8"]
    else:
        common += ["ray.use_gpu=yes", "train.precision=bf16"]
    out: dict[str, Any] = {}
    for stage in ("forward", "reverse"):
        cfg = load_config(ROOT / "jobs" / f"smoke-{stage}.yaml", common)
        t0 = time.perf_counter()
        result = fit(cfg)
        m = result.metrics or {}
        out[stage] = {"seconds": time.perf_counter() - t0, "step": m.get("step"), "loss": m.get("loss"),
                      "samples_per_s": m.get("samples_per_s"), "engine": cfg.train.engine,
                      "zero_stage": cfg.train.zero_stage, "precision": "fp32" if cpu else "bf16",
                      "backend": "gloo" if cpu else "nccl"}
    out["ok"] = all(out[s]["step"] == steps for s in ("forward", "reverse"))
    return out


def _sampling(work: Path, cpu: bool) -> dict[str, Any]:
    from biflow.bench.sampling import bench_sampling

    preset, batch = ("tiny", 4) if cpu else ("b2-latent", 256)
    res = bench_sampling(work / "bench", preset=preset, batch_sizes=(batch,), reps=1 if cpu else 3, log=lambda m: None)
    row = res["rows"][0]
    ms = row["ms_per_image"]
    out = {"preset": preset, "batch": batch, "dtype": res["dtype"], "flow_params": res["flow"]["params"],
           "reverse_params": res["reverse"]["params"], "ms_per_image": ms,
           "speedup_vs_exact_cfg_tweedie": row["speedup_biflow_vs_exact_cfg_tweedie"],
           "speedup_kv_cache_vs_naive": row["speedup_kv_cache_vs_naive"], "ok": True}
    if not cpu:
        out["goals"] = {
            "biflow_ms_per_image": {"value": ms["biflow_1nfe"], "max": GOALS["biflow_ms_per_image_max"],
                                    "met": ms["biflow_1nfe"] <= GOALS["biflow_ms_per_image_max"]},
            "speedup_vs_exact_cfg_tweedie": {"value": row["speedup_biflow_vs_exact_cfg_tweedie"],
                                             "min": GOALS["speedup_vs_exact_cfg_min"],
                                             "met": row["speedup_biflow_vs_exact_cfg_tweedie"]
                                             >= GOALS["speedup_vs_exact_cfg_min"]}}
    return out


def _mfu(cpu: bool) -> dict[str, Any]:
    from biflow.bench.flops import measure_mfu, mfu_section
    from biflow.config import FlowConfig

    if cpu:  # the same code path at a tiny shape; a CPU has no comparable bf16 peak
        cfg = FlowConfig(image_size=16, channels=4, patch_size=2, width=32, depth=1, num_blocks=2, num_heads=2,
                         num_classes=10)
        res = measure_mfu(cfg, 8, steps=2, warmup=1, precision="fp32")
        return {**res, "ok": res["step_s"] > 0}
    res = mfu_section(B2_FLOW, 256, None)
    res["goal"] = GOALS["forward_mfu_min"]
    if res.get("mfu") is not None:
        res["meets_goal"] = res["mfu"] >= GOALS["forward_mfu_min"]
    return {**res, "ok": res.get("mfu") is not None}


def device_check(out_dir: str | Path = ROOT / "docs", cpu: bool = False, steps: int | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    if not cpu and not torch.cuda.is_available():
        raise UserError("no CUDA device here: `biflow bench device --cpu` runs the dry mode at tiny shapes")
    steps = steps or (3 if cpu else 50)
    info = machine_info()
    results: dict[str, Any] = {"benchmark": "device-check", "mode": "cpu-dry" if cpu else "gpu", "machine": info,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "goals": GOALS, "steps": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="biflow-device-check-") as tmp:
        work = Path(tmp)
        plan: list[tuple[str, Callable[[], dict[str, Any]], tuple[str, ...]]] = [
            ("cuda_tests", lambda: _cuda_tests(cpu), ("pytest",)),
            ("train_smoke", lambda: _train_smoke(work, steps, cpu), ("ray", "deepspeed")),
            ("sampling_b2", lambda: _sampling(work, cpu), ()),
            ("forward_mfu", lambda: _mfu(cpu), ()),
        ]
        for name, fn, needs in plan:
            missing = [m for m in needs if _missing(m)]
            t0 = time.perf_counter()
            if missing:
                entry: dict[str, Any] = {"status": "skipped", "reason": f"not installed here: {', '.join(missing)}"}
            else:
                try:
                    entry = fn()
                    entry["status"] = "ok" if entry.pop("ok", True) else "failed"
                except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others
                    entry = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:500]}"}
            entry["seconds"] = time.perf_counter() - t0
            results["steps"][name] = entry
            log(f"[device-check] {name}: {entry['status']} ({entry['seconds']:.1f} s)"
                + (f" - {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else ""))
    results["seconds"] = time.perf_counter() - t_all
    slug = "cpu-dry" if cpu else re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"device-check-{slug}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    log(f"[device-check] wrote {path} ({results['seconds']:.0f} s)")
    return results


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry mode at tiny shapes on the CPU")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="directory for device-check-<device>.json")
    parser.add_argument("--steps", type=int, default=0, help="training steps per smoke stage (default 50; --cpu 3)")
    args = parser.parse_args(argv)
    results = device_check(args.out, cpu=args.cpu, steps=args.steps or None)
    sys.exit(0 if all(s["status"] != "failed" for s in results["steps"].values()) else 1)


if __name__ == "__main__":
    main()
