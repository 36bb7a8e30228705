"""Exponential moving average of a model's weights, for evaluation and export.

One implementation for plain PyTorch and for the distributed engines: under
DeepSpeed ZeRO-3 (parameters carry ``ds_tensor``) each rank averages only its
own partition and :meth:`EMA.full_state_dict` all-gathers the full weights.
Plain torch: no Ray or DeepSpeed import.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world_size() -> int:
    return dist.get_world_size() if dist_on() else 1


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


class EMA:
    """fp32 EMA of a module's parameters, ZeRO-3 aware.

    Under ZeRO-3 (parameters carry ``ds_tensor``) the average is kept per rank
    over the local partition only; :meth:`full_state_dict` all-gathers it
    (a collective: call it on every rank). Buffers are not averaged; they are
    copied from the live module when the state is taken.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so short
    runs still get a useful average.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.decay = decay
        self.num_updates = 0
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.sharded = any(_is_zero3_param(p) for _, p in self.params)
        self.shadow = [self._local(p).detach().float().clone() for _, p in self.params]

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor.view(-1) if self.sharded else p.data

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        live = [self._local(p).float() for _, p in self.params]
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, live, alpha=1.0 - d)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights (+ buffers) on CPU, on every rank."""
        out: dict[str, torch.Tensor] = {}
        if self.sharded:
            flat = torch.cat(self.shadow)
            parts = [torch.empty_like(flat) for _ in range(world_size())]
            if world_size() > 1:
                dist.all_gather(parts, flat)
            else:
                parts = [flat]
            offset = 0
            for (name, p), shard in zip(self.params, self.shadow):
                n = shard.numel()
                full = torch.cat([part[offset : offset + n] for part in parts])[: p.ds_numel]
                out[name] = full.view(p.ds_shape).cpu().clone()
                offset += n
        else:
            for (name, _), s in zip(self.params, self.shadow):
                out[name] = s.cpu().clone()
        for name, b in self.module.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n, _ in self.params if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks parameters: {missing[:5]}")
        for (name, p), shard in zip(self.params, self.shadow):
            full = state[name].float().flatten().to(shard.device)
            if self.sharded:
                n = shard.numel()
                padded = torch.zeros(n * world_size(), device=shard.device)
                padded[: full.numel()] = full
                shard.copy_(padded[rank() * n : (rank() + 1) * n])
            else:
                shard.copy_(full.view_as(shard))

    def state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "decay": self.decay}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the EMA weights into ``model`` (same architecture; a collective under ZeRO-3)."""
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.full_state_dict().items()})
        return model

    def model_copy(self) -> nn.Module:
        """A detached eval-mode copy of the module carrying the EMA weights."""
        return self.copy_to(copy.deepcopy(self.module)).eval()
