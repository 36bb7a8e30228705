"""Recipes: dataset -> forward flow -> reverse model -> evaluation, in one YAML.

A recipe names two job YAMLs (stage 1 and stage 2, with ``--set``-style
overrides), the dataset to shard, the evaluation to run and, optionally, the
goals the results must meet. ``biflow quickstart`` runs ``jobs/eval/quickstart.yaml``;
the Fashion-MNIST quality run is ``biflow recipe jobs/eval/fashion-mnist.yaml``.

Every step is idempotent: rerunning resumes training from the latest
checkpoints and reuses the shards. Results go to ``OUT/eval/results.json``
with the goals checked (``goals`` section) and the wall time of every step;
the trained pair is exported to ``OUT/model`` (:mod:`biflow.pretrained`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from biflow.config import ConfigError, ExperimentConfig, apply_overrides, from_dict, load_config, read_yaml
from biflow.errors import UserError

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
Log = Callable[[str], None]


@dataclass
class DatasetSpec:
    format: Literal["fashion-mnist", "imagenet", "folder"] = "fashion-mnist"
    source: str = ""  # "" = the format's default location (Debian's Fashion-MNIST)
    image_size: int = 0  # 0 = the format's native size
    limit: int = 0  # records per split (0 = all): a class-mixed prefix, for toy runs


@dataclass
class StageSpec:
    job: str = ""  # job YAML, relative to the recipe file
    set: list[str] = field(default_factory=list)  # overrides, as with --set


@dataclass
class EvalSpec:
    num_samples: int = 500  # samples per sampler and guidance for FID and KID
    num_reference: int = 10_000  # held-out images of the FID/KID reference (cached); 0 = the whole split
    num_eval_images: int = 500  # held-out images for bpd and reconstruction PSNR
    guidance: list[float] = field(default_factory=lambda: [0.0, 1.0])
    batch_size: int = 100
    timing_batch: int = 16
    exact_annealed: bool = False  # the exact sampler ramps its guidance over the decode (ml-tarflow)


@dataclass
class Goals:
    fid_ratio_max: float = 0.0  # BiFlow FID / exact-inverse FID at every guidance; 0 = no goal
    kid_agrees: bool = False  # with fid_ratio_max: BiFlow's KID is below the exact inverse's too
    kid_ratio_max: float = 0.0  # BiFlow KID / exact-inverse KID at every guidance; 0 = no goal
    recon_psnr_min_db: float = 0.0  # PSNR of G(F(x~)) vs x; 0 = no goal
    biflow_fid_max: float = 0.0  # BiFlow FID at guidance biflow_fid_max_at; 0 = no goal
    biflow_fid_max_at: float = 1.0
    total_time_max_s: float = 0.0  # the recipe's wall time, data to evaluation; 0 = no goal


@dataclass
class AblationSpec:
    """One reverse run of an ablation: the recipe's reverse job with ``set`` on top, scored with
    ``sampler`` (biflow: 1 NFE with training-time CFG; biflow-cfg2: inference-time CFG, 2 NFE)."""

    name: str = ""
    description: str = ""
    set: list[str] = field(default_factory=list)
    # overrides of the forward job for this row: the row then trains its own forward flow (same
    # budget) and its reverse model inverts that one (e.g. flow.clip=0 for "no norm control")
    forward_set: list[str] = field(default_factory=list)
    sampler: Literal["biflow", "biflow-cfg2"] = "biflow"
    paper: str = ""  # the paper's FIDs for the same change, "ablated vs its baseline" (B/2 ImageNet-256)


@dataclass
class FamilySpec:
    """One row of a forward-family comparison: its own forward job and the reverse job that
    inverts it (paths relative to the recipe), trained under the recipe's shared overrides."""

    name: str = ""
    description: str = ""
    forward: StageSpec = field(default_factory=StageSpec)
    reverse: StageSpec = field(default_factory=StageSpec)


