"""The outputs of a search: ``trials.csv``/``trials.json``, ``best.yaml`` (the
best config, accepted by ``biflow train`` unchanged), ``best.json`` and
``metric-vs-params.png``."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from biflow.config import load_config, to_dict
from biflow.tune.spec import Plan, SearchSpec, is_number, set_dotted, stages_for
from biflow.tune.trial import plain, stage_config

Log = Callable[[str], None]



def _trial_rows(grid, spec: SearchSpec, plan: Plan) -> list[dict[str, Any]]:
    full_steps = stage_config(plan, plan.stages[-1], {}, "check", "x").train.steps
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        cfg = dict(result.config or {})
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "")
        value = metrics.get(spec.metric)
        if result.error is not None:
            status = "error"
        elif not metrics:
            status = "not run"
        elif spec.metric == "fid":
            status = "completed" if "fid" in metrics else "stopped early"
        else:
            done = metrics.get("stage") == plan.stages[-1] and metrics.get("step", 0) >= full_steps
            status = "completed" if done else "stopped early"
        prefix = f"{plan.name}-{trial_id}"
        row = {"trial_id": trial_id, "status": status,
               **{p.key: plain(cfg.get(p.key)) for p in plan.params},
               spec.metric: None if value is None else float(value),
               "stage": metrics.get("stage", ""), "step": metrics.get("step"),
               "reports": metrics.get("training_iteration"), "seconds": metrics.get("time_total_s"),
               "runs": ";".join(f"{plan.runs_storage}/{prefix}-{s}" for s in plan.stages),
               "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:300]}
        if "loss" in metrics and spec.metric != "loss":
            row["loss"] = float(metrics["loss"])
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best finished trial (an early-stopped trial's metric is from fewer steps)."""
    def finite(r):
        v = r.get(metric)
        return v is not None and math.isfinite(v)

    pool = [r for r in rows if r["status"] == "completed" and finite(r)] or [r for r in rows if finite(r)]
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda r: r[metric])


def best_configs(spec: SearchSpec, bases: dict[str, dict], plan: Plan, row: dict[str, Any]) -> dict[str, dict]:
    """stage -> experiment dict of the best trial, as `biflow train CONFIG` takes it."""
    params = {p.key: row[p.key] for p in plan.params}
    out: dict[str, dict] = {}
    for stage in plan.stages:
        data = copy.deepcopy(bases[stage])
        for p in plan.params:
            if stage in stages_for(p, plan.stages):
                set_dotted(data, p.key, params[p.key])
        data["stage"] = stage
        data["name"] = f"{spec.name}-best-{stage}"
        if stage == "reverse":
            # the frozen flow the trial was trained against (a search over flow.*: the trial's own)
            fwd = (f"{plan.runs_storage}/{plan.name}-{row['trial_id']}-forward" if "forward" in plan.stages
                   else plan.forward_checkpoint)
            data.setdefault("train", {})["forward_checkpoint"] = fwd
        out[stage] = to_dict(load_config(data))  # validated: what biflow train will read
    return out


def plot_results(rows: list[dict[str, Any]], plan: Plan, metric: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(plan.params)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red", "not run": "tab:gray"}
    for ax, p in zip(axes[0], plan.params):
        categorical = p.dist in ("choice", "grid") and not all(is_number(v) for v in p.args)
        for status, color in colors.items():
            pts = [(r[p.key], r[metric]) for r in rows if r["status"] == status and r.get(metric) is not None
                   and r.get(p.key) is not None]
            if not pts:
                continue
            xs = [([str(v) for v in p.args].index(str(x)) if categorical else x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], c=color, label=status, s=36, alpha=0.85, edgecolors="k",
                       linewidths=0.4)
        if categorical:
            ax.set_xticks(range(len(p.args)), [str(v) for v in p.args])
        if p.dist == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"{plan.name}: {metric} vs parameters ({len(rows)} trials; stopped early: last report)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(grid, spec: SearchSpec, bases: dict[str, dict], plan: Plan, out_dir: Path, seconds: float,
                  log: Log = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _trial_rows(grid, spec, plan)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    best = best_row(rows, spec.metric, spec.mode)
    summary: dict[str, Any] = {
        "name": spec.name, "stage": spec.stage, "metric": spec.metric, "mode": spec.mode, "search": spec.search,
        "trials": len(rows), "status": {s: sum(r["status"] == s for r in rows) for s in
                                        sorted({r["status"] for r in rows})},
        "seconds": seconds, "results": str(out_dir), "best": None,
    }
    values = [r[spec.metric] for r in rows if r.get(spec.metric) is not None and math.isfinite(r[spec.metric])]
    if values:
        summary["metric_range"] = [min(values), max(values)]
    if best is not None:
        configs = best_configs(spec, bases, plan, best)
        header = (f"# Best trial {best['trial_id']} of search {spec.name!r}: {spec.metric}={best[spec.metric]:.6g} "
                  f"({spec.mode}), {best['status']}.\n# Parameters: "
                  + ", ".join(f"{p.key}={best[p.key]}" for p in plan.params) + "\n")
        files = {}
        for stage, data in configs.items():
            fname = "best.yaml" if stage == plan.stages[-1] else f"best-{stage}.yaml"
            cmd = f"# Train it: biflow train {out_dir / fname}\n"
            (out_dir / fname).write_text(header + cmd + yaml.safe_dump(data, sort_keys=False))
            files[stage] = str(out_dir / fname)
        summary["best"] = {"trial_id": best["trial_id"], spec.metric: best[spec.metric], "status": best["status"],
                           "params": {p.key: best[p.key] for p in plan.params}, "configs": files,
                           "runs": best["runs"]}
    if plan.params and rows:
        summary["plot"] = str(plot_results(rows, plan, spec.metric, out_dir / "metric-vs-params.png"))
    (out_dir / "best.json").write_text(json.dumps(summary, indent=2, default=str))
    log(format_table(rows, plan, spec.metric))
    if best is not None:
        log(f"best: trial {best['trial_id']} {spec.metric}={best[spec.metric]:.4g} -> {summary['best']['configs']}")
    log(f"results: {out_dir} ({seconds:.0f} s); TensorBoard: tensorboard --logdir {plan.runs_storage}")
    return summary


def format_table(rows: list[dict[str, Any]], plan: Plan, metric: str) -> str:
    cols = ["trial_id", "status", *[p.key for p in plan.params], metric, "step"]
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
