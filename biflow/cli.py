"""The ``biflow`` command.

Each command is thin: it parses arguments and calls into the library, so the
same functions serve the CLI, the tests and Ray job entrypoints. Heavy imports
(torch, ray) happen inside the commands to keep ``biflow --help`` fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

HELP = {"help_option_names": ["-h", "--help"]}  # -h everywhere, as people type it
app = typer.Typer(help="biflow: TARFlow forward flows and 1-NFE BiFlow reverse models, trained on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, context_settings=HELP)
bench_app = typer.Typer(help="Benchmarks that write JSON (and PNG) under an output directory.", no_args_is_help=True,
                        context_settings=HELP)
cluster_app = typer.Typer(help="Cluster helpers (render launcher YAMLs from Terraform outputs).", no_args_is_help=True,
                          context_settings=HELP)
app.add_typer(bench_app, name="bench")
app.add_typer(cluster_app, name="cluster")


def _print_version(value: bool) -> None:
    if value:
        from biflow import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version_: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        help="Print the biflow version and exit.")) -> None:
    """biflow: TARFlow forward flows and 1-NFE BiFlow reverse models, trained on Ray."""


def friendly_errors(fn: Callable) -> Callable:
    """Turn expected user errors into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from biflow.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.steps=100 (repeatable).")
DEFAULT_STORAGE = "runs"  # ray.storage's default: where every command looks run names up
STORAGE_HELP = ("Run storage: local dir, s3:// or gs://bucket/prefix (default: $BIFLOW_STORAGE, which the fleet's "
                "nodes set to their bucket, else {default}).")


def StorageOption(default: str = f"{DEFAULT_STORAGE!r}"):  # noqa: N802 (a typer option factory)
    """--storage as every command takes it: one default, one environment variable."""
    return typer.Option("", "--storage", envvar="BIFLOW_STORAGE", show_default=False,
                        help=STORAGE_HELP.format(default=default))


def _lookup_storage(storage: str) -> str:
    return storage or DEFAULT_STORAGE


@app.command()
def version() -> None:
    """Print the biflow version."""
    from biflow import __version__

    typer.echo(__version__)


@cluster_app.command("render")
@friendly_errors
def cluster_render_cmd(
    terraform_output: Path = typer.Option(..., "--terraform-output", help="JSON from `terraform output -json`."),
    out: Path = typer.Option(..., "--out", help="Directory for the rendered <provider>.yaml."),
    provider: str = typer.Option("aws", "--provider", help="aws (infra/terraform/aws outputs) or gcp."),
    template: Optional[Path] = typer.Option(None, "--template", help="Template; default cluster/<provider>.yaml."),
) -> None:
    """Write a ready Ray cluster launcher YAML from Terraform outputs (checked with Ray's schema)."""
    from biflow.cluster import render

    target = render(terraform_output, out, provider=provider, template=template)
    typer.echo(f"wrote {target}  (next: ray up {target})")


@app.command()
@friendly_errors
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Where shards, runs and results go."),
    workers: int = typer.Option(0, help="Ray Train workers per stage (0 = automatic: on a machine with up to 4 cores, "
                                        "the jobs' 2 ranks under plain PyTorch DDP; else their 2 ZeRO-2 ranks)."),
    set_: Optional[List[str]] = SetOption,
    num_samples: int = typer.Option(0, help="Samples per sampler for FID (0 = jobs/eval/quickstart.yaml's)."),
) -> None:
    """Fashion-MNIST end to end: shards, forward flow, reverse model, samples, FID, speed."""
    from biflow.quickstart import quickstart as run_quickstart

    run_quickstart(out, workers=workers, overrides=set_, num_samples=num_samples)


