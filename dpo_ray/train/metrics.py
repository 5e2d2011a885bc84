"""Metric accumulation on device, reduced across workers once per logging step (no per-micro-batch sync)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Metrics that add up across micro-batches and workers; every other metric is averaged.
SUMMED = ("num_tokens", "num_pairs")


class MetricAccumulator:
    def __init__(self):
        self._totals: dict[str, Tensor] = {}
        self._count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self._totals[k] = self._totals[k] + v if k in self._totals else v.clone()
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def reduce(self) -> dict[str, float]:
        """All-reduce every metric in one collective, then one host copy. Resets the accumulator."""
        if not self._totals:
            return {}
        keys = sorted(self._totals)
        flat = torch.stack([self._totals[k].reshape(()) for k in keys])
        count = torch.tensor([float(self._count)], device=flat.device)
        flat = torch.cat([flat, count])
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
            world = dist.get_world_size()
        values = flat.cpu().tolist()  # the one host sync of the logging step
        n_micro = values[-1]
        out = {k: (v if k in SUMMED else v / max(n_micro, 1.0)) for k, v in zip(keys, values[:-1])}
        out["_micro_batches"] = n_micro / world
        self._totals, self._count = {}, 0
        return out
