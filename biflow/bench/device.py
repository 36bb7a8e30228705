"""``make device-check`` (``python -m biflow.bench.device``): the prepared GPU check.

One call on a bare GPU machine (a Python with torch, maybe little else), sized for
<= 10 minutes on one H200, installs included:

0. ``install``: for the steps chosen, the packages they import and the machine
   lacks, installed into this Python at the lock's versions (``requirements/lock.txt``;
   what the machine already has, torch above all, is pinned to its own version and
   left alone), with uv where it is on the PATH, else pip; ``--wheels DIR`` installs
   offline from a folder of wheels (a device machine that reaches no index);
1. ``cuda_tests``: ``tests/test_cuda.py`` alone (pytest);
2. ``flops``: the MFU's FLOP formula against torch's FLOP counter on the meta device,
   B/2 and XL/2 (within 1%);
3. ``sampling``: BiFlow 1-NFE against the exact inverse + CFG + Tweedie, B/2 on
   4x32x32 latents, at batch 1, 16 and 256: latency and throughput;
4. ``forward_mfu``: B/2 forward-flow training MFU on the path training takes
   (DeepSpeed ZeRO-2, bf16), eager and compiled (a compile failure at the first
   step falls back to eager and is recorded);
5. ``train_smoke``: the smoke forward and reverse jobs for 50 steps under Ray Train
   (bf16, NCCL, ZeRO-2): both finish and their loss falls.

Only this module's own imports are needed to start (stdlib, torch, numpy); each
step imports its own packages. Every step has a time-out inside the overall
budget, and the JSON (``docs/device-check-<device>.json``) is rewritten after each
step, so a check cut short keeps what it measured. One threshold per goal
(:data:`GOALS`); on a GPU the exit status is 0 only if every step passed and every
goal was met. ``--cpu`` is the dry mode: the same steps at tiny shapes on the CPU,
bf16 under CPU autocast, the goal logic on CPU figures (which mean nothing about
speed; its exit status counts the steps only). CI runs it from a simulated bare
environment (tests/test_device_check.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from biflow.bench.flops import MFU_GOAL  # torch and biflow.config only: importable on a bare machine
from biflow.errors import UserError
from biflow.timing import machine_info

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
B2_FLOW = {"size": "B/2", "image_size": 32, "channels": 4, "num_classes": 1000}

# One threshold per goal (issue 21), checked on the GPU figures.
GOALS: dict[str, dict[str, Any]] = {
    "forward_mfu": {"min": MFU_GOAL, "what": "B/2 forward-flow training MFU, DeepSpeed ZeRO-2 bf16 (better of "
                                         "eager / compiled)"},
    "biflow_ms_per_image_b256": {"max": 0.5, "what": "BiFlow-B/2 1-NFE ms per image at batch 256 (better of "
                                                     "eager / compiled with CUDA graphs)"},
    "speedup_vs_exact_cfg_b1": {"min": 224.0, "what": "BiFlow 1-NFE vs exact inverse + CFG + Tweedie, "
                                                      "latency at batch 1"},
    "flops_rel_error": {"max": 0.01, "what": "|formula / torch FLOP counter - 1|, worst of B/2 and XL/2"},
    "smoke_loss_falls": {"min": 1, "what": "both smoke stages finish and their last logged loss is below "
                                           "their first (1 = yes)"},
}


@dataclass
class Step:
    name: str
    run: Callable[["Context"], dict[str, Any]]
    needs: dict[str, str] = field(default_factory=dict)  # module to import -> distribution to install
    timeout_s: float = 120.0


@dataclass
class Context:
    cpu: bool
    work: Path
    steps: int  # training steps per smoke stage
    log: Callable[[str], None]
    seconds_left: Callable[[], float]


# ---------------------------------------------------------------------------
# Installing what a step needs
# ---------------------------------------------------------------------------


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing
        return True


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraints(lock: Path = LOCK) -> list[str]:
    """Pins for the installer: the lock's version of every package, except that a
    package this Python already has (torch first of all, and whatever the machine's
    image ships) is pinned to the version it has, so installing never replaces it."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    pins["torch"] = torch.__version__
    out = []
    for name, version in sorted(pins.items()):
        have = _installed_version(name)
        out.append(f"{name}=={have or version}")
    return out