@app.command()
@friendly_errors
def recipe(
    path: Path = typer.Argument(..., help="Recipe YAML, e.g. jobs/eval/fashion-mnist.yaml."),
    out: Optional[Path] = typer.Option(None, help="Where shards, runs and results go (default runs/<name>)."),
    workers: int = typer.Option(0, help="Ray Train workers per stage (0 = the recipe's)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a job key of both stages (train.steps=100) or, prefixed with recipe., a "
                            "recipe key (recipe.evaluate.num_samples=64, recipe.dataset.limit=512). Repeatable."),
    num_samples: int = typer.Option(0, help="Samples per sampler for FID (0 = the recipe's)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when a goal of the recipe is not met."),
) -> None:
    """Dataset -> forward flow -> reverse model -> evaluation, with the recipe's goals checked."""
    from biflow.recipe import load_recipe, run_recipe, split_overrides

    recipe_over, job_over = split_overrides(set_)
    spec = load_recipe(path, recipe_over)
    ev = {"num_samples": num_samples, "num_eval_images": num_samples} if num_samples else None
    results = run_recipe(spec, out, workers=workers or None, overrides=job_over, evaluate_opts=ev)
    if check and not all(g["met"] for g in results["goals"].values()):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def evaluate(
    checkpoint: str = typer.Argument(..., help="Reverse (or forward) run name, run dir, checkpoint URI or "
                                               "`biflow export` folder."),
    out: Optional[Path] = typer.Option(None, help="Output directory (results.json, PNG grids); default "
                                                  "runs/eval/<run>/step-<N>."),
    forward: str = typer.Option("", help="Forward checkpoint; default: the reverse run's train.forward_checkpoint."),
    storage: str = StorageOption(),
    endpoint: str = typer.Option("", help="Storage endpoint: S3-compatible store or GCS emulator."),
    num_samples: int = typer.Option(2000, help="Samples per sampler and guidance for FID and KID."),
    num_reference: int = typer.Option(10_000, help="Held-out images of the FID/KID reference, cached (0 = all)."),
    num_eval_images: int = typer.Option(1000, help="Held-out images for bits/dim and the PSNRs."),
    guidance: Optional[List[float]] = typer.Option(None, "--guidance", help="Guidance scales (repeatable)."),
    exact_annealed: bool = typer.Option(False, help="Exact sampler: ramp guidance over the decode (ml-tarflow)."),
    batch_size: int = typer.Option(100, help="Generation batch size."),
    workers: int = typer.Option(0, help="Ray workers for generation (0 = this process)."),
    data_uri: str = typer.Option("", help="Override the run's data.uri for reference images."),
    reference_uri: str = typer.Option("", help="Latent runs: real image shards for FID (default: the latents' source)."),
    eval_split: str = typer.Option("", help="Held-out split (default: the run's data.eval_split)."),
    device: str = typer.Option("auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N."),
) -> None:
    """FID and KID of BiFlow 1-NFE and the exact inverse (with the real-vs-real floor), bpd,
    denoising and inversion PSNR, ms/img, grids.

    Latent runs are decoded through their autoencoder and compared with real pixel images."""
    from biflow.evaluate import EvalOptions, evaluate as run_evaluate

    opts = EvalOptions(num_samples=num_samples, num_reference=num_reference, guidance=list(guidance or [0.0]),
                       batch_size=batch_size, num_eval_images=num_eval_images, workers=workers, data_uri=data_uri,
                       reference_uri=reference_uri, eval_split=eval_split, exact_annealed=exact_annealed)
    run_evaluate(checkpoint, out, opts, forward=forward, storage=_lookup_storage(storage), endpoint=endpoint,
                 device=device,
                 progress=sys.stderr.isatty())


@app.command()
@friendly_errors
def sample(
    checkpoint: str = typer.Argument(..., help="Reverse run (BiFlow) or forward run (exact inverse): run name, run "
                                               "dir, checkpoint URI or `biflow export` folder."),
    out: Optional[Path] = typer.Option(None, help="Output directory (PNG grid + .npz of uint8 images); default "
                                                  "runs/samples/<run>/step-<N>."),
    num: int = typer.Option(64, help="Number of samples."),
    guidance: float = typer.Option(0.0, help="Guidance scale w."),
    sampler: str = typer.Option("biflow", help="biflow (1 NFE) or exact (the flow's inverse + Tweedie)."),
    forward: str = typer.Option("", help="Forward checkpoint; default: the reverse run's train.forward_checkpoint."),
    storage: str = StorageOption(),
    endpoint: str = typer.Option("", help="Storage endpoint: S3-compatible store or GCS emulator."),
    autoencoder: str = typer.Option("", help="Latent models: the AutoencoderKL (local folder or hub id) instead of "
                                             "the one the model names."),
    seed: int = typer.Option(0, help="Seed of the noise and the labels."),
    device: str = typer.Option("auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N."),
) -> None:
    """Draw samples from a trained run or an exported model (no training data needed); latent models are decoded
    through their autoencoder."""
    from biflow.evaluate import sample_images

    sample_images(checkpoint, out, num=num, guidance=guidance, sampler=sampler, forward=forward,
                  storage=_lookup_storage(storage), endpoint=endpoint, seed=seed, log=typer.echo, device=device,
                  progress=sys.stderr.isatty(), autoencoder=autoencoder)


