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

app = typer.Typer(help="biflow: TARFlow forward flows and 1-NFE BiFlow reverse models, trained on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks that write JSON (and PNG) under an output directory.", no_args_is_help=True)
cluster_app = typer.Typer(help="Cluster helpers (render launcher YAMLs from Terraform outputs).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(cluster_app, name="cluster")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
