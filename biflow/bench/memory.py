"""Per-rank model-state memory of DeepSpeed engines (``biflow bench train``'s
ZeRO-3 vs ZeRO-0 figure), counted from the engine's own tensors.

DeepSpeed has no public API for "bytes of model state this rank holds", so
:func:`model_state_bytes` reads attributes of DeepSpeed's ZeRO optimizer objects
(``fp32_partitioned_groups_flat``, ``single_partition_of_fp32_groups``,
``grad_partitions_flat_buffer``, ``averaged_gradients``) and walks the rest of
them for communication buffers. Those names are DeepSpeed internals (0.19): a
DeepSpeed upgrade that renames them shows up as zero ``master_params`` / grads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def _tensor_bytes_walk(root: object, max_depth: int = 5) -> list[torch.Tensor]:
    """Tensors reachable from a DeepSpeed object through attributes, lists and dicts."""
    found, seen = [], set()

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > max_depth:
            return
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found.append(obj)
            if obj.grad is not None:
                found.append(obj.grad)
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(k, depth + 1)
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                visit(v, depth + 1)

    visit(root, 0)
    return found


def model_state_bytes(engine) -> dict:
    """Bytes of model state this rank holds, from the engine's own tensors.

    Counted once per storage (views into DeepSpeed's flat buffers count their
    buffer once), in this order: ``params`` (ZeRO-3: the rank's ``ds_tensor``
    partitions; else the full parameters), ``master_params`` (fp32 partitions of
    ZeRO 1-3 that are separate from the parameters), ``grads`` (``.grad`` of the
    parameters and master partitions, ZeRO-3's gradient partition buffer, ZeRO-1/2
    averaged gradients), ``optimizer_states`` (AdamW moments of the torch
    optimizer). ``model_states`` is their sum. ``other_buffers``: everything else
    the ZeRO optimizer object holds (communication buckets sized by
    ``reduce_bucket_size``, allocated with ``torch.empty``), reported apart.
    Call after ``backward`` and before ``step`` so that gradients exist.
    """
    out = dict.fromkeys(("params", "master_params", "grads", "optimizer_states", "other_buffers"), 0)
    seen: set[int] = set()

    def add(cat: str, t) -> None:
        if not torch.is_tensor(t):
            return
        s = t.untyped_storage()
        if s.nbytes() == 0 or s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        out[cat] += s.nbytes()

    params = list(engine.module.parameters())
    zero3 = any(hasattr(p, "ds_tensor") for p in params)
    for p in params:
        add("params", p.ds_tensor if zero3 else p.data)
    ds = getattr(engine, "ds", None)
    opt = ds.optimizer if ds is not None else engine.optimizer
    inner = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
    masters = [t for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
               for t in (getattr(opt, name, None) or [])]
    for t in masters:
        add("master_params", t)
    for p in params:
        add("grads", p.grad)
    for t in masters:
        add("grads", t.grad)
    add("grads", getattr(opt, "grad_partitions_flat_buffer", None))
    averaged = getattr(opt, "averaged_gradients", None) or {}
    for group in (averaged.values() if isinstance(averaged, dict) else averaged):
        for t in group or []:
            add("grads", t)
    for state in inner.state.values():
        for v in state.values():
            add("optimizer_states", v)
    if not isinstance(opt, torch.optim.Optimizer):
        for t in _tensor_bytes_walk(opt):
            add("other_buffers", t)
    out["model_states"] = out["params"] + out["master_params"] + out["grads"] + out["optimizer_states"]
    return out


def _live_tensor_bytes() -> int:
    """All tensor storages alive in this process (a cross-check; includes data and buffers)."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj):
                s = obj.untyped_storage()
                if s.nbytes() and s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:
            continue
    return total


def _memory_worker(config: dict) -> None:
    """Ray Train worker: build each DeepSpeed engine on the same model, take two
    steps (AdamW states exist after the first), measure after the second backward."""
    import gc
    import tempfile

    import ray.train
    import torch.distributed as dist

    from biflow.config import load_config
    from biflow.losses import forward_loss
    from biflow.models import build_flow
    from biflow.train.engine import build_engine, rank

    rows = {"torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    for stage, exp in config["experiments"].items():
        cfg = load_config(exp)
        torch.manual_seed(0)
        module = build_flow(cfg.flow)
        nparams = sum(p.numel() for p in module.parameters())
        engine = build_engine(module, cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank())
        b, f = cfg.train.batch_size, cfg.flow
        x = torch.rand(b, f.channels, f.image_size, f.image_size, generator=gen) * 2 - 1
        y = torch.randint(0, f.num_classes, (b,), generator=gen)
        for i in range(2):
            loss, _ = forward_loss(engine.model, x, y, f, generator=gen)
            engine.backward(loss)
            if i == 1:
                stats = model_state_bytes(engine)
                stats["live_tensor_bytes"] = _live_tensor_bytes()
            engine.step()
        stats["params_total"] = nparams
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, stats)
        rows[f"zero{stage}"] = gathered
        del engine, module, loss
        gc.collect()
    # Ray Train V2 keeps metrics with a checkpoint: every rank reports a dir, rank 0 writes the file
    directory = tempfile.mkdtemp(prefix="biflow-bench-mem-report-")
    if rank() == 0:
        (Path(directory) / "memory.json").write_text(json.dumps(rows))
    ray.train.report({"ranks": len(gathered)}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def memory_run(experiments: dict[str, dict], workers: int) -> dict:
    """``_memory_worker`` on ``workers`` Ray Train ranks, one engine per entry of
    ``experiments`` (ZeRO stage -> experiment dict; its ``ray.storage`` is replaced)."""
    import shutil
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from biflow.train.launch import worker_env

    tmp = tempfile.mkdtemp(prefix="biflow-bench-mem-")
    exps = {s: {**exp, "ray": {**exp.get("ray", {}), "storage": tmp}} for s, exp in experiments.items()}
    trainer = TorchTrainer(
        _memory_worker, train_loop_config={"experiments": exps},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="bench-train-memory", storage_path=tmp,
                             worker_runtime_env={"env_vars": {**worker_env(), "DS_ACCELERATOR": "cpu"}}),
        torch_config=TorchConfig(backend="gloo"),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            return json.loads((Path(directory) / "memory.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

