"""Render Ray cluster launcher YAMLs from Terraform outputs.

``cluster/aws.yaml`` and ``cluster/gcp.yaml`` are templates whose
``{{name}}`` placeholders are Terraform output names. ``render`` reads
``terraform output -json`` (``{"name": {"value": ..., "type": ...}, ...}``),
replaces every placeholder and writes a config that ``ray up`` accepts:

- a string that is exactly ``"{{name}}"`` becomes the output's value with its
  type (a list of subnet ids stays a list);
- a placeholder inside a longer string is replaced by the value's text
  (scalars only).

The result is checked with Ray's own ``validate_config(prepare_config(...))``
before it is written. Missing outputs are reported together, by name.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from biflow.errors import UserError

PROVIDERS = ("aws", "gcp")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def default_template_dir() -> Path:
    """``cluster/`` of the source checkout this package runs from."""
    return Path(__file__).resolve().parent.parent / "cluster"


def load_terraform_outputs(path: str | Path) -> dict[str, Any]:
    """Read ``terraform output -json`` into ``{name: value}``.

    Accepts the plain form ``{name: value}`` too, so values can be written by
    hand (e.g. for GCP, which infra/ does not provision)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"terraform output file not found: {p} (create it with "
                        f"`terraform -chdir=infra/terraform/aws output -json > {p.name}`)")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not JSON ({exc.msg} at line {exc.lineno}); "
                        "expected the output of `terraform output -json`") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a JSON object of outputs, got {type(raw).__name__}")
    if not raw:
        raise UserError(f"{p} has no outputs: run `terraform apply` in infra/terraform/aws first")
    out: dict[str, Any] = {}
    for name, entry in raw.items():
        if isinstance(entry, dict) and "value" in entry:
            out[name] = entry["value"]
        else:
            out[name] = entry
    return out


