"""biflow: distributed training on Ray for Bidirectional Normalizing Flows.

The model code (``biflow.models``, ``biflow.losses``, ``biflow.sampling``)
runs with plain PyTorch; Ray and DeepSpeed appear only in ``biflow.train``,
``biflow.data.pipeline``, ``biflow.tune`` and the CLI.
"""

__version__ = "0.1.0"