def installer_command(dists: list[str], constraint_file: Path, wheels: str | None = None) -> list[str]:
    """uv (on the PATH, or ``BIFLOW_UV``) into this Python, else this Python's pip."""
    uv = os.environ.get("BIFLOW_UV") or shutil.which("uv")
    offline = ["--no-index", "--find-links", wheels] if wheels else []
    if uv:
        return [uv, "pip", "install", "--python", sys.executable, "-c", str(constraint_file), *offline, *dists]
    if not _missing("pip"):
        # offline there is no index to fetch build tools from: build what needs it here
        build = ["--no-build-isolation"] if wheels else []
        return [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                str(constraint_file), *offline, *build, *dists]
    raise UserError(f"cannot install {', '.join(dists)}: neither uv (PATH or BIFLOW_UV) nor pip for {sys.executable}")


def install(dists: list[str], wheels: str | None, timeout_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Install ``dists`` (at the lock's versions) into this Python; what was installed, or why not."""
    if not dists:
        return {"status": "ok", "installed": [], "reason": "nothing missing"}
    with tempfile.TemporaryDirectory(prefix="biflow-constraints-") as tmp:
        cfile = Path(tmp) / "constraints.txt"
        cfile.write_text("\n".join(constraints()) + "\n")
        cmd = installer_command(dists, cfile, wheels)
        log(f"[device-check] installing {' '.join(dists)} ({Path(cmd[0]).name}"
            f"{', offline from ' + wheels if wheels else ''})")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "requested": dists, "error": f"install timed out after {timeout_s:.0f} s"}
    importlib.invalidate_caches()
    entry: dict[str, Any] = {"status": "ok" if proc.returncode == 0 else "failed", "requested": dists,
                             "installer": Path(cmd[0]).name}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        entry["error"] = " | ".join(lines[-4:])[:800]
    entry["versions"] = {d: _installed_version(re.split(r"[\[=<>]", d)[0]) for d in dists}
    return entry


# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------


def _cuda_tests(ctx: Context) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=",
           str(ROOT / "tests" / "test_cuda.py")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, ctx.seconds_left()))
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail[0])}
    ok = proc.returncode in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    if not ctx.cpu and not counts.get("passed"):
        ok = False  # on a GPU the CUDA tests must actually run
    return {"ok": ok, "summary": tail[0], "counts": counts, "returncode": proc.returncode}


def _flops(ctx: Context) -> dict[str, Any]:
    from biflow.bench.flops import counted_train_flops, flow_train_flops
    from biflow.config import FlowConfig

    rows = {}
    for size in ("B/2", "XL/2"):
        cfg = FlowConfig.from_size(size, image_size=32, channels=4, num_classes=1000)
        formula = flow_train_flops(cfg, 8)["flops_per_step"]
        counted = counted_train_flops(cfg, 8)
        rows[size] = {"formula": formula, "counted": counted, "rel_error": formula / counted - 1}
    worst = max(abs(r["rel_error"]) for r in rows.values())
    return {"ok": True, "shapes": rows, "batch": 8, "worst_rel_error": worst}


def _sampling(ctx: Context) -> dict[str, Any]:
    from biflow.bench.sampling import bench_sampling

    preset, batches = ("tiny", (1, 4)) if ctx.cpu else ("b2-latent", (1, 16, 256))
    # compiled single pass: inductor + CUDA graphs on a GPU; traced with aot_eager in the dry mode
    res = bench_sampling(ctx.work / "bench", preset=preset, batch_sizes=batches, reps=1 if ctx.cpu else 5,
                         log=ctx.log, compile_backend="aot_eager" if ctx.cpu else "auto")
    rows = {}
    for row in res["rows"]:
        ms = row["ms_per_image"]
        best = min(ms["biflow_1nfe"], ms.get("biflow_1nfe_compiled", float("inf")))
        rows[str(row["batch"])] = {
            "latency_ms": {k: v * row["batch"] for k, v in ms.items() if not k.startswith("decode")},
            "images_per_s": row["images_per_s"],
            "ms_per_image": ms,
            "biflow_best_ms_per_image": best,
            "speedup_vs_exact_cfg_tweedie": row["speedup_best_biflow_vs_exact_cfg_tweedie"],
            "speedup_eager_vs_exact_cfg_tweedie": row["speedup_biflow_vs_exact_cfg_tweedie"],
            "speedup_kv_cache_vs_naive": row["speedup_kv_cache_vs_naive"]}
    return {"ok": True, "preset": preset, "dtype": res["dtype"], "compile_backend": res["compile_backend"],
            "compile_error": res["compile_error"], "flow_params": res["flow"]["params"],
            "reverse_params": res["reverse"]["params"], "batches": rows}