@bench_app.command("sampling")
@friendly_errors
def bench_sampling_cmd(
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for JSON and PNG."),
    preset: str = typer.Option("cpu-256tok", help="cpu-256tok (64x64x3, patch 4, 8 blocks), b2-latent, tiny."),
    guidance: float = typer.Option(1.0, help="Guidance scale for the guided rows."),
    batch: Optional[List[int]] = typer.Option(None, "--batch", help="Batch sizes (repeatable); default per preset."),
    reps: int = typer.Option(3, help="Timed repetitions (median) of the fast paths."),
) -> None:
    """BiFlow 1-NFE vs the exact inverse (+Tweedie, +CFG), and KV cache vs recompute."""
    from biflow.bench import bench_sampling

    bench_sampling(out, preset=preset, guidance=guidance, batch_sizes=tuple(batch) if batch else None, reps=reps)


@bench_app.command("perceptual")
@friendly_errors
def bench_perceptual_cmd(
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for perceptual.json and .png."),
    job: str = typer.Option("quickstart", help="Job pair under jobs/: <job>-reverse.yaml and <job>-forward.yaml."),
    rounds: int = typer.Option(5, help="Interleaved timing rounds."),
    batch: int = typer.Option(0, help="Rows per step (0 = the job's batch per rank)."),
) -> None:
    """ms per reverse step without the perceptual term, with the job's setting, and at 299 px with every tap."""
    from biflow.bench.perceptual import bench_perceptual

    bench_perceptual(out, job=job, rounds=rounds, batch=batch)


@bench_app.command("levers")
@friendly_errors
def bench_levers_cmd(
    forward: str = typer.Option(..., help="Trained forward flow: run name under --storage or a checkpoint path."),
    storage: str = StorageOption(),
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for levers.json and .png."),
    job: str = typer.Option("quickstart", help="Reverse job under jobs/: <job>-reverse.yaml (the variants' base)."),
    steps: int = typer.Option(300, help="Optimizer steps per variant."),
    eval_every: int = typer.Option(100, help="Held-out PSNR every N steps."),
    batch: int = typer.Option(0, help="Rows per step (0 = the job's train.batch_size)."),
    variant: Optional[list[str]] = typer.Option(None, help="Only these variants (default: all)."),
) -> None:
    """Reverse-model levers (z skip, curriculum, guidance, perceptual) on cached flow trajectories: held-out PSNR at fixed steps."""
    from biflow.bench.levers import DEFAULT_VARIANTS, bench_levers

    unknown = [v for v in variant or [] if v not in DEFAULT_VARIANTS]
    if unknown:
        raise typer.BadParameter(f"unknown variant(s) {unknown}; allowed: {', '.join(DEFAULT_VARIANTS)}")
    chosen = {k: v for k, v in DEFAULT_VARIANTS.items() if not variant or k in variant}
    bench_levers(forward, out, job=job, steps=steps, eval_every=eval_every, batch=batch, variants=chosen,
                 storage=_lookup_storage(storage), log=lambda msg: print(msg, flush=True))


@bench_app.command("flow-ref")
@friendly_errors
def bench_flow_ref_cmd(
    reference: Path = typer.Option(..., help="A checkout of https://github.com/apple/ml-tarflow (its transformer_flow.py)."),
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for flow-ref.json and .png."),
    shape: Optional[list[str]] = typer.Option(None, help="Only these shapes (default: all of biflow.bench.flow_reference.SHAPES)."),
    steps: int = typer.Option(500, help="Optimizer steps per model."),
    batch: int = typer.Option(32, help="Images per step."),
    seeds: int = typer.Option(1, help="Seeds per shape (the gap is averaged over them)."),
    sampling: bool = typer.Option(False, "--sampling", help="Time the two exact samplers instead "
                                                            "(flow-ref-sampling.json; no training)."),
    reps: int = typer.Option(7, help="--sampling: timed calls per sampler and batch (the median is kept)."),
) -> None:
    """Our forward flow as shipped against ml-tarflow's model: held-out NLL and step time at the same budget."""
    from biflow.bench.flow_reference import bench_flow_ref_sampling, bench_flow_reference

    if sampling:
        bench_flow_ref_sampling(reference, out, shapes=shape, reps=reps, log=lambda msg: print(msg, flush=True))
        return
    bench_flow_reference(reference, out, shapes=shape, steps=steps, batch=batch, seeds=seeds,
                         log=lambda msg: print(msg, flush=True))


