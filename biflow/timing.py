"""Timing and machine description: a leaf module (torch only) shared by the
benchmarks, the evaluation and the device check."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None where matplotlib is not installed
    (a bare device machine): every benchmark writes its JSON first, and the chart is a view."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "device_name": _cpu_name(),
    }
    if torch.cuda.is_available():
        info.update(device="cuda", device_name=torch.cuda.get_device_name(0))
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def timeit(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``reps`` runs, after ``warmup`` runs."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(out_dir: str | Path, name: str, results: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine_info(),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}, indent=2))
    return path


class HostSyncCounter:
    """Counts the reads that make the host wait for the device (``.item()``, ``bool``/``float``/
    ``int`` of a tensor, ``.tolist()``, ``nonzero``, ``.cpu()``/``.numpy()``) while active, by
    name: the training step's budget is one per non-logging step. Works on any device (on a CPU
    the reads cost nothing, but they are the same calls a GPU would wait on)."""

    OPS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero", "cpu", "numpy"})

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in counter.OPS:
                    counter.calls.append(name)
                return func(*args, **(kwargs or {}))

        self.calls: list[str] = []
        self._mode = _Mode()

    def __enter__(self) -> "HostSyncCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
