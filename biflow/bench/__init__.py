"""Benchmarks that write JSON (and a PNG) under an output directory.

=================  ==============================================================
sampling.py        ``biflow bench sampling``: BiFlow 1-NFE vs the exact inverse
train.py           ``biflow bench train``: ZeRO-2 under Ray Train vs a plain loop
perceptual.py      ``biflow bench perceptual``: reverse-step cost of the perceptual term
levers.py          ``biflow bench levers``: held-out PSNR per reverse-model lever, fixed steps
flow_reference.py  ``biflow bench flow-ref``: our TARFlow vs apple/ml-tarflow's (NLL, step time)
baseline.py        the plain single-process PyTorch loop (run in a subprocess)
memory.py          per-rank model-state bytes of DeepSpeed engines (ZeRO-3 vs 0)
flops.py           model FLOPs of a training step, GPU bf16 peaks, MFU
data.py            ``biflow bench data``: conversion, Ray Data vs PIL, data wait
=================  ==============================================================

Timing helpers shared with ``biflow evaluate`` live in :mod:`biflow.timing`.
"""

from biflow.bench.flops import flow_train_flops, gpu_bf16_peak, measure_mfu
from biflow.bench.memory import model_state_bytes
from biflow.bench.sampling import bench_sampling
from biflow.bench.train import bench_train
from biflow.timing import machine_info, timeit, write_results

__all__ = ["bench_sampling", "bench_train", "flow_train_flops", "gpu_bf16_peak", "machine_info", "measure_mfu",
           "model_state_bytes", "timeit", "write_results"]