def placeholders(template: Any) -> set[str]:
    """All placeholder names used anywhere in a loaded template."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            found.update(_PLACEHOLDER.findall(node))

    walk(template)
    return found


def fill(template: Any, values: dict[str, Any]) -> Any:
    """Replace placeholders in a loaded template (see module docstring)."""
    if isinstance(template, dict):
        return {fill(k, values): fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template.strip())
    if whole:
        return copy.deepcopy(values[whole.group(1)])

    def sub(m: re.Match) -> str:
        value = values[m.group(1)]
        if isinstance(value, (dict, list)):
            raise UserError(f"output {m.group(1)!r} is a {type(value).__name__} but is used inside "
                            f"the string {template!r}; only text, number or bool outputs fit there")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return _PLACEHOLDER.sub(sub, template)


def validate_ray_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own check (what `ray up` runs); returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def render(terraform_output: str | Path, out_dir: str | Path, provider: str = "aws",
           template: str | Path | None = None) -> Path:
    """Write ``<out_dir>/<provider>.yaml`` filled from Terraform outputs."""
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    template_path = Path(template) if template else default_template_dir() / f"{provider}.yaml"
    if not template_path.is_file():
        raise UserError(f"cluster template not found: {template_path} (pass --template PATH to "
                        f"cluster/{provider}.yaml of a biflow checkout)")
    values = load_terraform_outputs(terraform_output)
    loaded = yaml.safe_load(template_path.read_text())
    needed = placeholders(loaded)
    missing = sorted(needed - values.keys())
    if missing:
        raise UserError(f"{terraform_output} lacks output(s) {', '.join(missing)} needed by {template_path.name}; "
                        "run `terraform apply` in infra/terraform/aws and export again")
    null = sorted(n for n in needed if values[n] is None or values[n] == "" or values[n] == [])
    if null:
        raise UserError(f"output(s) {', '.join(null)} in {terraform_output} are empty")
    config = fill(loaded, values)
    left = placeholders(config)
    if left:  # an output's value itself contained a placeholder
        raise UserError(f"unfilled placeholders after rendering: {', '.join(sorted(left))}")
    try:
        validate_ray_config(config)
    except Exception as exc:  # jsonschema.ValidationError, ValueError from Ray
        msg = str(exc).splitlines()[0]
        raise UserError(f"rendered {provider} config fails Ray's cluster schema: {msg}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{provider}.yaml"
    header = (f"# Rendered by `biflow cluster render` from {template_path.name} and "
              f"{Path(terraform_output).name}. Start with: ray up {target}\n")
    target.write_text(header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100))
    return target


# ---------------------------------------------------------------------------
# The same fleet, simulated on one machine (Ray's fake multi-node provider)
# ---------------------------------------------------------------------------

# Ray's accelerator_type names (ray.util.accelerators) of the GPUs in the AWS instance families used
# by cluster/aws.yaml. A real GPU node advertises ``accelerator_type:<name>``; a simulated one does too.
ACCELERATOR_BY_INSTANCE_FAMILY = {"g5": "A10G", "p4d": "A100", "p4de": "A100", "p5": "H100", "p5e": "H200",
                                  "g6": "L4", "g6e": "L40S"}
SIM_GPU = "sim_gpu"  # the custom resource that stands in for GPUs in the simulation


def fake_node_types(template: str | Path | None = None, *, cpu_divisor: float = 16.0, max_cpus: int = 0,
                    max_workers: int = 0, gpu_resource: str = SIM_GPU,
                    object_store_memory: int = 100 * 1024**2) -> dict[str, dict[str, Any]]:
    """The worker node types of a launcher YAML (default ``cluster/aws.yaml``) for Ray's
    fake multi-node provider: the same names, priorities and marker resources, with

    - ``min_workers: 0`` (the simulation starts from an empty fleet),
    - ``GPU: n`` replaced by ``{gpu_resource}: n`` plus ``accelerator_type:<type>: 1`` from
      the instance type (what Ray puts on a real GPU node), so jobs ask for them with
      ``ray.resources_per_worker`` / ``ray.accelerator_type`` and the autoscaler picks the type,
    - CPUs divided by ``cpu_divisor`` (at least 1; at most ``max_cpus`` when given) to fit one machine,
    - ``max_workers`` capped when given, and a small object store per node.

    Placeholders in the template are left alone: node_config is not used by the fake provider."""
    path = Path(template) if template else default_template_dir() / "aws.yaml"
    config = yaml.safe_load(path.read_text())
    head = config.get("head_node_type")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in config["available_node_types"].items():
        if name == head:
            continue
        resources = dict(spec.get("resources") or {})
        cpus = max(1, int(resources.pop("CPU", 0) // cpu_divisor))
        if max_cpus:
            cpus = min(cpus, max_cpus)
        sim: dict[str, Any] = {"CPU": cpus}
        gpus = resources.pop("GPU", 0)
        if gpus:
            sim[gpu_resource] = gpus
            family = str((spec.get("node_config") or {}).get("InstanceType", "")).split(".")[0]
            if family in ACCELERATOR_BY_INSTANCE_FAMILY:
                sim[f"accelerator_type:{ACCELERATOR_BY_INSTANCE_FAMILY[family]}"] = 1
        sim.update(resources)  # custom marker resources stay as they are
        sim["object_store_memory"] = object_store_memory
        node_max = int(spec.get("max_workers", config.get("max_workers", 1)))
        out[name] = {"resources": sim, "node_config": {}, "min_workers": 0,
                     "max_workers": min(node_max, max_workers) if max_workers else node_max}
        if "priority" in spec:
            out[name]["priority"] = spec["priority"]
    return out


def fake_autoscaling_config(node_types: dict[str, dict[str, Any]], gcs_address: str, *,
                            head_resources: dict[str, float] | None = None, max_workers: int = 0,
                            idle_timeout_minutes: float = 0.1, upscaling_speed: float = 1.0) -> dict[str, Any]:
    """An autoscaling config for ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``
    (what ``ray.cluster_utils.AutoscalingCluster`` writes), whose fake nodes join the head at
    ``gcs_address`` (not the default port 6379, which another Ray instance may hold)."""
    types = {**node_types, "ray.head.default": {"resources": dict(head_resources or {"CPU": 0}), "node_config": {},
                                                "max_workers": 0}}
    return {
        "cluster_name": "fake-multinode",
        "max_workers": max_workers or sum(t.get("max_workers", 0) for t in node_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }
