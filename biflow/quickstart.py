"""`biflow quickstart`: the whole system on one machine with a small real dataset.

1. Fashion-MNIST -> parquet shards in a local directory (Ray Data conversion).
2. Stage 1: the forward flow, 2 local Ray Train workers, DeepSpeed ZeRO-2.
3. Stage 2: the reverse model from the stage-1 checkpoint.
4. Evaluation: sample grids (BiFlow 1-NFE and the exact inverse), FID of
   both samplers, bits/dim, reconstruction PSNR, ms/img of both.

Every step is idempotent: rerunning resumes training from the latest
checkpoints and reuses the shards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from biflow.config import ExperimentConfig, load_config
from biflow.errors import UserError

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"


def job_config(name: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load ``jobs/<name>.yaml`` from the repository."""
    path = JOBS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"job config {path} not found: run from a clone of the biflow repository")
    return load_config(path, overrides)


def quickstart(out: str | Path = "runs/quickstart", workers: int = 2, overrides: list[str] | None = None,
               num_samples: int = 500, guidance: float = 1.0, log: Callable[[str], None] = print) -> dict:
    from biflow.data.shards import prepare_data
    from biflow.evaluate import EvalOptions, evaluate
    from biflow.train.launch import fit, init_ray

    t0 = time.time()
    out = Path(out).resolve()
    data_uri = str(out / "data")
    storage = str(out / "runs")
    timings = {}

    common = [f"data.uri={data_uri}", f"ray.storage={storage}", f"ray.workers={workers}", *(overrides or [])]
    fwd_cfg = job_config("quickstart-forward", common)
    init_ray(None, fwd_cfg)  # one local Ray sized for the trainers plus Ray Data, shared by every step

    log(f"[1/4] Fashion-MNIST -> parquet shards in {data_uri}")
    t = time.time()
    prepare_data("", data_uri, "fashion-mnist")
    timings["data_s"] = time.time() - t

    log("[2/4] stage 1: forward flow (TARFlow), DeepSpeed ZeRO-2 on local Ray workers")
    t = time.time()
    fit(fwd_cfg)
    timings["forward_s"] = time.time() - t

    log("[3/4] stage 2: reverse model (BiFlow) from the stage-1 checkpoint")
    t = time.time()
    rev_cfg = job_config("quickstart-reverse", common)
    fit(rev_cfg)
    timings["reverse_s"] = time.time() - t

    log("[4/4] evaluation: samples, FID, bits/dim, reconstruction, speed")
    t = time.time()
    opts = EvalOptions(num_samples=num_samples, num_eval_images=num_samples, guidance=[0.0, guidance],
                       batch_size=100, timing_batch=16)
    results = evaluate(rev_cfg.name, out / "eval", opts, storage=storage, log=log)
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    results["timings"] = timings
    (out / "eval" / "results.json").write_text(json.dumps(results, indent=2))
    log(summary_table(results, storage))
    return results


def summary_table(results: dict, storage: str) -> str:
    rows = [f"{'sampler':<22}{'FID':>9}{'ms/img':>10}"]
    for key, r in results["samplers"].items():
        rows.append(f"{key:<22}{r['fid']:>9.2f}{r['ms_per_image']:>10.2f}")
    t = results.get("timings", {})
    lines = [
        "",
        "biflow quickstart results (Fashion-MNIST, "
        f"{results['num_samples']} samples for FID)",
        "-" * 41,
        *rows,
        "-" * 41,
        f"bits/dim (test, sigma={results['noise_std']:g})   {results['bpd']:.3f}",
    ]
    if results.get("recon_psnr_db") is not None:
        lines.append(f"reconstruction PSNR G(F(x))  {results['recon_psnr_db']:.2f} dB")
    if t:
        lines.append(f"wall time {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f}s, forward {t['forward_s']:.0f}s, "
                     f"reverse {t['reverse_s']:.0f}s, eval {t['eval_s']:.0f}s)")
    grids = [r["grid"] for r in results["samplers"].values()]
    lines += [f"sample grids: {', '.join(grids)}",
              f"TensorBoard:  tensorboard --logdir {storage}"]
    return "\n".join(lines)
