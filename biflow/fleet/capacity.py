"""What the cluster *can have*, not only what is up now.

A fleet whose GPU node types all have ``min_workers: 0`` has no GPU when a job
is submitted. Deciding ``use_gpu`` (or Tune's concurrency, or the size of a
latent-encoding pool) from ``ray.cluster_resources()`` then picks CPUs, gloo and
``DS_ACCELERATOR=cpu``, and the autoscaler launches CPU nodes for a GPU job.
This module answers from the autoscaler's node types instead, in this order:

1. the cluster config in the GCS (``ray._private.state``), which Ray Train
   and Ray Data read too. The launcher's head writes it at start with
   ``python -m biflow.fleet.capacity publish ~/ray_bootstrap_config.yaml``
   (Ray 2.60's v1 autoscaler does not);
2. the launcher's autoscaling config file itself, on the head
   (``$BIFLOW_AUTOSCALING_CONFIG``, else ``~/ray_bootstrap_config.yaml``);
3. on KubeRay, the RayCluster's worker groups, read from the Kubernetes API the
   way KubeRay's autoscaler reads them (Ray's ``AutoscalingConfigProducer``;
   the pod names its RayCluster in ``$BIFLOW_RAYCLUSTER_NAME`` and
   ``$BIFLOW_RAYCLUSTER_NAMESPACE``, cluster/kuberay/*.yaml);
4. what is up now, as a floor (a static cluster, a laptop).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

from biflow.errors import UserError

CONFIG_ENV = "BIFLOW_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
RAYCLUSTER_ENV = ("BIFLOW_RAYCLUSTER_NAME", "BIFLOW_RAYCLUSTER_NAMESPACE")


def node_type_maxima(config: dict[str, Any]) -> dict[str, float]:
    """Each resource summed over a launcher config's node types at their
    ``max_workers`` (the head once), capped by the config's global ``max_workers``."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    total: dict[str, float] = {}
    per_node_max: dict[str, float] = {}
    for name, spec in types.items():
        count = 1 if name == head else int(spec.get("max_workers", 0) or 0)
        for key, amount in (spec.get("resources") or {}).items():
            total[key] = total.get(key, 0) + count * float(amount)
            if name != head:
                per_node_max[key] = max(per_node_max.get(key, 0), float(amount))
    if cap is not None:
        head_res = (types.get(head) or {}).get("resources") or {}
        for key in total:
            total[key] = min(total[key], int(cap) * per_node_max.get(key, 0) + float(head_res.get(key, 0)))
    return total


def cluster_config_proto(config: dict[str, Any]):
    """Ray's ``autoscaler_pb2.ClusterConfig`` for a launcher config's node types."""
    from ray.core.generated import autoscaler_pb2

    groups = []
    head = config.get("head_node_type")
    for name, spec in (config.get("available_node_types") or {}).items():
        count = 1 if name == head else int(spec.get("max_workers", 0) or 0)
        resources = {k: int(v) for k, v in (spec.get("resources") or {}).items() if float(v) >= 1}
        groups.append(autoscaler_pb2.NodeGroupConfig(name=name, resources=resources,
                                                     min_count=1 if name == head else int(spec.get("min_workers", 0) or 0),
                                                     max_count=count))
    return autoscaler_pb2.ClusterConfig(node_group_configs=groups)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the autoscaling config {path}: {exc}") from None
    if not isinstance(data, dict) or "available_node_types" not in data:
        raise UserError(f"{path} is not a Ray cluster launcher config (no available_node_types)")
    return data


def config_file() -> Path | None:
    """The launcher's autoscaling config on this machine, if there is one."""
    env = os.environ.get(CONFIG_ENV, "")
    path = Path(os.path.expanduser(env or BOOTSTRAP_CONFIG))
    return path if path.is_file() else None


