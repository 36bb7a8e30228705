"""Spot first, on-demand when spot has no capacity: a utilization scorer for
Ray's v1 autoscaler (the one ``ray up`` runs).

Each GPU class in ``cluster/aws.yaml`` comes as a ``-spot`` and an
``-ondemand`` node type with the same resources. Ray's default scorer ranks
them by utilization only, which ties, and breaks the tie by name (``-spot``
wins), even after the spot type failed to launch: it ignores
``node_availability_summary``. Ray Train then retries its worker-group start
without end and the job waits forever for capacity that is not there.

This scorer puts one number in front of Ray's score: 0 for a node type whose
last launch failed within ``AUTOSCALER_NODE_AVAILABILITY_MAX_STALENESS_S``
(30 min by default; the autoscaler drops older records), 1 otherwise. So an
on-demand type that fits is chosen over a spot type that just failed, and spot
is tried again once the record is stale. Among types that are equally
available and fit equally, spot is preferred explicitly (a last number), not
by the accident of name order.

The head selects it with
``RAY_AUTOSCALER_UTILIZATION_SCORER=biflow.fleet.scorer.spot_fallback_scorer``
in the environment of ``ray start --head`` (the monitor process reads it).
"""

from __future__ import annotations

from typing import Any

SPOT_SUFFIX = "-spot"


def unavailable_types(node_availability_summary: Any) -> set[str]:
    """Node types whose most recent launch failed (the tracker drops records older than its TTL)."""
    records = getattr(node_availability_summary, "node_availabilities", None) or {}
    return {name for name, rec in records.items() if not rec.is_available}


def spot_fallback_scorer(node_resources: dict, resources: list, node_type: str, *,
                         node_availability_summary: Any) -> tuple | None:
    """Ray's default score, preceded by "did not just fail to launch" and followed by "is spot"."""
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer

    score = _default_utilization_scorer(node_resources, resources, node_type,
                                        node_availability_summary=node_availability_summary)
    if score is None:
        return None
    available = node_type not in unavailable_types(node_availability_summary)
    return (int(available), *score, int(node_type.endswith(SPOT_SUFFIX)))
