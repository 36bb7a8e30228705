"""The data plane: storage URIs, parquet shards + manifest, Ray Data pipelines.

Import the submodules directly; this package imports nothing heavy::

    from biflow.data.storage import resolve, ray_storage
    from biflow.data.shards import prepare_data, read_manifest
    from biflow.data.pipeline import build_dataset, iter_worker_batches, iter_split
"""
