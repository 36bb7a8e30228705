"""Models (plain PyTorch): the forward flow F (one of the families of :mod:`biflow.models.flow`,
made by :func:`biflow.models.registry.build_flow`) and the reverse model G."""

from biflow.models.flow import FlowOutput, ForwardFlow
from biflow.models.registry import build_flow
from biflow.models.reverse import ReverseModel, ReverseOutput
from biflow.models.tarflow import TARFlow

__all__ = ["TARFlow", "FlowOutput", "ForwardFlow", "build_flow", "ReverseModel", "ReverseOutput"]