@dataclass
class Recipe:
    name: str = "recipe"
    description: str = ""
    # Ray Train workers per stage; 0 = auto (:func:`auto_layout`): on a local Ray with at most
    # SMALL_MACHINE_CPUS cores, one worker with every core, else the job files' own workers
    workers: int = 0
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    forward: StageSpec = field(default_factory=StageSpec)
    reverse: StageSpec = field(default_factory=StageSpec)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    goals: Goals = field(default_factory=Goals)
    # reverse variants on the same forward flow and budget (the first is usually the full model);
    # with ablations the recipe trains each, scores BiFlow only, and writes a table and chart
    ablations: list[AblationSpec] = field(default_factory=list)
    # forward families (biflow.families): per row a forward flow and its reverse model, both samplers
    # scored; writes families.{md,json} to ``report``
    families: list[FamilySpec] = field(default_factory=list)
    # also write the results here (relative to the repo root): results.{json,md} and the sample grids,
    # or with ablations ablation.{md,png,json}; "" = only OUT/eval
    report: str = ""
    path: str = ""  # where it was loaded from (set by load_recipe)

    def stage_configs(self, out: Path, workers: int, overrides: list[str],
                      family: FamilySpec | None = None) -> tuple[ExperimentConfig, ExperimentConfig]:
        """(forward, reverse) job configs with the recipe's and the caller's overrides,
        reading and writing under ``out``; run names derive from the recipe's name (and the
        ``family`` row's, whose own jobs replace the recipe's). ``workers`` 0 picks the layout
        with :func:`auto_layout`."""
        base = Path(self.path).parent if self.path else Path()
        prefix = f"{self.name}-{family.name}" if family else self.name
        configs = []
        for stage in ("forward", "reverse"):
            spec: StageSpec = getattr(family or self, stage)
            if workers:
                layout = [f"ray.workers={workers}"]
            else:
                layout = auto_layout(load_config(base / spec.job, [*spec.set, *overrides]))
            fixed = [f"name={prefix}-{stage}", f"stage={stage}", f"data.uri={out / 'data'}",
                     f"ray.storage={out / 'runs'}", *layout]
            if stage == "reverse":
                fixed.append(f"train.forward_checkpoint={prefix}-forward")
            configs.append(load_config(base / spec.job, [*spec.set, *fixed, *overrides]))
        fwd, rev = configs
        rev.flow = fwd.flow  # the flow G inverts is stage 1's (training reads it from its checkpoint)
        return fwd, rev

    def stage_config(self, stage: str, out: Path, workers: int, overrides: list[str]) -> ExperimentConfig:
        """The job config of one stage (see :meth:`stage_configs`)."""
        return self.stage_configs(out, workers, overrides)[("forward", "reverse").index(stage)]


SMALL_MACHINE_CPUS = 4


def auto_layout(job: ExperimentConfig, cpus: int | None = None) -> list[str]:
    """Overrides that pick the fastest training layout for ``job`` on this machine.

    On a local Ray (no ``ray.address`` or RAY_ADDRESS) with at most ``SMALL_MACHINE_CPUS``
    cores: the job's workers at one CPU each under the plain-PyTorch engine (DDP). ZeRO
    partitions nothing worth having at the quickstart's 1-2M parameters, and DeepSpeed
    costs a one-time ~80 s JIT build of its CPU comm op on a fresh machine. Measured on the
    2-core machine (issue 20, quickstart forward flow, global batch 64): streaming the real
    shards, 2 workers x 1 core DDP ran 310 img/s against 259 for 1 worker x 2 cores; from
    memory (``biflow bench train``) 322 vs 253, and DeepSpeed ZeRO-2 at 2 x 1 282. These
    models are too small for two threads to share one process well. Anywhere else: the
    job's own workers and engine."""
    cpus = cpus or os.cpu_count() or 1
    if job.ray.address or os.environ.get("RAY_ADDRESS") or cpus > SMALL_MACHINE_CPUS:
        return [f"ray.workers={job.ray.workers}"]
    workers = max(1, min(job.ray.workers, cpus))
    return [f"ray.workers={workers}", "ray.cpus_per_worker=1", "train.engine=ddp",
            f"train.batch_size={job.train.batch_size * job.ray.workers // workers}"]


