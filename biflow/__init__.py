"""biflow: distributed training on Ray for Bidirectional Normalizing Flows.

The model code (``biflow.models``, ``biflow.losses``, ``biflow.sampling``,
``biflow.ema``, ``biflow.metrics``, ``biflow.perceptual``) runs with plain
PyTorch and imports neither Ray nor DeepSpeed. DeepSpeed appears in
``biflow.train.engine`` (and ``biflow.bench.memory``, which reads its engine
state). Ray appears in ``biflow.train`` (Ray Train), ``biflow.data`` (the
``prepare-data`` conversion and latent encoding on Ray Data, the training
pipeline), ``biflow.tune``, ``biflow.bench``, ``biflow.evaluate``
(``--workers``), ``biflow.submit`` (job submission), ``biflow.cluster``
(launcher config checks) and the CLI.
"""

__version__ = "0.1.0"

__all__ = ["BiFlow", "__version__"]


def __getattr__(name: str):
    """``from biflow import BiFlow`` without importing torch for ``biflow --help``."""
    if name == "BiFlow":
        from biflow.pretrained import BiFlow

        return BiFlow
    raise AttributeError(f"module 'biflow' has no attribute {name!r}")
