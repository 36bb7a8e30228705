"""The one builder of forward flows: ``build_flow(cfg.flow)`` picks the family's class.

Training, loading (checkpoints, exports), sampling and the benchmarks all call it; the
protocol the families implement is :mod:`biflow.models.flow`.
"""

from __future__ import annotations

from biflow.config import FlowConfig
from biflow.models.flow import ForwardFlow
from biflow.models.glow import Glow
from biflow.models.resflow import ResidualFlow
from biflow.models.tarflow import TARFlow

FAMILIES: dict[str, type[ForwardFlow]] = {"tarflow": TARFlow, "glow": Glow, "resflow": ResidualFlow}


def build_flow(cfg: FlowConfig) -> ForwardFlow:
    """The forward flow of ``cfg.family``."""
    family = getattr(cfg, "family", "tarflow")
    if family not in FAMILIES:
        raise ValueError(f"flow.family={family!r}: allowed values: {', '.join(FAMILIES)}")
    return FAMILIES[family](cfg)
