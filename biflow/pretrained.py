"""Trained models you can hand to someone: ``biflow export`` folders and :class:`BiFlow`.

An exported folder follows huggingface_hub's ``save_pretrained`` layout, so it
loads from a local path or, once pushed, from the Hub::

    model-folder/
      config.json          the reverse run's and the forward run's configs, the latent
                           codec (autoencoder id + per-channel statistics) for latent runs,
                           and where the weights came from (runs, steps, checkpoints)
      model.safetensors    EMA weights: reverse.* (the 1-NFE model) and flow.* (the forward flow;
                           left out with ``--no-flow``)
      reverse.yaml         the reverse run's config, as `biflow train` reads it
      forward.yaml         the forward run's config
      results.json         the evaluation figures, when an evaluation of these checkpoints was found
      README.md            the model card: how it was trained and how it scores

Every file is readable by others (0644; the folder 0755), and the folder is
written next to its final place and renamed into it, so a reader never sees half
of one. ``BiFlow.from_pretrained(folder)`` builds the models and loads the
weights strictly; sampling needs no training data (latent runs decode through the
autoencoder named in config.json, fetched once or given with ``autoencoder=``).

Three lines::

    from biflow import BiFlow
    model = BiFlow.from_pretrained("runs/quickstart/model")
    images = model.sample(16, guidance=1.0)   # (16, C, H, W) in [-1, 1]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from biflow.errors import UserError

FORMAT = "biflow-export"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PAPER = "https://arxiv.org/abs/2512.10953"


class BiFlow(nn.Module, PyTorchModelHubMixin, library_name="biflow", paper_url=PAPER,
             tags=["biflow", "normalizing-flows", "tarflow", "image-generation"]):
    """A trained BiFlow: the 1-NFE reverse model, optionally its forward flow, and the latent codec.

    ``reverse`` and ``forward`` are the runs' experiment configs as dicts (what ``config.json``
    holds); a forward-only export has ``reverse=None`` and samples with the flow's exact inverse.
    """

    def __init__(self, reverse: dict | None = None, forward: dict | None = None, latents: dict | None = None,
                 with_flow: bool = True, info: dict | None = None, autoencoder: str = "",
                 format: str = FORMAT, format_version: int = FORMAT_VERSION):
        super().__init__()
        from biflow.config import load_config
        from biflow.models import ReverseModel, build_flow
        from biflow.train.checkpoint import saved_config

        if format != FORMAT or format_version > FORMAT_VERSION:
            raise UserError(f"config.json: format {format!r} v{format_version}; this biflow reads {FORMAT} up to "
                            f"v{FORMAT_VERSION} (upgrade biflow)")
        if reverse is None and forward is None:
            raise UserError("config.json names neither a reverse nor a forward model")
        self.reverse_config = load_config(saved_config({"config": reverse})) if reverse else None
        self.forward_config = load_config(saved_config({"config": forward})) if forward else None
        self.latents, self.info, self.autoencoder = latents, dict(info or {}), autoencoder
        self.reverse = ReverseModel(self.reverse_config.reverse, self.reverse_config.flow) if reverse else None
        flow_cfg = (self.forward_config or self.reverse_config).flow
        self.flow = build_flow(flow_cfg) if with_flow and (forward or reverse is None) else None
        self._codec = None

    # -- what it is ---------------------------------------------------------------------------

    @property
    def config(self):
        """The experiment config of the model that samples: the reverse run's, else the forward run's."""
        return self.reverse_config or self.forward_config

    @property
    def flow_config(self):
        return self.flow.config if self.flow is not None else self.reverse_config.flow

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def codec(self):
        """The frozen autoencoder that decodes latent samples (loaded on first use), or None for pixels."""
        if self.latents is None:
            return None
        if self._codec is None or self._codec.device != self.device:
            from biflow.data.latents import LatentCodec

            self._codec = LatentCodec.from_info(self.latents, self.autoencoder, self.device)
        return self._codec

    # -- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, num: int = 16, guidance: float = 0.0, labels: Any = None, sampler: str = "",
               seed: int = 0, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """``num`` images (N, C, H, W) in [-1, 1] on the CPU, deterministic in ``seed``.

        ``sampler``: ``biflow`` (1 NFE; the default when there is a reverse model) or ``exact``
        (the flow's inverse + a Tweedie step; needs the flow). ``labels``: class ids, one per
        image (default: 0, 1, 2, ... cycling over the classes; ignored by unconditional models).
        Latent models return decoded images."""
        from biflow.sampling import generate

        sampler = sampler or ("biflow" if self.reverse is not None else "exact")
        if sampler not in ("biflow", "exact"):
            raise UserError(f"sampler={sampler!r}: allowed values: biflow, exact")
        if sampler == "biflow" and self.reverse is None:
            raise UserError("this is a forward (stage-1) model: sample with sampler='exact'")
        if self.flow is None and (sampler == "exact" or self.reverse_config.reverse.denoise == "tweedie"):
            raise UserError(f"sampler={sampler!r} needs the forward flow's weights, which this export left out "
                            "(export again without --no-flow)")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).flatten()
            if len(labels) != num:
                raise UserError(f"labels: {len(labels)} given for num={num} images")
        return generate(self.flow, self.reverse, sampler, num, guidance, batch_size, seed, self.device,
                        codec=self.codec, progress=progress, labels=labels, flow_config=self.flow_config)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        """Local folders load here, strictly (every tensor present, none extra) and quietly; hub ids
        go through huggingface_hub (download, then the same)."""
        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
        from safetensors.torch import load_model

        import inspect

        accepted = inspect.signature(cls.__init__).parameters
        model = cls(**{k: v for k, v in kwargs.items() if k in accepted})  # not the download options
        weights = Path(model_id) / WEIGHTS_FILE
        if not weights.is_file():
            raise UserError(f"{model_id}: no {WEIGHTS_FILE} (not a complete `biflow export` folder)")
        missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
        if missing or unexpected:
            raise UserError(f"{weights} does not match the models of {model_id}/{CONFIG_FILE} "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        if model.flow is not None:
            model.flow.after_load()
        return model.eval()

    @classmethod
    def from_run(cls, ref: str, storage: str = "", endpoint: str = "", region: str = "", forward: str = "",
                 with_flow: bool = True) -> "BiFlow":
        """The EMA models of a run name, run dir or checkpoint (a reverse run brings its forward run)."""
        from biflow.config import to_dict
        from biflow.train.checkpoint import load_pair as load_checkpoints

        flow_l, rev_l = load_checkpoints(ref, forward, storage, endpoint, region, with_flow=with_flow)
        main = rev_l or flow_l
        info = {"name": main.name, "stage": main.stage, "step": main.step, "checkpoint": main.uri}
        if rev_l is not None and flow_l.uri:
            info.update(forward_name=flow_l.name, forward_step=flow_l.step, forward_checkpoint=flow_l.uri)
        latents = main.latents or (flow_l.latents if flow_l else None)
        if latents is None and main.config.data.kind == "latents":  # a checkpoint from before they were recorded
            from biflow.data.latents import latent_info
            from biflow.data.shards import read_manifest

            data = main.config.data
            latents = latent_info(read_manifest(data.uri, data.endpoint, data.region), data.autoencoder)
        model = cls(reverse=to_dict(rev_l.config) if rev_l else None,
                    forward=to_dict(flow_l.config) if flow_l.model is not None else None,
                    latents=latents, with_flow=flow_l.model is not None, info=info)
        if model.reverse is not None:
            model.reverse.load_state_dict(rev_l.model.state_dict())
        if model.flow is not None:
            model.flow.load_state_dict(flow_l.model.state_dict())
            model.flow.after_load()
        return model.eval()

    def pair(self, uri: str = ""):
        """(flow, reverse or None) as :class:`~biflow.train.checkpoint.Loaded`, what evaluation takes;
        the flow's model is None when the export left its weights out."""
        from biflow.train.checkpoint import Loaded

        info, fwd_cfg = self.info, self.forward_config or self.reverse_config
        flow = Loaded(self.flow, fwd_cfg, "forward", int(info.get("forward_step", info.get("step", -1))),
                      uri, self.latents, str(info.get("forward_name", info.get("name", ""))))
        if self.reverse is None:
            return flow, None
        return flow, Loaded(self.reverse, self.reverse_config, "reverse", int(info.get("step", -1)), uri,
                            self.latents, str(info.get("name", "")))

    # -- saving -------------------------------------------------------------------------------

    def hub_config(self) -> dict[str, Any]:
        from biflow.config import to_dict

        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "reverse": to_dict(self.reverse_config) if self.reverse_config else None,
                "forward": to_dict(self.forward_config) if self.forward_config else None,
                "latents": self.latents, "with_flow": self.flow is not None, "info": self.info}

    def save_pretrained(self, save_directory: str | Path, *, results: dict | None = None,  # type: ignore[override]
                        **kwargs) -> Path:
        """The export folder (see the module docstring), written whole then renamed into place."""
        import yaml

        out = Path(save_directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            for name, cfg in (("reverse.yaml", self.reverse_config), ("forward.yaml", self.forward_config)):
                if cfg is not None:
                    from biflow.config import to_dict

                    (tmp / name).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if results is not None:
                (tmp / "results.json").write_text(json.dumps(results, indent=2))
            (tmp / "README.md").write_text(model_card(self, results, out))
            super().save_pretrained(tmp, config=self.hub_config(), **kwargs)
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)  # a model is for handing over: not the temp files' 0600
            if out.exists():
                shutil.rmtree(out)
            tmp.replace(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


# ---------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------


def _params(module: nn.Module | None) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M" if module is not None else "not included"


def model_card(model: BiFlow, results: dict | None, out: Path) -> str:
    """README.md of an export: what the model is, how to use it, how it was trained, how it scores."""
    from biflow import __version__

    cfg, fcfg, info = model.config, model.flow_config, model.info
    data = cfg.data
    kind = "BiFlow 1-NFE reverse model" + (" and its forward TARFlow" if model.flow is not None else "") \
        if model.reverse is not None else "TARFlow forward flow (exact-inverse sampling)"
    space = (f"latents of `{model.latents['autoencoder']}`" if model.latents else "pixels")
    rows = [("model", kind), ("data", f"`{data.uri}` ({space}), {fcfg.channels}x{fcfg.image_size}x{fcfg.image_size}"
                                       f", {fcfg.num_classes or 'no'} classes"),
            ("reverse model", f"{_params(model.reverse)} params, step {info.get('step')}, from `{info.get('checkpoint')}`"
             if model.reverse is not None else "none"),
            ("forward flow", f"{_params(model.flow)} params, step {info.get('forward_step', info.get('step'))}, from "
                             f"`{info.get('forward_checkpoint', info.get('checkpoint'))}`"),
            ("noise level", f"sigma = {fcfg.noise_std:g}"), ("exported by", f"biflow {__version__}")]
    if model.reverse is not None:
        r = model.reverse_config
        rows.insert(4, ("reverse training", f"{r.train.steps} steps, batch {r.train.batch_size}, lr {r.optim.lr:g}, "
                                            f"guidance up to {r.reverse.guidance_max:g}, perceptual weight "
                                            f"{r.reverse.perceptual_weight:g}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    lines = ["---", "library_name: biflow", "tags: [biflow, normalizing-flows, tarflow, image-generation]", "---", "",
             f"# {info.get('name') or out.name}", "", f"A {kind}, trained with biflow ([BiFlow]({PAPER}): a learned 1-NFE inverse of a normalizing flow).", "",
             "## Use", "", "```python", "from biflow import BiFlow",
             f'model = BiFlow.from_pretrained("{out}")',
             "images = model.sample(16, guidance=1.0)   # (16, C, H, W) in [-1, 1]", "```", "",
             f"or `biflow sample {out} --num 64`.", "", "## How it was trained", "", "| | |", "|---|---|", table, "",
             "## Evaluation", ""]
    if results:
        lines += [f"bits/dim {results.get('bpd', float('nan')):.3f}; denoising PSNR "
                  f"{results.get('recon_psnr_db') or float('nan'):.2f} dB; {results.get('num_samples')} samples per "
                  "sampler against held-out images.", "", "| sampler | FID | KID x1e3 | ms/img |", "|---|---|---|---|"]
        for key, e in results.get("samplers", {}).items():
            lines.append(f"| {key} | {e['fid']:.2f} | {1e3 * e['kid']:.2f} | {e['ms_per_image']:.2f} |")
        floor = results.get("real_vs_real")
        if floor:
            lines.append(f"| real vs real (floor) | {floor['fid']:.2f} | {1e3 * floor['kid']:.2f} | |")
    else:
        lines.append("No evaluation was found for these checkpoints: run `biflow evaluate` and export again "
                     "(or pass `--results`).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Export and loading by reference
# ---------------------------------------------------------------------------


def output_folder(kind: str, name: str, step: int) -> Path:
    """Where `biflow evaluate` / `biflow sample` write without --out: one folder per run and
    step (``runs/eval/<run>/step-<N>``), so evaluating another run never overwrites this one."""
    return Path("runs") / kind / (name or "model") / (f"step-{step}" if step >= 0 else "latest")


def load_pair(checkpoint: str, forward: str = "", storage: str = "", endpoint: str = "", region: str = "",
              device: str | torch.device = "cpu", with_flow: bool = True):
    """(forward flow, reverse model or None) as :class:`~biflow.train.checkpoint.Loaded`, from an
    export folder (or a single-file export) or, through :func:`biflow.train.checkpoint.load_pair`,
    a run or a checkpoint."""
    from biflow.train import checkpoint as ckpt_io

    if is_export(checkpoint):
        return load(checkpoint, device=device).pair(str(checkpoint))
    return ckpt_io.load_pair(checkpoint, forward, storage, endpoint, region, device, with_flow)


def is_export(ref: str | Path) -> bool:
    """A folder written by ``biflow export``, or a single-file export of earlier versions."""
    p = Path(str(ref)).expanduser()
    return (p.is_dir() and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()) or \
        (p.is_file() and p.suffix == ".safetensors")


def load(ref: str | Path, storage: str = "", endpoint: str = "", region: str = "", forward: str = "",
         autoencoder: str = "", device: str | torch.device = "cpu") -> BiFlow:
    """A :class:`BiFlow` from an export folder, a run name (under ``storage``), a run dir or a checkpoint."""
    p = Path(str(ref)).expanduser()
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        model = BiFlow.from_pretrained(p, autoencoder=autoencoder) if autoencoder else BiFlow.from_pretrained(p)
    elif p.is_file() and p.suffix == ".safetensors":
        model = _from_single_file(p)
    else:
        model = BiFlow.from_run(str(ref), storage, endpoint, region, forward)
    if autoencoder:
        model.autoencoder = autoencoder
    return model.to(device)


def _from_single_file(path: Path) -> BiFlow:
    """A one-file export of biflow before 0.2 (EMA weights of one stage, the config in the header)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != "biflow-ema":
        raise UserError(f"{path}: not a biflow export (no biflow-ema header); give an export folder, a run or "
                        "a checkpoint")
    config, stage = json.loads(header.get("config", "{}")), header.get("stage", "")
    info = {"name": path.stem, "stage": stage, "step": int(header.get("step") or -1), "checkpoint": header.get("source")}
    model = BiFlow(reverse=config if stage == "reverse" else None, forward=config if stage == "forward" else None,
                   with_flow=stage == "forward", info=info)
    if config.get("data", {}).get("kind") == "latents":
        from biflow.data.latents import latent_info
        from biflow.data.shards import read_manifest

        d = model.config.data
        model.latents = latent_info(read_manifest(d.uri, d.endpoint, d.region), d.autoencoder)
    state = {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}
    (model.reverse if stage == "reverse" else model.flow).load_state_dict(state)
    return model.eval()


def find_results(model: BiFlow, search: list[Path]) -> dict | None:
    """An evaluation of exactly these checkpoints: the first ``results.json`` among ``search``
    whose recorded checkpoints are the model's (same run and step)."""
    def tail(uri: Any) -> tuple[str, ...]:
        return tuple(str(uri or "").rstrip("/").split("/")[-2:])

    want = model.info.get("checkpoint")
    for path in search:
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        ck = results.get("checkpoint") or {}
        got = ck.get("reverse") if model.reverse is not None else ck.get("forward")
        if tail(got) == tail(want):
            return results
    return None


def export(ref: str, out: str | Path | None = None, storage: str = "", endpoint: str = "", region: str = "",
           forward: str = "", with_flow: bool = True, results: str | Path | None = None,
           log=print) -> Path:
    """``biflow export``: the self-contained folder of a run's (or checkpoint's) EMA models.

    ``out`` defaults to ``runs/models/<run name>``. ``results``: a ``results.json`` of
    ``biflow evaluate`` for the card; by default one is looked for where ``biflow evaluate``
    and the recipes write theirs."""
    model = BiFlow.from_run(ref, storage, endpoint, region, forward, with_flow=with_flow)
    name, step = model.info["name"], model.info["step"]
    out = Path(out) if out else Path("runs/models") / name
    if out.suffix == ".safetensors":
        out = out.with_suffix("")  # the single-file form of earlier versions: a folder of that name now
    if results:
        found = json.loads(Path(results).read_text())
    else:
        store = Path(storage) if storage and "://" not in storage else None
        search = [output_folder("eval", name, step) / "results.json"]
        if store is not None:
            search.append(store.parent / "eval" / "results.json")  # a recipe's layout: OUT/runs, OUT/eval
        found = find_results(model, search)
    path = model.save_pretrained(out, results=found)
    size = (path / WEIGHTS_FILE).stat().st_size / 1e6
    log(f"wrote {path}/ ({WEIGHTS_FILE} {size:.1f} MB: "
        + ", ".join(k for k in ("reverse", "flow") if getattr(model, k) is not None)
        + ("; latent codec " + model.latents["autoencoder"] if model.latents else "")
        + ("; with evaluation" if found else "; no evaluation found") + ")")
    return path
