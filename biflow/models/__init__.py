"""Models (plain PyTorch): the forward flow F and the reverse model G."""

from biflow.models.reverse import ReverseModel, ReverseOutput
from biflow.models.tarflow import FlowOutput, TARFlow

__all__ = ["TARFlow", "FlowOutput", "ReverseModel", "ReverseOutput"]