def kuberay_config(ray_cr: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The autoscaling config KubeRay's autoscaler derives from a RayCluster: from
    ``ray_cr`` (a RayCluster manifest), else fetched for the pod's own RayCluster;
    None outside KubeRay or when the API cannot be read (with a warning)."""
    from ray.autoscaler._private.kuberay import autoscaling_config

    if ray_cr is not None:
        return autoscaling_config._derive_autoscaling_config_from_ray_cr(ray_cr)
    name, namespace = (os.environ.get(key, "") for key in RAYCLUSTER_ENV)
    return _fetch_raycluster(name, namespace or "default") if name else None


@functools.lru_cache(maxsize=4)
def _fetch_raycluster(name: str, namespace: str) -> dict[str, Any] | None:
    """Once per process: the worker groups do not change under a job, and a failed
    fetch (Ray retries it for seconds) is not worth repeating for every sizing question."""
    from ray.autoscaler._private.kuberay import autoscaling_config

    try:
        return autoscaling_config.AutoscalingConfigProducer(name, namespace)()
    except Exception as exc:  # no API access (RBAC, outside the pod): decide from what is up
        print(f"warning: cannot read RayCluster {namespace}/{name} for its worker groups "
              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
              "sizing from the nodes up now", file=sys.stderr, flush=True)
        return None


def autoscaler_maxima() -> dict[str, float] | None:
    """The most of each resource the autoscaler can bring up, or None when this
    cluster has no autoscaler config (Ray must be initialised for the GCS lookup)."""
    import ray

    if ray.is_initialized():
        from ray._private.state import state

        try:
            found = state.get_max_resources_from_cluster_config()
        except Exception:  # an older GCS without the key: fall through to the file
            found = None
        if found:
            return {k: float(v) for k, v in found.items()}
    path = config_file()
    if path:
        return node_type_maxima(_load_yaml(path))
    config = kuberay_config()
    return node_type_maxima(config) if config else None


_UNASKED: Any = object()


def reachable(resource: str, maxima: dict[str, float] | None = _UNASKED) -> float:
    """How much of ``resource`` (``"GPU"``, ``"CPU"``) the cluster can have: the
    autoscaler's maximum, or what is up now when that is more (or there is no autoscaler).
    ``maxima``: :func:`autoscaler_maxima` when the caller has asked it already."""
    import ray

    if maxima is _UNASKED:
        maxima = autoscaler_maxima()
    up = float(ray.cluster_resources().get(resource, 0))
    return max(up, (maxima or {}).get(resource, 0.0))


def publish(path: str | Path) -> dict[str, float]:
    """Write a launcher config's node types into the GCS as Ray's cluster config
    (Ray must be initialised against the cluster). Returns the maxima published."""
    import ray

    config = _load_yaml(Path(os.path.expanduser(str(path))))
    ray._private.worker.global_worker.gcs_client.report_cluster_config(
        cluster_config_proto(config).SerializeToString())
    return node_type_maxima(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biflow.fleet.capacity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="write a launcher config's node types into the running cluster's GCS")
    pub.add_argument("config", help="the autoscaling config (on the head: ~/ray_bootstrap_config.yaml)")
    pub.add_argument("--address", default="auto", help="Ray address (default: the cluster on this machine)")
    sub.add_parser("show", help="print what the cluster can have")
    args = parser.parse_args(argv)
    import ray

    try:
        ray.init(address=args.address if args.command == "publish" else "auto", log_to_driver=False)
        if args.command == "publish":
            maxima = publish(args.config)
            print(f"published {args.config}: the cluster can have {_fmt(maxima)}")
        else:
            print(f"up now: {_fmt(ray.cluster_resources())}; can have: {_fmt(autoscaler_maxima() or {})}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _fmt(res: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in res] + sorted(k for k in res if k not in ("CPU", "GPU")
                                                          and not k.startswith(("node:", "memory", "object_store")))
    return ", ".join(f"{k}={res[k]:g}" for k in keys) or "nothing"


if __name__ == "__main__":
    sys.exit(main())