@bench_app.command("train")
@friendly_errors
def bench_train_cmd(
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for train.json and train.png."),
    preset: str = typer.Option("quickstart", help="quickstart (the quickstart forward flow) or tiny."),
    workers: int = typer.Option(2, help="Ray Train workers (1 CPU each); the plain loop gets as many threads."),
    window: Optional[int] = typer.Option(None, help="Optimizer steps per timing window (default per preset)."),
    windows: Optional[int] = typer.Option(None, help="Timed windows after one warm-up window (default per preset)."),
    memory: bool = typer.Option(True, help="Measure per-rank model-state memory, ZeRO-3 vs ZeRO-0."),
    mfu: bool = typer.Option(True, help="Measure bf16 forward-flow training MFU (CUDA only)."),
    peak_tflops: Optional[float] = typer.Option(None, help="bf16 peak TFLOP/s of the GPU (default: known GPUs)."),
    layouts: bool = typer.Option(True, help="Also time one worker with every core, DDP and ZeRO-2 (the "
                                            "quickstart's layout on a small machine is the 2 x 1 DDP run)."),
) -> None:
    """ZeRO-2 and DDP under Ray Train vs a plain PyTorch loop (samples/s), forward and reverse stage, a step's
    breakdown, ZeRO-3 vs ZeRO-0 memory, GPU MFU."""
    from biflow.bench import bench_train

    bench_train(out, preset=preset, workers=workers, window=window, windows=windows, memory=memory, mfu=mfu,
                peak_tflops=peak_tflops, layouts=layouts)


@bench_app.command("all")
@friendly_errors
def bench_all_cmd(out: Path = typer.Option(Path("runs/bench"), help="Output directory for every JSON and PNG.")) -> None:
    """The whole suite: sampling, data and training benchmarks, one after another."""
    from biflow.bench import bench_sampling, bench_train
    from biflow.bench.data import bench_data

    bench_sampling(out)
    train_step, desc = _flow_train_step(64)
    bench_data(out, train_step=train_step, model_desc=desc)
    bench_train(out)
    typer.echo(f"benchmarks written to {out}/")


def _split_list(values: Optional[List[str]]) -> Optional[List[str]]:
    out = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    return out or None


