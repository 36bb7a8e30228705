"""``biflow bench levers``: what each training lever of the reverse model buys, per step
and per second, on one fixed-step harness.

The reverse model G is trained in this process (no Ray, no DeepSpeed) on flow
trajectories computed once from a trained forward checkpoint and cached: every variant
sees the same pairs in the same order, with the same seed, optimizer and LR schedule.
Variants are the job's reverse config with ``--set``-style overrides. At fixed step
counts the harness reports the held-out denoising PSNR of G(z | y, w=0) against the clean
test images (the raw weights, not the EMA), and the median step time, so a lever that
costs time is judged by what it buys per second as well as per step. Writes
``levers.json`` and ``levers.png`` (PSNR against steps and against seconds).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from biflow.config import ExperimentConfig, apply_overrides, load_config, to_dict
from biflow.timing import pyplot, write_results

from biflow.recipe import JOBS_DIR as JOBS

# name -> overrides of the job's reverse config. "job" is the config as shipped; "old" is the
# reverse setup before issue 20 (no z skip, training-time CFG and the perceptual term from the
# first step, lr 2e-3); the others change one lever at a time against "old" or "job".
OLD = ["reverse.z_skip=none", "reverse.z_skip_init=zero", "reverse.guidance_start=0.0", "reverse.perceptual_start=0.0",
       "reverse.perceptual_weight=1.0", "optim.lr=0.002"]
DEFAULT_VARIANTS: dict[str, list[str]] = {
    "old": OLD,
    "old+skip-dense": [*OLD, "reverse.z_skip=dense"],
    "old+skip-dense-ridge": [*OLD, "reverse.z_skip=dense", "reverse.z_skip_init=ridge"],
    "old+skip-token": [*OLD, "reverse.z_skip=token"],
    "old+skip-lowrank": [*OLD, "reverse.z_skip=lowrank"],
    "old+curriculum": [*OLD, "reverse.guidance_start=0.6", "reverse.perceptual_start=0.6"],
    "old+lr4e-3": [*OLD, "optim.lr=0.004"],
    "old-perceptual-cfg": [*OLD, "reverse.guidance_max=0.0", "reverse.perceptual_weight=0.0"],
    "job": [],
    "job+perceptual": ["reverse.perceptual_weight=1.0"],
}


@dataclasses.dataclass
class CachedPairs:
    """Pairs (x, x~, y, trajectory) made once by the frozen flow; the bench's training data."""

    x: torch.Tensor
    x_noisy: torch.Tensor
    y: torch.Tensor | None
    states: list[torch.Tensor]

    def batch(self, idx: torch.Tensor):
        from biflow.losses import TrainingPair

        return TrainingPair(x=self.x[idx], x_noisy=self.x_noisy[idx], y=None if self.y is None else self.y[idx],
                            states=[s[idx] for s in self.states])