RECIPE_PREFIX = "recipe."


def split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """``--set`` items into (recipe overrides, job overrides): ``recipe.evaluate.num_samples=64``
    sets a recipe field; anything else (``train.steps=10``) overrides both stage jobs."""
    own = [o[len(RECIPE_PREFIX):] for o in overrides or [] if o.startswith(RECIPE_PREFIX)]
    return own, [o for o in overrides or [] if not o.startswith(RECIPE_PREFIX)]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe YAML, strictly checked, with ``overrides`` (KEY=VALUE, recipe keys); its job files must exist."""
    data = apply_overrides(read_yaml(path, "recipe"), overrides)
    recipe: Recipe = from_dict(Recipe, {**data, "path": str(Path(path).resolve())})
    for stage in ("forward", "reverse"):
        spec = getattr(recipe, stage)
        if not spec.job:
            raise ConfigError(f"recipe {path}: {stage}.job is empty (a job YAML such as ../quickstart-forward.yaml)")
        job = Path(recipe.path).parent / spec.job
        if not job.is_file():
            raise ConfigError(f"recipe {path}: {stage}.job={spec.job!r} not found (looked for {job})")
    if recipe.workers < 0:
        raise ConfigError(f"recipe {path}: workers must be >= 1, or 0 for the automatic layout; got {recipe.workers}")
    for kind, rows in (("ablations", recipe.ablations), ("families", recipe.families)):
        names = [a.name for a in rows]
        if any(not n or not n.replace("-", "").replace("_", "").isalnum() for n in names) or \
                len(set(names)) != len(names):
            raise ConfigError(f"recipe {path}: {kind} need distinct names of letters, digits, - and _; got {names}")
    for row in recipe.families:
        for stage in ("forward", "reverse"):
            job = Path(recipe.path).parent / getattr(row, stage).job
            if not job.is_file():
                raise ConfigError(f"recipe {path}: families[{row.name}].{stage}.job={getattr(row, stage).job!r} "
                                  f"not found (looked for {job})")
        recipe.stage_configs(Path("/nonexistent"), 1, [], row)  # every row's jobs load and agree, before any run
    return recipe


def builtin_recipe(name: str) -> Recipe:
    """``jobs/<name>.yaml`` from the repository (e.g. ``quickstart``, ``eval/fashion-mnist``)."""
    path = JOBS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"recipe {path} not found: run from a clone of the biflow repository")
    return load_recipe(path)


def run_recipe(recipe: Recipe, out: str | Path | None = None, workers: int | None = None,
               overrides: list[str] | None = None, evaluate_opts: dict[str, Any] | None = None,
               log: Log = print) -> dict[str, Any]:
    """Shards, stage 1, stage 2, evaluation; returns (and writes) the results."""
    from biflow.data.shards import prepare_data
    from biflow.evaluate import EvalOptions, evaluate
    from biflow.train.launch import fit, init_ray

    t0 = time.time()
    out = Path(out or f"runs/{recipe.name}").resolve()
    workers = workers or recipe.workers
    overrides = list(overrides or [])
    fwd_cfg, rev_cfg = recipe.stage_configs(out, workers, overrides)  # both checked before anything runs
    ev = {**recipe.evaluate.__dict__, **(evaluate_opts or {})}
    init_ray(None, fwd_cfg)  # one local Ray sized for the trainers plus Ray Data, shared by every step
    timings: dict[str, float] = {}

    ds = recipe.dataset
    log(f"[1/4] {ds.format} -> parquet shards in {fwd_cfg.data.uri}")
    t = time.time()
    prepare_data(ds.source, fwd_cfg.data.uri, ds.format, image_size=ds.image_size, limit=ds.limit)
    timings["data_s"] = time.time() - t
    if recipe.families:
        from biflow.families import run_families

        def train(cfg: ExperimentConfig, label: str) -> None:
            t = time.time()
            stage_timings(timings, label, fit(cfg), time.time() - t)

        return run_families(recipe, out, workers, overrides, ev, timings, t0, log, train,
                            JOBS_DIR.parent / recipe.report if recipe.report else None)

    log(f"[2/4] stage 1: forward flow (TARFlow) {fwd_cfg.name}, {layout_text(fwd_cfg)}")
    t = time.time()
    stage_timings(timings, "forward", fit(fwd_cfg), time.time() - t)

    opts = EvalOptions(num_samples=ev["num_samples"], num_eval_images=ev["num_eval_images"],
                       num_reference=ev["num_reference"], guidance=list(ev["guidance"]),
                       batch_size=ev["batch_size"], timing_batch=ev["timing_batch"],
                       exact_annealed=ev["exact_annealed"])
    if recipe.ablations:
        return run_ablations(recipe, out, workers, overrides, rev_cfg, opts, timings, t0, log)

    log(f"[3/4] stage 2: reverse model (BiFlow) {rev_cfg.name} from the stage-1 checkpoint, {layout_text(rev_cfg)}")
    t = time.time()
    stage_timings(timings, "reverse", fit(rev_cfg), time.time() - t)

    log("[4/4] evaluation: samples, FID, bits/dim, reconstruction, speed")
    t = time.time()
    results = evaluate(rev_cfg.name, out / "eval", opts, storage=rev_cfg.ray.storage, log=log)
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    results["recipe"] = {"name": recipe.name, "path": recipe.path, "workers": rev_cfg.ray.workers,
                         "cpus_per_worker": rev_cfg.ray.cpus_per_worker, "engine": rev_cfg.train.engine,
                         "overrides": overrides,
                         "forward_steps": fwd_cfg.train.steps, "reverse_steps": rev_cfg.train.steps}
    results["timings"] = timings
    results["goals"] = check_goals(results, recipe.goals)
    (out / "eval" / "results.json").write_text(json.dumps(results, indent=2))
    log(summary_table(results, rev_cfg.ray.storage, recipe))
    from biflow.pretrained import export

    # the trained pair as a model to hand over, its card carrying these figures
    model = export(rev_cfg.name, out / "model", rev_cfg.ray.storage, rev_cfg.ray.storage_endpoint,
                   results=out / "eval" / "results.json", log=log)
    log(f"sample it: biflow sample {model}   or in Python: BiFlow.from_pretrained({str(model)!r}).sample(16)")
    if recipe.report:
        report = write_results_report(results, recipe, JOBS_DIR.parent / recipe.report)
        log(f"report: {report}")
    return results


def layout_text(cfg: ExperimentConfig) -> str:
    engine = f"DeepSpeed ZeRO-{cfg.train.zero_stage}" if cfg.train.engine == "deepspeed" else "plain PyTorch (DDP)"
    return (f"{cfg.ray.workers} Ray Train worker{'s' if cfg.ray.workers > 1 else ''} x {cfg.ray.cpus_per_worker:g} "
            f"CPU, {engine}, batch {cfg.train.batch_size} per worker")


def stage_timings(timings: dict[str, float], stage: str, result: Any, wall_s: float) -> None:
    """A stage's wall time, split into its training loop (``train_seconds`` of its last report:
    summed over resumes, from the first batch) and the rest: Ray Train's controller and worker
    group, engine set-up, Ray Data's start, the first batch and the final checkpoint."""
    train_s = float((getattr(result, "metrics", None) or {}).get("train_seconds", 0.0))
    timings[f"{stage}_s"] = wall_s
    timings[f"{stage}_train_s"] = train_s
    timings[f"{stage}_overhead_s"] = max(0.0, wall_s - train_s)


