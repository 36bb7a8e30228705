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