def fashion_mnist(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a Fashion-MNIST split in [-1, 1] and their labels."""
    from biflow.data.sources import FASHION_MNIST_DIR, FASHION_MNIST_FILES, read_idx

    images, labels = (Path(FASHION_MNIST_DIR) / f for f in FASHION_MNIST_FILES[split])
    x = read_idx(images)[:n].reshape(-1, 1, 28, 28)
    y = read_idx(labels)[:n].astype("int64")
    return torch.from_numpy(x.copy()).float().div(127.5).sub(1.0), torch.from_numpy(y)


@torch.no_grad()
def cache_pairs(flow, x: torch.Tensor, y: torch.Tensor | None, seed: int, batch: int = 500,
                label_drop: bool = True) -> CachedPairs:
    """One noise draw (and label drop, for training pairs) per image, through the frozen flow."""
    from biflow.losses import make_pairs

    fcfg = flow.config if label_drop else dataclasses.replace(flow.config, label_drop=0.0)
    g = torch.Generator().manual_seed(seed)
    parts = [make_pairs(flow, x[i:i + batch], None if y is None else y[i:i + batch], fcfg, g)
             for i in range(0, len(x), batch)]
    return CachedPairs(x=x, x_noisy=torch.cat([p.x_noisy for p in parts]),
                       y=None if y is None else torch.cat([p.y for p in parts]),
                       states=[torch.cat([p.states[k] for p in parts]) for k in range(len(parts[0].states))])


@torch.no_grad()
def heldout_psnr(rev, pairs: CachedPairs, batch: int = 250) -> float:
    """PSNR (dB, [-1, 1] data) of G(z | y, w=0) against the clean images."""
    from biflow.metrics import psnr

    rev.eval()
    preds = [rev(pairs.states[-1][i:i + batch], None if pairs.y is None else pairs.y[i:i + batch], guidance=0.0).x
             for i in range(0, len(pairs.x), batch)]
    rev.train()
    return float(psnr(torch.cat(preds), pairs.x))


def train_variant(cfg: ExperimentConfig, train: CachedPairs, test: CachedPairs, steps: int, eval_at: list[int],
                  batch: int, seed: int, log: Callable[[str], None]) -> dict:
    """Train G from scratch for ``steps`` on the cached pairs; PSNR at ``eval_at``."""
    from biflow.losses import reverse_objective
    from biflow.models import ReverseModel
    from biflow.perceptual import build_feature_net
    from biflow.train.engine import build_optimizer, warmup_cosine

    torch.manual_seed(seed)
    rcfg, fcfg = cfg.reverse, cfg.flow
    rev = ReverseModel(rcfg, fcfg)
    opt = build_optimizer(rev, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim, steps))
    net = build_feature_net(rcfg.perceptual) if rcfg.perceptual_weight > 0 else None
    net = net.eval().requires_grad_(False) if net is not None else None
    g = torch.Generator().manual_seed(seed)
    order = torch.Generator().manual_seed(seed + 1)
    psnrs, times = {}, []
    init_s = 0.0
    if rcfg.z_skip != "none" and rcfg.z_skip_init == "ridge":  # as the training loop does, on its first batches
        t0 = time.perf_counter()
        idx = [torch.randint(0, len(train.x), (batch,), generator=order) for _ in range(rcfg.z_skip_init_batches)]
        rev.fit_z_skip((b.states[-1], b.target(rcfg)) for b in map(train.batch, idx))
        init_s = time.perf_counter() - t0
        psnrs[0] = heldout_psnr(rev, test)
        log(f"  ridge-initialised z skip: held-out PSNR {psnrs[0]:.2f} dB before the first step ({init_s:.1f} s)")
    for step in range(steps):
        idx = torch.randint(0, len(train.x), (batch,), generator=order)
        t0 = time.perf_counter()
        loss, _ = reverse_objective(rev, train.batch(idx), rcfg, fcfg, feature_net=net, generator=g, step=step,
                                    progress=step / steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(rev.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        if step + 1 in eval_at:
            psnrs[step + 1] = heldout_psnr(rev, test)
            log(f"  step {step + 1}: held-out PSNR {psnrs[step + 1]:.2f} dB, "
                f"{1e3 * statistics.median(times):.0f} ms/step")
    return {"psnr_db": psnrs, "ms_per_step": 1e3 * statistics.median(times), "init_s": init_s,
            "params": sum(p.numel() for p in rev.parameters())}


def bench_levers(forward: str, out_dir: str | Path = "runs/bench", job: str = "quickstart", steps: int = 300,
                 eval_every: int = 100, batch: int = 0, train_images: int = 8192, test_images: int = 500,
                 variants: dict[str, list[str]] | None = None, storage: str = "runs", seed: int = 0,
                 log: Callable[[str], None] = print) -> dict:
    """Train every variant of ``jobs/<job>-reverse.yaml`` against the forward checkpoint
    ``forward`` (a run name under ``storage`` or a checkpoint path) for ``steps`` steps."""
    from biflow.errors import UserError
    from biflow.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(forward, storage, key="--forward")
    if loaded.stage != "forward":
        raise UserError(f"--forward {forward!r} is a {loaded.stage} checkpoint; give a stage-1 (forward) run")
    flow = loaded.model.float().requires_grad_(False)
    fcfg = loaded.config.flow
    if (fcfg.channels, fcfg.image_size) != (1, 28):
        raise UserError(f"bench levers reads Fashion-MNIST (1x28x28); the flow {forward!r} takes "
                        f"{fcfg.channels}x{fcfg.image_size}x{fcfg.image_size}")
    job_cfg = load_config(JOBS / f"{job}-reverse.yaml")
    batch = batch or job_cfg.train.batch_size
    t0 = time.time()
    x, y = fashion_mnist("train", train_images)
    train = cache_pairs(flow, x, y if fcfg.num_classes else None, seed)
    x, y = fashion_mnist("test", test_images)
    test = cache_pairs(flow, x, y if fcfg.num_classes else None, seed + 1, label_drop=False)
    log(f"cached {train_images} training and {test_images} held-out trajectories in {time.time() - t0:.0f} s "
        f"(flow {forward}, step {loaded.step})")
    eval_at = sorted({*range(eval_every, steps + 1, eval_every), steps})
    results: dict = {"job": job, "forward": loaded.uri, "forward_step": loaded.step, "steps": steps,
                     "batch": batch, "train_images": train_images, "test_images": test_images, "seed": seed,
                     "eval": "held-out denoising PSNR of G(z | y, w=0), raw weights", "variants": {}}
    base = to_dict(job_cfg)
    for name, overrides in (variants or DEFAULT_VARIANTS).items():
        cfg = load_config(apply_overrides(copy.deepcopy(base), overrides))
        cfg.flow = fcfg
        r = cfg.reverse
        log(f"{name}: z_skip={r.z_skip}, guidance_max={r.guidance_max} from {r.guidance_start:g}, "
            f"perceptual {r.perceptual_weight:g} from {r.perceptual_start:g}")
        res = train_variant(cfg, train, test, steps, eval_at, batch, seed, log)
        res["overrides"] = overrides
        results["variants"][name] = res
    out = Path(out_dir)
    write_results(out, "levers", results)
    _plot(out / "levers.png", results)
    final = {n: v["psnr_db"][steps] for n, v in results["variants"].items()}
    log("held-out PSNR at step {}: {} -> {}".format(
        steps, ", ".join(f"{n} {v:.2f} dB" for n, v in final.items()), out / "levers.json"))
    return results


def _plot(path: Path, results: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in results["variants"].items():
        steps = [int(s) for s in v["psnr_db"]]
        vals = list(v["psnr_db"].values())
        a.plot(steps, vals, marker="o", label=name)
        b.plot([s * v["ms_per_step"] / 1e3 for s in steps], vals, marker="o", label=name)
    a.set(xlabel="step", ylabel="held-out PSNR (dB)", title=f"reverse levers ({results['job']}), per step")
    b.set(xlabel="training seconds (median step time x steps)", ylabel="held-out PSNR (dB)", title="per second")
    a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