def run_ablations(recipe: Recipe, out: Path, workers: int, overrides: list[str], rev_cfg: ExperimentConfig,
                  opts: Any, timings: dict[str, float], t0: float, log: Log) -> dict[str, Any]:
    """Each ablation: a reverse run on the same forward flow and budget, scored by its sampler;
    the exact inverse once, as the baseline. Writes OUT/eval/results.json (and ``report``)."""
    import dataclasses

    from biflow.evaluate import evaluate
    from biflow.train.launch import fit

    rows, results = [], {}
    exact = evaluate(rev_cfg.name.replace("-reverse", "-forward"), out / "eval" / "exact",
                     dataclasses.replace(opts, samplers=["exact"]), storage=rev_cfg.ray.storage, log=log)
    fwd_cfg = recipe.stage_config("forward", out, workers, overrides)
    for i, ab in enumerate(recipe.ablations):
        own = []
        if ab.forward_set:  # this row's own forward flow, on the shared flow's budget
            fwd = apply_overrides_cfg(fwd_cfg, [*ab.forward_set, f"name={recipe.name}-forward-{ab.name}"])
            log(f"[2/4] ablation {ab.name}: its own forward flow {fwd.name} ({', '.join(ab.forward_set)})")
            t = time.time()
            stage_timings(timings, f"forward_{ab.name}", fit(fwd), time.time() - t)
            own = [f"train.forward_checkpoint={fwd.name}"]
        cfg = apply_overrides_cfg(rev_cfg, [*ab.set, *own, f"name={recipe.name}-reverse-{ab.name}"])
        log(f"[3/4] ablation {i + 1}/{len(recipe.ablations)} {ab.name}: {ab.description or ab.set}")
        t = time.time()
        fit(cfg)
        timings[f"reverse_{ab.name}_s"] = time.time() - t
        res = evaluate(cfg.name, out / "eval" / ab.name, dataclasses.replace(opts, samplers=[ab.sampler]),
                       storage=cfg.ray.storage, log=log)
        results[ab.name] = res
        for w in opts.guidance:
            r = res["samplers"][f"{ab.sampler}@w={w:g}"]
            rows.append({"ablation": ab.name, "description": ab.description, "sampler": ab.sampler,
                         "nfe": nfe(ab.sampler, w), "guidance": w, "fid": r["fid"],
                         "kid": r["kid"], "kid_se": r["kid_se"], "recon_psnr_db": res["recon_psnr_db"],
                         "paper": ab.paper})
    timings["total_s"] = time.time() - t0
    summary = {"recipe": {"name": recipe.name, "description": recipe.description, "path": recipe.path,
                          "workers": rev_cfg.ray.workers, "overrides": overrides,
                          "reverse_steps": rev_cfg.train.steps},
               "num_samples": opts.num_samples, "rows": rows, "exact": exact["samplers"],
               "real_vs_real": exact["real_vs_real"], "timings": timings, "machine": exact["machine"], "goals": {}}
    (out / "eval" / "results.json").write_text(json.dumps(summary, indent=2))
    table = ablation_table(summary)
    log(table)
    if recipe.report:
        write_ablation_report(summary, table, JOBS_DIR.parent / recipe.report)
    return summary


