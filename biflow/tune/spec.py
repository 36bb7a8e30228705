"""The search spec (``jobs/tune/*.yaml``): typed sections, loading and
validation. Everything that can be wrong with a search fails here, before any
trial starts; the format is described in :mod:`biflow.tune`."""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from biflow.config import (ConfigError, ExperimentConfig, apply_overrides, from_dict, load_config, read_yaml,
                           set_key)

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")
STAGE_ORDER = {"forward": ["forward"], "reverse": ["reverse"], "both": ["forward", "reverse"]}
FIXED_KEYS = ("name", "stage", "train.forward_checkpoint", "train.steps", "train.checkpoint_every")



@dataclass
class EvalSettings:
    """Settings of the FID objective that are not training settings (``eval.*`` in a space)."""

    guidance: float = 0.0  # sampling guidance scale w of the 1-NFE samples


@dataclass
class SchedulerSpec:
    kind: Literal["asha", "none"] = "asha"
    metric: str = ""  # metric ASHA compares at its rungs; default: the objective, or loss for fid
    grace_period: int = 1  # reports before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int = 0  # 0: every report of a full trial (ASHA stops trials at max_t)

    def validate(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1 or self.max_t < 0:
            raise ConfigError("scheduler: grace_period must be >= 1, reduction_factor > 1 and max_t >= 0")


@dataclass
class ResourceSpec:
    """Per-trial resources; non-zero values replace the base job's ``ray.*``."""

    workers: int = 0  # Ray Train workers (DeepSpeed ranks) per trial
    cpus_per_worker: float = 0.0
    use_gpu: Literal["", "auto", "yes", "no"] = ""
    trial_cpus: float = 0.5  # the trial function itself (drives the trainer, computes FID)
    trial_gpus: float = 0.0


@dataclass
class SearchSpec:
    name: str = ""
    base: Any = None  # job YAML path or inline mapping: the searched stage (stage both: the reverse job)
    forward: Any = None  # forward job for stage both (default: base), or to train once for a reverse search
    overrides: list = field(default_factory=list)  # KEY=VALUE applied to every base job, like --set base.KEY=VALUE
    stage: Literal["forward", "reverse", "both"] = "forward"
    space: dict = field(default_factory=dict)
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 8
    search: Literal["optuna", "random", "grid"] = "optuna"
    seed: int = 0
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    fid_samples: int = 64
    fid_batch_size: int = 64
    storage: str = ""  # default: the base job's ray.storage
    storage_endpoint: str = ""

    def validate(self) -> None:
        if self.base is None:
            raise ConfigError("base: required: the job YAML (path or mapping) of the searched stage")
        if not isinstance(self.space, dict) or not self.space:
            raise ConfigError("space: required: a mapping of dotted config keys to distributions, "
                              "e.g. flow.noise_std: {loguniform: [0.02, 0.5]}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.fid_samples < 2 or self.fid_batch_size < 1:
            raise ConfigError("fid_samples must be >= 2 and fid_batch_size >= 1")
        if self.max_concurrent < 0:
            raise ConfigError(f"max_concurrent must be >= 0, got {self.max_concurrent}")
        self.scheduler.validate()
        if not isinstance(self.overrides, list) or not all(isinstance(o, str) for o in self.overrides):
            raise ConfigError(f"overrides: expected a list of KEY=VALUE strings, got {self.overrides!r}")


@dataclass
class Param:
    key: str
    dist: str
    args: list

    @property
    def target(self) -> str:
        return "eval" if self.key.startswith("eval.") else ("forward" if self.key.startswith("flow.") else "main")


@dataclass
class Plan:
    """Everything a trial needs, resolved on the driver (plain data: it travels to trial actors)."""

    name: str
    stages: list[str]
    stage_bases: dict[str, dict]  # stage -> experiment dict (paths made absolute)
    params: list[Param]
    metric: str
    mode: str
    runs_storage: str
    storage_endpoint: str
    forward_checkpoint: str = ""  # reverse-only search: the one frozen forward checkpoint
    fid_samples: int = 64
    fid_batch_size: int = 64


# ---------------------------------------------------------------------------
# Loading and validation: everything fails here, before any trial starts
# ---------------------------------------------------------------------------


def _read_yaml(source: Any, what: str, relative_to: Path | None) -> dict:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    if not isinstance(source, (str, Path)) or not str(source):
        raise ConfigError(f"{what}: expected a job YAML path or a mapping, got {source!r}")
    path = Path(source)
    if not path.is_file() and relative_to is not None and (relative_to / path).is_file():
        path = relative_to / path
    return read_yaml(path, what)


def set_dotted(data: dict, key: str, value: Any) -> None:
    set_key(data, key.split("."), value, key)


def _field_leaf(key: str, where: str) -> None:
    """Check a dotted key names a settable field of the experiment (or ``eval.*``)."""
    parts = key.split(".")
    cls: Any = EvalSettings if parts[0] == "eval" else ExperimentConfig
    rest = parts[1:] if parts[0] == "eval" else parts
    path = "eval" if parts[0] == "eval" else ""
    if not rest:
        raise ConfigError(f"{where}: {key!r} is a section, not a parameter")
    for i, part in enumerate(rest):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            here = f"{path}." if path else ""
            raise ConfigError(f"{where}: unknown parameter {key!r} ({here}{part} is not a config field; "
                              f"allowed here: {', '.join(here + n for n in names)})")
        path = f"{path}.{part}" if path else part
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            if i == len(rest) - 1:
                raise ConfigError(f"{where}: {key!r} is a section, not a parameter")
            cls = tp
        elif i != len(rest) - 1:
            raise ConfigError(f"{where}: unknown parameter {key!r} ({path} is not a section)")
    if key in FIXED_KEYS or key.startswith("ray."):
        raise ConfigError(f"{where}: {key!r} cannot be searched (set it in the base job; trial resources go in "
                          f"'resources:'); ASHA compares trials at equal steps")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_param(key: str, spec: Any) -> Param:
    """One ``space`` entry: ``{uniform: [lo, hi]}``, ``{choice: [a, b]}``, ... Raises naming the key."""
    where = f"space.{key}"
    _field_leaf(key, where)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution such as {{uniform: [0.0, 1.0]}}; "
                          f"allowed distributions: {', '.join(DISTRIBUTIONS)}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {dist} needs a non-empty list of values, got {args!r}")
        return Param(key, dist, list(args))
    if not isinstance(args, list) or len(args) != 2 or not all(is_number(a) for a in args):
        raise ConfigError(f"{where}: {dist} needs [low, high] (two numbers), got {args!r}")
    low, high = args
    if low >= high:
        raise ConfigError(f"{where}: empty range: {dist} low={low} must be < high={high} "
                          f"(use choice for a single value)")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
    return Param(key, dist, [low, high])


def _param_values(p: Param) -> list:
    """Values that stand for the whole distribution in the up-front type check
    (uniform draws are floats: an integer field must use randint or choice)."""
    if p.dist in ("uniform", "loguniform"):
        return [float(a) for a in p.args]
    return list(p.args)


def _check_values(params: list[Param], bases: dict[str, dict], stages: list[str]) -> None:
    """Every endpoint / choice must make a valid config (type, range): checked now, not in trial 7."""
    for p in params:
        for value in _param_values(p):
            if p.target == "eval":
                try:
                    from_dict(EvalSettings, {p.key.split(".", 1)[1]: value}, "eval")
                except ConfigError as exc:
                    raise ConfigError(f"space.{p.key}: value {value!r}: {exc}") from None
                continue
            for stage in stages_for(p, stages):
                data = copy.deepcopy(bases[stage])
                set_dotted(data, p.key, value)
                data["stage"] = stage
                if stage == "reverse":
                    data.setdefault("train", {})["forward_checkpoint"] = "checked-later"
                try:
                    load_config(data)
                except ConfigError as exc:
                    raise ConfigError(f"space.{p.key}: value {value!r} makes an invalid config: {exc}") from None


def stages_for(p: Param, stages: list[str]) -> list[str]:
    """Which trained stage a parameter goes to: flow.* to the forward job, the rest to the last stage."""
    if p.target == "eval":
        return []
    if p.target == "forward" and "forward" in stages:
        return ["forward"] if len(stages) > 1 else stages
    return [stages[-1]]


def absolute(data: dict) -> dict:
    """Local paths made absolute: Tune runs trials in their own working directory."""
    data = copy.deepcopy(data)

    def fix(section: str, key: str) -> None:
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] and "://" not in node[key]:
            node[key] = str(Path(node[key]).expanduser().resolve())

    fix("data", "uri")
    fix("ray", "storage")
    rev = data.get("reverse")
    if isinstance(rev, dict) and isinstance(rev.get("perceptual"), dict):
        wp = rev["perceptual"].get("weights_path")
        if isinstance(wp, str) and wp and "://" not in wp:
            rev["perceptual"]["weights_path"] = str(Path(wp).expanduser().resolve())
    return data