def _mfu(ctx: Context) -> dict[str, Any]:
    from biflow.bench.flops import mfu_runs, mfu_section
    from biflow.config import FlowConfig

    if not ctx.cpu:
        res = mfu_section(B2_FLOW, 256, None)
        return {**res, "ok": res.get("mfu") is not None}
    # the dry mode: the same path (DeepSpeed ZeRO-2 in bf16, eager and compiled: the graphs traced by
    # aot_eager, no C++ kernels built) at a tiny shape; a CPU has no comparable bf16 peak, so no MFU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = FlowConfig(image_size=16, channels=4, patch_size=2, width=32, depth=1, num_blocks=2, num_heads=2,
                     num_classes=10)
    runs = mfu_runs(cfg, 8, steps=2, warmup=1, precision="bf16", device="cpu", compile_backend="aot_eager")
    best = max(runs.values(), key=lambda r: r["samples_per_s"])
    return {**best, "runs": runs, "ok": all(r["step_s"] > 0 for r in runs.values())}


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


def _train_smoke(ctx: Context) -> dict[str, Any]:
    from biflow.config import load_config
    from biflow.data.shards import prepare_data
    from biflow.train.launch import fit

    steps = ctx.steps
    every = max(1, steps // 5)
    shards = ctx.work / "shards"
    prepare_data(str(_tiny_image_folder(ctx.work / "images")), str(shards), "folder", image_size=28, channels=1,
                 progress=False)
    common = [f"data.uri={shards}", f"ray.storage={ctx.work / 'runs'}", f"train.steps={steps}",
              f"train.log_every={every}", f"train.checkpoint_every={every}",
              f"train.keep_checkpoints={-(-steps // every)}", "train.sample_every=0", "ray.workers=1",
              "ray.max_failures=0", "data.eval_split=train"]
    common += ["ray.use_gpu=no", "train.batch_size=8"] if ctx.cpu else ["ray.use_gpu=yes", "train.precision=bf16"]
    out: dict[str, Any] = {}
    for stage in ("forward", "reverse"):
        cfg = load_config(ROOT / "jobs" / f"smoke-{stage}.yaml", common)
        t0 = time.perf_counter()
        result = fit(cfg)
        losses = [float(m["loss"]) for _, m in sorted(result.best_checkpoints, key=lambda cm: cm[1]["step"])
                  if "loss" in m]
        m = result.metrics or {}
        out[stage] = {"seconds": time.perf_counter() - t0, "step": m.get("step"), "losses": losses,
                      "loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
                      "samples_per_s": m.get("samples_per_s"), "engine": cfg.train.engine,
                      "zero_stage": cfg.train.zero_stage, "precision": "fp32" if ctx.cpu else "bf16",
                      "backend": "gloo" if ctx.cpu else "nccl"}
    out["ok"] = all(out[s]["step"] == steps for s in ("forward", "reverse"))
    return out


RAY = {"ray.train": "ray[train,data]", "deepspeed": "deepspeed", "yaml": "pyyaml", "pyarrow": "pyarrow",
       "PIL": "pillow", "safetensors": "safetensors", "scipy": "scipy", "tensorboard": "tensorboard",
       "fsspec": "fsspec", "boto3": "boto3", "tqdm": "tqdm"}
STEPS: list[Step] = [
    Step("cuda_tests", _cuda_tests, {"pytest": "pytest"}, timeout_s=240),
    Step("flops", _flops, {}, timeout_s=120),
    Step("sampling", _sampling, {}, timeout_s=150),
    Step("forward_mfu", _mfu, {"deepspeed": "deepspeed"}, timeout_s=240),
    Step("train_smoke", _train_smoke, RAY, timeout_s=300),
]


# ---------------------------------------------------------------------------
# Goals, time-outs, the run
# ---------------------------------------------------------------------------


def goal_values(steps: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each goal's measured value from the steps' results (None where the step did not run)."""
    def get(step: str, *keys: str) -> Any:
        node: Any = steps.get(step, {})
        if node.get("status") != "ok":
            return None
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    smoke = steps.get("train_smoke", {})
    falls = None
    if smoke.get("status") == "ok":
        falls = float(all(smoke[s]["loss_falls"] for s in ("forward", "reverse")))
    batches = get("sampling", "batches") or {}
    return {"forward_mfu": get("forward_mfu", "mfu"),
            "biflow_ms_per_image_b256": (batches.get("256") or {}).get("biflow_best_ms_per_image"),
            "speedup_vs_exact_cfg_b1": (batches.get("1") or {}).get("speedup_vs_exact_cfg_tweedie"),
            "flops_rel_error": get("flops", "worst_rel_error"),
            "smoke_loss_falls": falls}


def check_goals(values: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, goal in GOALS.items():
        v = values.get(name)
        met = None if v is None else (v >= goal["min"] if "min" in goal else abs(v) <= goal["max"])
        out[name] = {**goal, "value": v, "met": met}
    return out


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise :class:`StepTimeout` in this (main) thread after ``seconds``; elsewhere, no limit."""
    import threading

    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def fire(signum, frame):  # noqa: ARG001
        raise StepTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def device_check(out_dir: str | Path = ROOT / "docs", cpu: bool = False, steps: int | None = None,
                 only: list[str] | None = None, budget_s: float = 570.0, wheels: str | None = None,
                 do_install: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    if not cpu and not torch.cuda.is_available():
        raise UserError("no CUDA device here: `python -m biflow.bench.device --cpu` runs the dry mode at tiny shapes")
    names = [s.name for s in STEPS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UserError(f"unknown device-check step(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    plan = [s for s in STEPS if not only or s.name in only]
    t_all = time.perf_counter()
    seconds_left = lambda: budget_s - (time.perf_counter() - t_all)  # noqa: E731
    info = machine_info()
    slug = "cpu-dry" if cpu else re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    path = Path(out_dir) / f"device-check-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"benchmark": "device-check", "mode": "cpu-dry" if cpu else "gpu", "machine": info,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "budget_s": budget_s,
                               "python": sys.executable, "steps": {}}

    def save() -> None:
        results["seconds"] = time.perf_counter() - t_all
        results["goals"] = check_goals(goal_values(results["steps"]))
        path.write_text(json.dumps(results, indent=2, default=str))

    missing = {dist: None for s in plan for mod, dist in s.needs.items() if _missing(mod)}
    if do_install:
        t0 = time.perf_counter()
        results["install"] = install(list(missing), wheels, max(30.0, min(240.0, seconds_left() / 2)), log)
        results["install"]["seconds"] = time.perf_counter() - t0
        log(f"[device-check] install: {results['install']['status']} ({results['install']['seconds']:.1f} s)"
            + (f" - {results['install'].get('error')}" if results["install"]["status"] != "ok" else ""))
    save()
    with tempfile.TemporaryDirectory(prefix="biflow-device-check-") as tmp:
        ctx = Context(cpu=cpu, work=Path(tmp), steps=steps or (2 if cpu else 50), log=log, seconds_left=seconds_left)
        for step in plan:
            t0 = time.perf_counter()
            lacking = [dist for mod, dist in step.needs.items() if _missing(mod)]
            left = min(step.timeout_s, seconds_left())
            if lacking:
                entry: dict[str, Any] = {"status": "skipped", "reason": f"not installed here: {', '.join(lacking)}"}
            elif left < 5:
                entry = {"status": "skipped", "reason": f"the check's budget ({budget_s:.0f} s) is spent"}
            else:
                try:
                    with _deadline(left):
                        entry = step.run(ctx)
                    entry["status"] = "ok" if entry.pop("ok", True) else "failed"
                except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others
                    entry = {"status": "failed", "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:500]}"}
            entry["seconds"] = time.perf_counter() - t0
            results["steps"][step.name] = entry
            save()  # after every step: a check cut short keeps what it measured
            log(f"[device-check] {step.name}: {entry['status']} ({entry['seconds']:.1f} s)"
                + (f" - {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else ""))
    save()
    for name, g in results["goals"].items():
        state = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
        bound = f">= {g['min']}" if "min" in g else f"<= {g['max']}"
        value = "-" if g["value"] is None else f"{g['value']:.4g}"
        log(f"[device-check] goal {name}: {value} ({bound}) {state}")
    log(f"[device-check] wrote {path} ({results['seconds']:.0f} s)")
    return results


def passed(results: dict[str, Any]) -> bool:
    """The exit status: every step ok (nothing skipped), and on a GPU every goal met."""
    steps_ok = all(s["status"] == "ok" for s in results["steps"].values())
    if results["mode"] == "cpu-dry":
        return steps_ok
    return steps_ok and all(g["met"] for g in results["goals"].values())


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry mode at tiny shapes on the CPU")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="directory for device-check-<device>.json")
    parser.add_argument("--steps", type=int, default=0, help="training steps per smoke stage (default 50; --cpu 2)")
    parser.add_argument("--only", default="", help=f"comma-separated steps (default all: {', '.join(s.name for s in STEPS)})")
    parser.add_argument("--budget-s", type=float, default=570.0, help="the whole check's time budget, installs included")
    parser.add_argument("--wheels", default=None, help="install offline from this folder of wheels")
    parser.add_argument("--no-install", action="store_true", help="install nothing; steps that lack packages are skipped")
    args = parser.parse_args(argv)
    try:
        results = device_check(args.out, cpu=args.cpu, steps=args.steps or None,
                               only=[s for s in args.only.split(",") if s] or None, budget_s=args.budget_s,
                               wheels=args.wheels, do_install=not args.no_install)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if passed(results) else 1)


if __name__ == "__main__":
    main()