def apply_overrides_cfg(cfg: ExperimentConfig, items: list[str]) -> ExperimentConfig:
    """A copy of ``cfg`` with ``--set`` items applied (strictly checked)."""
    from biflow.config import to_dict

    return load_config(to_dict(cfg), items)


def ablation_table(summary: dict[str, Any]) -> str:
    lines = [f"| ablation | sampler | NFE | w | FID | KID x1e3 | PSNR dB | paper FID (ablated vs baseline) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        paper = r["paper"] if r["guidance"] == summary["rows"][0]["guidance"] else ""
        lines.append(f"| {r['ablation']} | {r['sampler']} | {r['nfe']} | {r['guidance']:g} | {r['fid']:.2f} | "
                     f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f} | {r['recon_psnr_db']:.2f} | {paper} |")
    for key, e in summary["exact"].items():
        lines.append(f"| exact inverse | exact | serial | {e['guidance']:g} | {e['fid']:.2f} | "
                     f"{1e3 * e['kid']:.2f} ± {1e3 * e['kid_se']:.2f} | | |")
    f = summary["real_vs_real"]
    lines.append(f"| real vs real (floor) | | | | {f['fid']:.2f} | {1e3 * f['kid']:.2f} ± {1e3 * f['kid_se']:.2f} | | |")
    return "\n".join(lines)


def write_ablation_report(summary: dict[str, Any], table: str, out_dir: Path) -> None:
    from biflow.bench.sampling import bar_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=2))
    w0 = [r for r in summary["rows"] if r["guidance"] == min(x["guidance"] for x in summary["rows"])]
    w = w0[0]["guidance"]
    exact = summary["exact"].get(f"exact@w={w:g}")
    lines = {"exact inverse": exact["fid"]} if exact else {}
    lines["real vs real"] = summary["real_vs_real"]["fid"]
    bar_chart(out_dir / "ablation.png", [r["ablation"] for r in w0], [r["fid"] for r in w0], "FID",
              f"{summary['recipe']['name']}: BiFlow FID at w={w:g} ({summary['num_samples']} samples)", lines=lines)
    title = summary["recipe"].get("description") or f"Ablation: {summary['recipe']['name']}"
    (out_dir / "ablation.md").write_text(f"# {title}\n\n{table}\n\n"
                                         f"{summary['num_samples']} samples per row. Paper FIDs: the BiFlow paper's "
                                         "B/2 ImageNet-256 ablations (METHOD.md), for direction only.\n")


