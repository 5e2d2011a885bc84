"""Metric accumulation on device, reduced across workers once per logging step (no per-micro-batch sync).

Three kinds of metric, as TRL logs them:
- summed (``SUMMED``): added over micro-batches and workers;
- weighted: a metric sent with ``METRIC_WEIGHT + name`` (its token or pair count) is, per micro-batch, the
  weighted mean over workers (TRL gathers the counts of every rank), then the plain mean over micro-batches;
- the rest: the plain mean over micro-batches and workers.
Weighted metrics need every worker to add the same number of micro-batches between reductions (equal shards
cut into ``rows // batch_size`` batches guarantee it, ``train.steps.counted``): their per-micro-batch values
line up in the one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dpo_ray.losses import METRIC_WEIGHT

# Metrics that add up across micro-batches and workers; every other metric is averaged.
SUMMED = ("num_tokens", "num_pairs")


class MetricAccumulator:
    def __init__(self):
        self._totals: dict[str, Tensor] = {}
        self._weighted: dict[str, list[Tensor]] = {}  # name -> per micro-batch [value·weight, weight]
        self._count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for k, v in values.items():
            if k.startswith(METRIC_WEIGHT):
                continue
            v = v.detach().float()
            w = values.get(METRIC_WEIGHT + k)
            if w is not None:
                w = w.detach().float().reshape(())
                self._weighted.setdefault(k, []).append(torch.stack([v.reshape(()) * w, w]))
            else:
                self._totals[k] = self._totals[k] + v if k in self._totals else v.clone()
        self._count += 1

    def reduce(self) -> dict[str, float]:
        """All-reduce every metric in one collective, then one host copy. Resets the accumulator."""
        if not self._totals and not self._weighted:
            return {}
        keys = sorted(self._totals)
        wkeys = sorted(self._weighted)
        parts = [self._totals[k].reshape(1) for k in keys]
        parts += [torch.stack(self._weighted[k]).reshape(-1) for k in wkeys]  # (K·2,) each
        device = parts[0].device
        flat = torch.cat(parts + [torch.tensor([float(self._count)], device=device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        values = flat.cpu()  # the one host sync of the logging step
        n_micro = float(values[-1])  # micro-batches of all workers
        out = {k: (v if k in SUMMED else v / max(n_micro, 1.0))
               for k, v in zip(keys, values[:len(keys)].tolist())}
        start = len(keys)
        for k in wkeys:
            n = 2 * len(self._weighted[k])
            num, den = values[start:start + n].view(-1, 2).double().unbind(-1)
            start += n
            # a micro-batch without tokens on any worker counts as 0, as TRL logs it
            out[k] = float(torch.where(den > 0, num / den.clamp(min=1e-12), 0.0).mean())
        self._totals, self._weighted, self._count = {}, {}, 0
        return out


class EvalAccumulator:
    """Eval metrics over every eval row once, whatever the batches: each batch's mean weighted by its rows
    (``num_pairs``), a metric sent with ``METRIC_WEIGHT + name`` by that weight, ``SUMMED`` ones added; a
    filler batch (``real=False``) weighs 0. Sums and counts are all-reduced once, so the result is the mean
    over all rows a single process would compute (``eval_num_pairs``: the rows it rests on)."""

    def __init__(self):
        self._sums: dict[str, Tensor] = {}  # name -> [Σ value·weight, Σ weight]

    def add(self, values: dict[str, Tensor], real: bool = True) -> None:
        on = 1.0 if real else 0.0
        rows = values["num_pairs"].detach().float().reshape(()) * on
        for k, v in values.items():
            if k.startswith(METRIC_WEIGHT):
                continue
            v = v.detach().float().reshape(())
            w = values.get(METRIC_WEIGHT + k)
            if k in SUMMED:
                part = torch.stack([v * on, torch.zeros_like(v)])
            else:
                weight = w.detach().float().reshape(()) * on if w is not None else rows
                part = torch.stack([v * weight, weight])
            self._sums[k] = self._sums[k] + part if k in self._sums else part

    def reduce(self) -> dict[str, float]:
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        flat = torch.cat([self._sums[k] for k in keys]).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        values = flat.cpu().view(-1, 2).tolist()
        self._sums = {}
        return {k: (num if k in SUMMED else num / den if den > 0 else float("nan"))
                for k, (num, den) in zip(keys, values)}


def best_checkpoint_step(rows: list[dict], saved_steps: list[int], key: str,
                         greater_is_better: bool) -> int | None:
    """load_best_model_at_end: the saved step whose eval ``key`` (e.g. "eval_loss") is best, as transformers
    picks it (the first of equal values wins), from the logged rows (each with "step"); None without one."""
    # the eval of each step, NaN out
    at_step = {r["step"]: r[key] for r in rows if key in r and r[key] == r[key]}
    best = None
    for step in sorted(saved_steps):
        if step in at_step and (best is None or (at_step[step] > at_step[best] if greater_is_better
                                                  else at_step[step] < at_step[best])):
            best = step
    return best