@app.command("prepare-data")
@friendly_errors
def prepare_data_cmd(
    paths: List[str] = typer.Argument(..., metavar="[SOURCE] OUT", show_default=False,
                                      help="SOURCE: the images (a folder); fashion-mnist implies "
                                           "/usr/share/datasets/fashion-mnist, so OUT alone will do. OUT: the shard "
                                           "root: local path, file:///path, s3:// or gs://bucket/prefix."),
    format: str = typer.Option(..., "--format", help="imagenet, folder or fashion-mnist."),
    source_opt: str = typer.Option("", "--source", help="SOURCE as an option (instead of the first argument)."),
    image_size: int = typer.Option(0, help="Resize shorter side + centre crop to N (0 = keep source size)."),
    shard_size: float = typer.Option(128.0, "--shard-size", help="Target shard size in MB."),
    split: Optional[List[str]] = typer.Option(None, "--split", help="Splits to convert (repeatable or comma list)."),
    endpoint: str = typer.Option("", help="Storage endpoint (S3-compatible or GCS emulator), e.g. http://127.0.0.1:9000."),
    region: str = typer.Option("", help="S3 region."),
    limit: int = typer.Option(0, help="Records per split (0 = all); a class-mixed prefix."),
    channels: int = typer.Option(0, help="1 (grayscale) or 3 (RGB); 0 = the format's default."),
    min_shards: int = typer.Option(8, help="At least this many shards per split (parallelism), >=256 records each."),
    force: bool = typer.Option(False, help="Rewrite even when the manifest is up to date."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray instance (default: all)."),
) -> None:
    """Convert images into parquet shards + manifest.json (written last) on Ray Data:
    `biflow prepare-data SOURCE OUT --format imagenet`, or `biflow prepare-data OUT --format fashion-mnist`."""
    from biflow.data.shards import prepare_data
    from biflow.errors import UserError

    if len(paths) > 2:
        raise UserError(f"prepare-data takes SOURCE OUT (or OUT alone), got {len(paths)} paths: {' '.join(paths)}")
    source, out = (paths[0], paths[1]) if len(paths) == 2 else ("", paths[0])
    if source and source_opt and source != source_opt:
        raise UserError(f"two sources: {source!r} (argument) and --source {source_opt!r}; give one")
    source = source or source_opt

    prepare_data(source, out, format, image_size=image_size, shard_size_mb=shard_size, splits=_split_list(split),
                 endpoint=endpoint, region=region, limit=limit, channels=channels, min_shards=min_shards,
                 force=force, num_cpus=num_cpus)


@app.command("prepare-latents")
@friendly_errors
def prepare_latents_cmd(
    source: str = typer.Argument(..., help="Image shard root (from prepare-data)."),
    out: str = typer.Argument(..., help="Latent shard root: local path, s3:// or gs://bucket/prefix."),
    autoencoder: str = typer.Option(..., help="diffusers AutoencoderKL: local folder or hub id."),
    split: Optional[List[str]] = typer.Option(None, "--split", help="Splits (default: all of the source)."),
    image_size: int = typer.Option(0, help="Resize/crop images to N before encoding (0 = stored size)."),
    batch_size: int = typer.Option(32, help="Images per encoder call."),
    dtype: str = typer.Option("float16", help="Stored latent dtype: float16 or float32."),
    endpoint: str = typer.Option("", help="Storage endpoint (S3-compatible store or GCS emulator)."),
    region: str = typer.Option("", help="S3 region."),
    limit: int = typer.Option(0, help="Records per split (0 = all)."),
    force: bool = typer.Option(False, help="Rewrite even when up to date."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray instance (default: all)."),
) -> None:
    """Encode image shards into autoencoder latent shards (GPU actors when present)."""
    from biflow.data.latents import prepare_latents

    prepare_latents(source, out, autoencoder, splits=_split_list(split), endpoint=endpoint, region=region,
                    image_size=image_size, batch_size=batch_size, dtype=dtype, limit=limit, force=force,
                    num_cpus=num_cpus)


@bench_app.command("data")
@friendly_errors
def bench_data_cmd(
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for the JSON."),
    source: str = typer.Option("", help="Fashion-MNIST folder (default: the Debian path), or 'synthetic' "
                               "(64x64 RGB JPEGs, also used when Fashion-MNIST is absent)."),
    images: int = typer.Option(10000, help="Images to convert and stream."),
    batch_size: int = typer.Option(64, help="Batch size of the consumer."),
    steps: int = typer.Option(60, help="Training steps for the data-wait measurement."),
    model: str = typer.Option("auto", help="auto (quickstart TARFlow if importable), standin."),
    num_cpus: int = typer.Option(2, help="CPUs for the local Ray instance (same cores as the PIL loop)."),
) -> None:
    """Pipeline images/s from a local S3 server vs a single-process PIL loop, and data-wait fraction."""
    from biflow.bench.data import bench_data

    train_step, desc = (None, "") if model == "standin" else _flow_train_step(batch_size)
    bench_data(out, source=source, images=images, batch_size=batch_size, steps=steps, train_step=train_step,
               model_desc=desc, num_cpus=num_cpus)


def _flow_train_step(batch_size: int):
    """One NLL step of the default (quickstart-sized) TARFlow on 28x28x1, or the
    stand-in when the model code is not importable."""
    try:
        import torch

        from biflow.config import FlowConfig
        from biflow.losses import forward_loss
        from biflow.models import build_flow
    except ImportError:
        return None, ""
    cfg = FlowConfig()
    flow = build_flow(cfg)
    opt = torch.optim.AdamW(flow.parameters(), 3e-4)

    def step(x, y):
        loss, _ = forward_loss(flow, x, y, cfg)  # the training objective: noise, label drop, NLL per dim
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    params = sum(p.numel() for p in flow.parameters())
    return step, (f"TARFlow FlowConfig() defaults: {cfg.image_size}x{cfg.image_size}x{cfg.channels}, patch "
                  f"{cfg.patch_size}, width {cfg.width}, {cfg.num_blocks}x{cfg.depth} layers, "
                  f"{params / 1e6:.2f}M params, AdamW, batch {batch_size}")


@app.command()
@friendly_errors
def train(
    args: Optional[List[str]] = typer.Argument(None, metavar="[STAGE] CONFIG", show_default=False,
                                               help="The job YAML, e.g. jobs/quickstart-forward.yaml; its stage: key "
                                                    "says which stage. STAGE (forward or reverse), when given, must "
                                                    "agree with it."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The job YAML as an option (the older form)."),
    set_: Optional[List[str]] = SetOption,
    name: str = typer.Option("", help="Run name (default: the config's name). Rerunning a name resumes it."),
    storage: str = StorageOption("the job's ray.storage"),
    address: str = typer.Option("", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
    workers: int = typer.Option(0, help="Ray Train workers (default: ray.workers)."),
) -> None:
    """Train one stage with Ray Train + DeepSpeed; checkpoints and TensorBoard logs go to the run storage.

    `biflow train jobs/quickstart-forward.yaml` (the file's stage: key picks the stage); `biflow train forward
    jobs/quickstart-forward.yaml` and `biflow train forward -c jobs/quickstart-forward.yaml` do the same."""
    from biflow.config import ConfigError, load_config, read_yaml

    stage, config = _stage_and_config(list(args or []), config)
    written = read_yaml(config).get("stage")
    if stage is None:
        if written not in ("forward", "reverse"):
            raise ConfigError(f"{config} has no stage: forward|reverse key; give the stage: "
                              f"`biflow train forward {config}` or `biflow train reverse {config}`")
        stage = written
    if stage not in ("forward", "reverse"):
        raise ConfigError(f"stage {stage!r}: allowed values: forward, reverse")
    if written is not None and written != stage:  # the argument must not silently override the file
        raise ConfigError(f"`biflow train {stage}` but {config} says stage: {written}; "
                          f"run `biflow train {config}`, or change the file's stage")
    cfg = load_config(config, [*(set_ or []), f"stage={stage}"])
    from biflow.train import fit

    result = fit(cfg, name or None, storage or None, address or None, workers=workers or None)
    metrics = result.metrics or {}
    typer.echo(f"{stage} run {cfg.name!r} finished at step {metrics.get('step', '?')}"
               f" ({metrics.get('skipped_steps', 0)} skipped steps)")
    if result.checkpoint is not None:
        typer.echo(f"checkpoint: {result.checkpoint.path}")
    typer.echo(f"TensorBoard: tensorboard --logdir {result.path}/tensorboard")


def _config_arg(args: list[str], config: Optional[Path], command: str) -> Path:
    """The YAML of a command, given as its argument (the form every command shares) or with -c."""
    from biflow.errors import UserError

    if config is not None and args:
        raise UserError(f"`biflow {command}` got the YAML twice ({' '.join(args)} and -c {config}); give it once")
    if config is None and not args:
        raise UserError(f"`biflow {command}` needs its YAML: `biflow {command} FILE.yaml`")
    if len(args) > 1:
        raise UserError(f"`biflow {command}` takes one YAML, got {' '.join(args)}")
    return config if config is not None else Path(args[0])


def _stage_and_config(args: list[str], config: Optional[Path]) -> tuple[Optional[str], Path]:
    """`train [STAGE] CONFIG` or `train STAGE -c CONFIG`: (stage or None, config)."""
    from biflow.errors import UserError

    if config is None and len(args) == 1 and args[0] in ("forward", "reverse"):
        raise UserError(f"`biflow train {args[0]}` needs the job YAML: `biflow train {args[0]} FILE.yaml`")
    if len(args) > 2:
        raise UserError(f"`biflow train` takes [STAGE] CONFIG, got {' '.join(args)}")
    first_is_yaml = bool(args) and (args[0].endswith((".yaml", ".yml")) or Path(args[0]).is_file())
    stage = args[0] if (len(args) == 2 or (config is not None and args and not first_is_yaml)) else None
    return stage, _config_arg(args[1:] if stage is not None else args, config, "train")


@app.command()
@friendly_errors
def submit(
    job: Path = typer.Argument(..., help="Job YAML, e.g. jobs/imagenet256-b2-forward.yaml."),
    address: str = typer.Option("", help="Cluster dashboard URL, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)."),
    set_: Optional[List[str]] = SetOption,
    follow: bool = typer.Option(True, help="Follow the job's logs until it ends."),
    upload_code: bool = typer.Option(False, help="Ship this checkout's biflow package with the job (py_modules), "
                                                 "over the one in the cluster's image: for trying local changes."),
    entrypoint_num_cpus: Optional[float] = typer.Option(None, help="CPUs reserved for the job's driver."),
    entrypoint_num_gpus: Optional[float] = typer.Option(None, help="GPUs reserved for the job's driver."),
    entrypoint_resources: str = typer.Option("", help='Custom resources of the driver, JSON: \'{"head": 1}\'.'),
    runtime_env: str = typer.Option("", help="Extra runtime_env: a YAML/JSON file or an inline JSON mapping "
                                             "(env_vars are merged key by key)."),
) -> None:
    """Submit a training job to a Ray cluster (token auth from RAY_AUTH_TOKEN or ~/.ray/auth_token).

    The submission id derives from the run's storage and name: resubmitting a running run reports it."""
    from biflow.submit import submit as run_submit

    run_submit(job, address, set_, follow=follow, upload_code=upload_code, log=typer.echo,
               entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
               entrypoint_resources=_mapping_option("--entrypoint-resources", entrypoint_resources),
               runtime_env=_mapping_option("--runtime-env", runtime_env))


def _mapping_option(flag: str, value: str) -> dict | None:
    """A mapping given inline (JSON/YAML) or as a YAML/JSON file path; errors name the flag."""
    import yaml

    from biflow.errors import UserError

    if not value:
        return None
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{flag}: not valid JSON/YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag}: expected a mapping (or a file holding one), got {value!r}")
    return data


@app.command("tune")
@friendly_errors
def tune_cmd(
    args: Optional[List[str]] = typer.Argument(None, metavar="CONFIG", show_default=False,
                                               help="Search YAML, e.g. jobs/tune/smoke.yaml."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The search YAML as an option (the older "
                                                                         "form)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a search key (num_samples=4) or a base job key (base.train.steps=100)."),
    name: str = typer.Option("", help="Search name (default: the YAML's name). Rerunning a name resumes it."),
    storage: str = StorageOption("the base job's ray.storage"),
    address: str = typer.Option("", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
    out: Optional[Path] = typer.Option(None, help="Results directory (default: STORAGE/NAME/results)."),
) -> None:
    """Ray Tune search (Optuna + ASHA) over noise level, guidance and loss weights; writes best.yaml."""
    from biflow.tune import search

    config = _config_arg(list(args or []), config, "tune")
    summary = search(config, set_, name=name, storage=storage, address=address, out=out, log=typer.echo)
    if summary.get("best") is None:
        from biflow.errors import UserError

        raise UserError(f"search {summary['name']!r}: no trial produced {summary['metric']!r} "
                        f"(see {summary['results']}/trials.csv)")


@app.command("export")
@friendly_errors
def export_cmd(
    checkpoint: str = typer.Argument(..., help="Run name, run dir or checkpoint dir/URI (the latest checkpoint of a "
                                               "run)."),
    out: Optional[Path] = typer.Argument(None, help="The folder to write (default runs/models/<run>)."),
    storage: str = StorageOption(),
    endpoint: str = typer.Option("", help="Storage endpoint: S3-compatible store or GCS emulator."),
    forward: str = typer.Option("", help="Forward checkpoint; default: the reverse run's train.forward_checkpoint."),
    flow: bool = typer.Option(True, "--flow/--no-flow", help="Include the forward flow's weights (needed by the "
                                                             "exact sampler and evaluation; 1-NFE sampling works "
                                                             "without them)."),
    results: Optional[Path] = typer.Option(None, help="A results.json of `biflow evaluate` for the model card "
                                                      "(default: the evaluation of these checkpoints, if found)."),
) -> None:
    """Write a self-contained model folder: EMA weights (reverse + flow), both configs, the latent codec, a
    README card. Load it with `BiFlow.from_pretrained(folder)`, `biflow sample folder` or `biflow evaluate folder`."""
    from biflow.pretrained import export

    export(checkpoint, out, _lookup_storage(storage), endpoint, forward=forward, with_flow=flow, results=results,
           log=typer.echo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