GOAL_LABELS = {"recon_psnr_db": "denoising PSNR of G(F(x̃)) vs x (dB)"}


def nfe(sampler: str, guidance: float) -> int | str:
    """Network evaluations per sample: BiFlow 1 (2 with inference-time CFG at w > 0); the exact
    inverse decodes token by token ("serial")."""
    if sampler == "exact":
        return "serial"
    return 2 if sampler == "biflow-cfg2" and guidance else 1


def goal_bound(goal: dict[str, Any], le: str = "≤", ge: str = "≥") -> str:
    return f"{le} {goal['max']:g}" if "max" in goal else f"{ge} {goal['min']:g}"


def results_markdown(results: dict[str, Any], recipe: Recipe | None = None) -> str:
    """The results of a recipe as Markdown: samplers, the real-vs-real floor, the goals, bits/dim,
    PSNR and wall time (what the README quotes; ``report`` writes it beside the JSON)."""
    n, ref = results["num_samples"], results.get("num_reference") or 0
    head = f"{n} samples" + (f" vs {ref:,} reference images" if ref else "")
    lines = [f"| sampler ({head}) | NFE | FID | KID x1e3 | ms/img (batch {_timing_batch(results)}) | speed-up |",
             "|---|---|---|---|---|---|"]
    for key, r in results["samplers"].items():
        kid = f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f}" if "kid" in r else ""
        speed = f"{r['speedup_vs_exact']:.1f}x" if r.get("speedup_vs_exact") else ""
        lines.append(f"| {key} | {nfe(r['sampler'], r['guidance'])} | {r['fid']:.2f} | {kid} | {r['ms_per_image']:.2f} | {speed} |")
    if results.get("real_vs_real"):
        f = results["real_vs_real"]
        lines.append(f"| real vs real ({f['num']} {f['split']} images, the floor) | | {f['fid']:.2f} | "
                     f"{1e3 * f['kid']:.2f} ± {1e3 * f['kid_se']:.2f} | | |")
    goals = results.get("goals") or {}
    if goals:
        lines += ["", "| goal | measured | target | |", "|---|---|---|---|"]
        for name, g in goals.items():
            lines.append(f"| {GOAL_LABELS.get(name, name)} | {g['value']:.3f} | {goal_bound(g)} | "
                         f"{'met' if g['met'] else '**missed**'} |")
    lines.append("")
    bpd = f"bits/dim {results['bpd']:.3f} at σ = {results['noise_std']:g}"
    if results.get("bpd_excess_over_floor") is not None:
        bpd += f" ({results['bpd_excess_over_floor']:.3f} over the noise floor)"
    if results.get("bpd_dequantized") is not None:
        bpd += f", {results['bpd_dequantized']:.3f} with uniform dequantisation"
    lines.append(bpd + ".")
    if results.get("recon_psnr_db") is not None:
        lines.append(f"Denoising PSNR of G(F(x̃)) vs x {results['recon_psnr_db']:.2f} dB; inversion PSNR "
                     f"(vs x̃) {results.get('inversion_psnr_db', float('nan')):.2f} dB.")
    c, t = results.get("checkpoint") or {}, results.get("timings") or {}
    if t:
        lines.append(f"Wall time {t['total_s'] / 60:.1f} min: data {t['data_s']:.0f} s, forward {t['forward_s']:.0f} s"
                     f" (to step {c.get('forward_step', '?')}), reverse {t['reverse_s']:.0f} s (to step "
                     f"{c.get('reverse_step', '?')}), evaluation {t['eval_s']:.0f} s.")
        if "forward_train_s" in t:
            train = t["forward_train_s"] + t["reverse_train_s"]
            lines.append(f"Training loops {train:.0f} s (forward {t['forward_train_s']:.0f}, reverse "
                         f"{t['reverse_train_s']:.0f}); everything else {t['total_s'] - train:.0f} s "
                         f"({(t['total_s'] - train) / t['total_s']:.0%} of the wall time): stage start-up and final "
                         f"checkpoints {t['forward_overhead_s'] + t['reverse_overhead_s']:.0f} s, data "
                         f"{t['data_s']:.0f} s, evaluation {t['eval_s']:.0f} s.")
    m = results.get("machine") or {}
    if m:
        lines.append(f"Machine: {m.get('device_name', '?')} ({m.get('device', '?')}), {m.get('cpu_count', '?')} cores, "
                     f"torch {m.get('torch', '?')}.")
    title = recipe.description if recipe and recipe.description else "biflow results"
    return f"# {title}\n\n" + "\n".join(lines) + "\n"


