"""The forward-family comparison (``families:`` in a recipe, e.g. jobs/eval/families.yaml).

BiFlow learns the reverse model, so any flow can be the forward model. Per family row the
recipe trains that family's forward flow and a BiFlow reverse model against it (the row's
own job pair, under the recipe's shared overrides: the same data, workers and budgets), then
scores both samplers the same way:

- held-out bits/dim (dequantised) of the flow;
- ms/img of the exact inverse and of the 1-NFE reverse model at batch 1 and 16;
- FID and KID of both samplers against the same reference;
- the inversion PSNR (G's aligned x^0 against x~);
- for iterative inverses (residual flows) the fixed-point iterations per block (median,
  p95, max over blocks and batches).

It writes OUT/eval/results.json and, with ``report``, ``families.{md,json}`` there.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

Log = Callable[[str], None]


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def iteration_stats(flow, n_batches: int = 4, batch: int = 16, seed: int = 0) -> dict[str, float] | None:
    """Fixed-point iterations per block of an iterative inverse (None for exact inverses)."""
    cfg = flow.config
    counts: list[int] = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n_batches):
        z = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
        y = (torch.arange(batch) + i) % cfg.num_classes if cfg.num_classes else None
        flow.inverse(z, y)
        its = (flow.inverse_stats or {}).get("iterations")
        if not its:
            return None
        counts += list(its)
    a = np.asarray(counts, dtype=float)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "max": float(a.max()),
            "blocks": len(counts) // n_batches, "batches": n_batches, "batch": batch}


def run_families(recipe, out: Path, workers: int, overrides: list[str], ev: dict[str, Any],
                 timings: dict[str, float], t0: float, log: Log, train: Callable[[Any, str], None],
                 report: Path | None = None) -> dict[str, Any]:
    """Each family row: its forward flow, its reverse model, both scored (see the module docstring).
    ``train(cfg, label)`` trains one stage and records its timings (the recipe's); ``report``:
    the folder for families.{md,json}."""
    from biflow.evaluate import EvalOptions, evaluate, time_sampler
    from biflow.train.checkpoint import load_pair

    opts = EvalOptions(num_samples=ev["num_samples"], num_eval_images=ev["num_eval_images"],
                       num_reference=ev["num_reference"], guidance=list(ev["guidance"]),
                       batch_size=ev["batch_size"], timing_batch=ev["timing_batch"],
                       exact_annealed=ev["exact_annealed"], samplers=["biflow", "exact"])
    rows, results = [], {}
    for i, fam in enumerate(recipe.families):
        fwd, rev = recipe.stage_configs(out, workers, overrides, fam)
        log(f"[2/4] family {i + 1}/{len(recipe.families)} {fam.name}: forward flow ({fwd.flow.family}) {fwd.name}")
        train(fwd, f"forward_{fam.name}")
        log(f"[3/4] family {fam.name}: reverse model {rev.name}")
        train(rev, f"reverse_{fam.name}")
        log(f"[4/4] family {fam.name}: evaluation")
        res = evaluate(rev.name, out / "eval" / fam.name, opts, storage=rev.ray.storage, log=log)
        flow_l, rev_l = load_pair(rev.name, storage=rev.ray.storage)
        flow, g = flow_l.model, rev_l.model
        w = opts.guidance[0]
        ms = {f"{s}_b{b}": time_sampler(flow, g, s, w, b, reps=3) for s in ("biflow", "exact") for b in (1, 16)}
        iters = iteration_stats(flow)
        results[fam.name] = res
        b, e = res["samplers"][f"biflow@w={w:g}"], res["samplers"][f"exact@w={w:g}"]
        row = {"family": fam.name, "description": fam.description, "flow_family": flow_l.config.flow.family,
               "flow_params": _params(flow), "reverse_params": _params(g),
               "forward_steps": flow_l.step, "reverse_steps": rev_l.step,
               "forward_train_s": timings.get(f"forward_{fam.name}_train_s"),
               "bpd": res["bpd"], "bpd_dequantized": res["bpd_dequantized"],
               "inversion_psnr_db": res["inversion_psnr_db"], "denoise_psnr_db": res["recon_psnr_db"],
               "guidance": w, "fid_biflow": b["fid"], "kid_biflow": b["kid"], "kid_se_biflow": b["kid_se"],
               "fid_exact": e["fid"], "kid_exact": e["kid"], "kid_se_exact": e["kid_se"],
               "ms_per_image": ms, "speedup_b16": ms["exact_b16"] / ms["biflow_b16"],
               "speedup_b1": ms["exact_b1"] / ms["biflow_b1"], "fixed_point_iterations": iters}
        rows.append(row)
        log(f"{fam.name}: bpd {row['bpd_dequantized']:.3f} | FID biflow {b['fid']:.2f} vs exact {e['fid']:.2f} | "
            f"ms/img b16 {ms['biflow_b16']:.2f} vs {ms['exact_b16']:.2f} ({row['speedup_b16']:.1f}x)"
            + (f" | fixed-point iterations median {iters['median']:g}, p95 {iters['p95']:g}, max {iters['max']:g}"
               if iters else ""))
    timings["total_s"] = time.time() - t0
    first = next(iter(results.values()))
    summary = {"recipe": {"name": recipe.name, "description": recipe.description, "path": recipe.path,
                          "overrides": overrides},
               "num_samples": opts.num_samples, "num_reference": first.get("num_reference"), "rows": rows,
               "real_vs_real": first["real_vs_real"], "timings": timings, "machine": first["machine"],
               "goals": family_goals(rows)}
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "results.json").write_text(json.dumps(summary, indent=2))
    log(families_table(summary))
    if report is not None:
        write_report(summary, results, report, recipe.description or "Forward families")
        log(f"report: {report}")
    return summary


def write_report(summary: dict[str, Any], results: dict[str, dict[str, Any]], report: Path, title: str) -> None:
    """families.{md,json} in ``report``, with each family's sample grids copied to report/img/
    (``results``: evaluate()'s per family) and shown under the table, both samplers side by side."""
    report.mkdir(parents=True, exist_ok=True)
    (report / "families.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# {title}", "", families_table(summary), "",
             "Samples (one column per class; the same labels and noise for both samplers):", "",
             "| family | BiFlow 1-NFE | exact inverse |", "|---|:---:|:---:|"]
    for row in summary["rows"]:
        name, cells = row["family"], []
        for sampler in ("biflow", "exact"):
            source = Path(results[name]["samplers"][f"{sampler}@w={row['guidance']:g}"].get("grid") or "")
            if not source.is_file():
                cells.append("(no grid)")
                continue
            (report / "img").mkdir(exist_ok=True)
            target = report / "img" / f"{name}-{source.name}"
            shutil.copyfile(source, target)
            cells.append(f"![{name} {sampler}](img/{target.name})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (report / "families.md").write_text("\n".join(lines) + "\n")


def family_goals(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 24's goals: BiFlow's FID <= the exact inverse's for every family; the residual
    flow's 1-NFE sampler >= 20x faster than its fixed-point inverse at batch 16."""
    goals: dict[str, dict[str, Any]] = {}
    for r in rows:
        ratio = r["fid_biflow"] / max(r["fid_exact"], 1e-9)
        goals[f"{r['family']}: FID biflow / exact"] = {"value": ratio, "max": 1.0, "met": ratio <= 1.0}
        if r["flow_family"] == "resflow":
            goals[f"{r['family']}: speed-up at batch 16"] = {"value": r["speedup_b16"], "min": 20.0,
                                                             "met": r["speedup_b16"] >= 20.0}
    return goals


def families_table(summary: dict[str, Any]) -> str:
    n, ref = summary["num_samples"], summary.get("num_reference") or 0
    lines = [f"{n} samples per sampler vs {ref:,} held-out reference images; guidance w = "
             f"{summary['rows'][0]['guidance']:g}; {summary['machine'].get('cpu_count', '?')}-core "
             f"{summary['machine'].get('device', 'cpu')}.", "",
             "| family | flow params | steps (fwd/rev) | bpd (deq.) | FID biflow | FID exact | KID x1e3 biflow | "
             "KID x1e3 exact | ms/img biflow b1 / b16 | ms/img exact b1 / b16 | speed-up b16 | inversion PSNR dB | "
             "fixed-point iterations (median / p95 / max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        ms, it = r["ms_per_image"], r["fixed_point_iterations"]
        lines.append(
            f"| {r['family']} | {r['flow_params'] / 1e6:.2f}M | {r['forward_steps']} / {r['reverse_steps']} | "
            f"{r['bpd_dequantized']:.3f} | {r['fid_biflow']:.2f} | {r['fid_exact']:.2f} | "
            f"{1e3 * r['kid_biflow']:.2f} ± {1e3 * r['kid_se_biflow']:.2f} | "
            f"{1e3 * r['kid_exact']:.2f} ± {1e3 * r['kid_se_exact']:.2f} | {ms['biflow_b1']:.2f} / {ms['biflow_b16']:.2f} | "
            f"{ms['exact_b1']:.2f} / {ms['exact_b16']:.2f} | {r['speedup_b16']:.1f}x | {r['inversion_psnr_db']:.2f} | "
            + (f"{it['median']:g} / {it['p95']:g} / {it['max']:g}" if it else "exact") + " |")
    floor = summary["real_vs_real"]
    lines.append(f"\nReal vs real (the floor): FID {floor['fid']:.2f}, KID x1e3 {1e3 * floor['kid']:.2f}.")
    lines += ["", "| goal | measured | target | |", "|---|---|---|---|"]
    for name, g in summary["goals"].items():
        bound = f"≤ {g['max']:g}" if "max" in g else f"≥ {g['min']:g}"
        lines.append(f"| {name} | {g['value']:.2f} | {bound} | {'met' if g['met'] else '**missed**'} |")
    return "\n".join(lines)
