"""Learning-rate schedules with warmup (the TrainingArguments names), as LambdaLR multipliers."""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def lr_lambda(kind: str, total_steps: int, warmup: int):
    def fn(step: int) -> float:
        if step < warmup:  # as transformers' schedules: 0 at step 0, rising linearly
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"lr_scheduler_type={kind!r} is not supported")

    return fn


def build_scheduler(optimizer, kind: str, total_steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total_steps, warmup))