def _timing_batch(results: dict[str, Any]) -> Any:
    return next(iter(results["samplers"].values())).get("timing_batch", "?")


def write_results_report(results: dict[str, Any], recipe: Recipe, out_dir: Path) -> Path:
    """``results.json``, ``results.md`` and the sample grids (``samples-<sampler>-w<g>.png``) in ``out_dir``;
    the JSON's grid paths point at the copies. Returns the Markdown file."""
    import copy
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    results = copy.deepcopy(results)
    for r in results["samplers"].values():
        grid = Path(r["grid"])
        if grid.is_file():
            shutil.copy(grid, out_dir / grid.name)
            r["grid"] = grid.name  # relative to the report
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    md = out_dir / "results.md"
    md.write_text(results_markdown(results, recipe))
    return md


def check_goals(results: dict[str, Any], goals: Goals) -> dict[str, Any]:
    """Each goal with its measured value and whether it is met."""
    checked: dict[str, Any] = {}
    if goals.fid_ratio_max > 0:
        for r in results["samplers"].values():
            if "fid_ratio_vs_exact" in r:
                checked[f"fid_ratio@w={r['guidance']:g}"] = {
                    "value": r["fid_ratio_vs_exact"], "max": goals.fid_ratio_max,
                    "met": r["fid_ratio_vs_exact"] <= goals.fid_ratio_max}
                if goals.kid_agrees and not goals.kid_ratio_max and r.get("kid_ratio_vs_exact") is not None:
                    checked[f"kid_ratio@w={r['guidance']:g}"] = {
                        "value": r["kid_ratio_vs_exact"], "max": 1.0, "met": r["kid_ratio_vs_exact"] < 1.0}
    if goals.kid_ratio_max > 0:
        for r in results["samplers"].values():
            if r.get("kid_ratio_vs_exact") is not None:
                checked[f"kid_ratio@w={r['guidance']:g}"] = {
                    "value": r["kid_ratio_vs_exact"], "max": goals.kid_ratio_max,
                    "met": r["kid_ratio_vs_exact"] <= goals.kid_ratio_max}
    if goals.biflow_fid_max > 0:
        key = f"biflow@w={goals.biflow_fid_max_at:g}"
        if key in results["samplers"]:
            fid = results["samplers"][key]["fid"]
            checked[f"fid@{key}"] = {"value": fid, "max": goals.biflow_fid_max, "met": fid <= goals.biflow_fid_max}
    total = (results.get("timings") or {}).get("total_s")
    if goals.total_time_max_s > 0 and total is not None:
        checked["total_time_s"] = {"value": total, "max": goals.total_time_max_s, "met": total <= goals.total_time_max_s}
    if goals.recon_psnr_min_db > 0 and results.get("recon_psnr_db") is not None:
        checked["recon_psnr_db"] = {"value": results["recon_psnr_db"], "min": goals.recon_psnr_min_db,
                                    "met": results["recon_psnr_db"] >= goals.recon_psnr_min_db}
    return checked