def load_search(path: str | Path | dict, overrides: list[str] | None = None, name: str = "",
                storage: str = "") -> tuple[SearchSpec, dict[str, dict], list[Param]]:
    """Read and validate a search YAML. ``--set`` keys starting with ``base.`` or
    ``forward.`` override the base jobs; the others override the search spec.

    Returns (spec, stage -> base experiment dict, params).
    """
    base_over = [o[len("base."):] for o in overrides or [] if o.startswith("base.")]
    fwd_over = [o[len("forward."):] for o in overrides or [] if o.startswith("forward.")]
    spec_over = [o for o in overrides or [] if not o.startswith(("base.", "forward."))]
    relative_to = None if isinstance(path, dict) else Path(path).resolve().parent
    if isinstance(path, dict):
        raw = copy.deepcopy(path)
    else:
        raw = _read_yaml(path, "--config", None)
    spec: SearchSpec = load_config(raw, spec_over, cls=SearchSpec)  # the job loader: typed, strict, validated
    spec.name = name or spec.name or (Path(path).stem if not isinstance(path, dict) else "search")
    if "/" in spec.name or not spec.name:
        raise ConfigError(f"name={spec.name!r}: a search name must be non-empty and contain no '/'")
    base_over = [*spec.overrides, *base_over]
    fwd_over = [*spec.overrides, *fwd_over]
    main = apply_overrides(_read_yaml(spec.base, "base", relative_to), base_over)
    stages = STAGE_ORDER[spec.stage]
    bases: dict[str, dict] = {stages[-1]: main}
    if spec.forward is not None:
        forward = apply_overrides(_read_yaml(spec.forward if spec.forward is not None else spec.base,
                                             "forward", relative_to), fwd_over)
    else:
        forward = None
    if spec.stage == "both":
        bases["forward"] = forward if forward is not None else copy.deepcopy(main)
    elif spec.stage == "reverse" and forward is not None:
        bases["forward-once"] = forward
    res = spec.resources
    for data in bases.values():
        ray = data.setdefault("ray", {})
        if res.workers:
            ray["workers"] = res.workers
        if res.cpus_per_worker:
            ray["cpus_per_worker"] = res.cpus_per_worker
        if res.use_gpu:
            ray["use_gpu"] = res.use_gpu
    for stage, data in bases.items():
        check = copy.deepcopy(data)
        check["stage"] = "forward" if stage == "forward-once" else stage
        if check["stage"] == "reverse":
            check.setdefault("train", {}).setdefault("forward_checkpoint", "checked-later")
        try:
            load_config(check)
        except ConfigError as exc:
            raise ConfigError(f"{'base' if stage == stages[-1] else 'forward'} ({stage} job): {exc}") from None

    params = [parse_param(str(k), v) for k, v in spec.space.items()]
    for p in params:
        if p.target == "forward" and spec.stage == "reverse":
            raise ConfigError(f"space.{p.key}: a reverse-only search reuses one frozen forward checkpoint, so "
                              f"flow.* cannot change; search it with stage: both")
        if p.target == "eval" and spec.metric != "fid":
            raise ConfigError(f"space.{p.key}: eval.* settings only matter with metric: fid (got metric: "
                              f"{spec.metric})")
        if spec.search == "optuna" and p.dist == "grid":
            raise ConfigError(f"space.{p.key}: grid does not mix with search: optuna; use choice, or search: grid")
        if spec.search == "grid" and p.dist not in ("grid", "choice"):
            raise ConfigError(f"space.{p.key}: search: grid needs grid or choice values, got {p.dist}")
    if spec.metric == "fid" and bases[stages[-1]].get("data", {}).get("kind") == "latents":
        raise ConfigError("metric: fid needs pixel data (base data.kind: pixels); with latent shards "
                          "search a logged metric such as loss")
    _check_values(params, bases, stages)
    spec.storage = storage or spec.storage or bases[stages[-1]].get("ray", {}).get("storage", "runs")
    return spec, bases, params