def summary_table(results: dict[str, Any], storage: str, recipe: Recipe | None = None) -> str:
    title = recipe.description if recipe and recipe.description else "biflow results"
    rows = [f"{'sampler':<22}{'FID':>9}{'KID x1e3':>15}{'ms/img':>10}"]
    for key, r in results["samplers"].items():
        kid = f"{1e3 * r['kid']:.2f}+-{1e3 * r['kid_se']:.2f}" if "kid" in r else "-"
        rows.append(f"{key:<22}{r['fid']:>9.2f}{kid:>15}{r['ms_per_image']:>10.2f}")
    if results.get("real_vs_real"):
        floor = results["real_vs_real"]
        kid = f"{1e3 * floor['kid']:.2f}+-{1e3 * floor['kid_se']:.2f}"
        rows.append(f"{'real vs real (floor)':<22}{floor['fid']:>9.2f}{kid:>15}")
    t = results.get("timings", {})
    ref = f" vs {results['num_reference']} reference images" if results.get("num_reference") else ""
    lines = ["", f"{title} ({results['num_samples']} samples for FID/KID{ref})", "-" * 56, *rows, "-" * 56,
             f"bits/dim (test, sigma={results['noise_std']:g})   {results['bpd']:.3f}"
             + (f" ({results['bpd_excess_over_floor']:.3f} over the noise floor)"
                if results.get("bpd_excess_over_floor") is not None else "")]
    if results.get("bpd_dequantized") is not None:
        lines.append(f"bits/dim (uniform dequant.)  {results['bpd_dequantized']:.3f}")
    if results.get("recon_psnr_db") is not None:
        lines.append(f"denoising PSNR G(F(x~)) vs x {results['recon_psnr_db']:.2f} dB")
    if results.get("inversion_psnr_db") is not None:
        lines.append(f"inversion PSNR G(F(x~)) vs x~ {results['inversion_psnr_db']:.2f} dB")
    for name, g in (results.get("goals") or {}).items():
        lines.append(f"goal {name:<22} {g['value']:.3f} {goal_bound(g, '<=', '>=')}: "
                     f"{'met' if g['met'] else 'NOT met'}")
    if t:
        lines.append(f"wall time {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f}s, forward {t['forward_s']:.0f}s, "
                     f"reverse {t['reverse_s']:.0f}s, eval {t['eval_s']:.0f}s)")
    grids = [r["grid"] for r in results["samplers"].values()]
    lines += [f"sample grids: {', '.join(grids)}", f"TensorBoard:  tensorboard --logdir {storage}"]
    return "\n".join(lines)
