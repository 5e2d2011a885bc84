"""Learning-rate schedules with warmup (the TrainingArguments names), as LambdaLR multipliers.

Each schedule is transformers' (``transformers.get_scheduler``) written as a multiplier of the peak learning
rate, so a TRL config gives the same learning rate at every step; ``lr_scheduler_kwargs`` take transformers'
names. ``SCHEDULES`` is the one table of names and their keyword arguments; the config validates against it.
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: float) -> int:
    """transformers 5's rule: ``warmup_steps`` >= 1 counts steps, one in (0, 1) is a fraction of the run's
    steps; 0 leaves it to ``warmup_ratio`` (transformers 4.x's key)."""
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(total_steps * (warmup_steps if warmup_steps > 0 else warmup_ratio))


def interval_steps(value: float, total_steps: int) -> int:
    """logging_steps / eval_steps / save_steps as transformers reads them: >= 1 counts optimizer steps, a
    number in (0, 1) is that fraction of the run's steps (rounded up, at least 1)."""
    return int(value) if value >= 1 else max(1, math.ceil(total_steps * value))


# name -> {keyword argument: default}; None: required (cosine_with_min_lr needs min_lr or min_lr_rate)
SCHEDULES: dict[str, dict[str, float | None]] = {
    "linear": {},
    "cosine": {"num_cycles": 0.5},
    "cosine_with_restarts": {"num_cycles": 1},
    "cosine_with_min_lr": {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
    "constant": {},  # no warmup, as transformers' get_constant_schedule
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": None},  # default: the warmup steps, or 10 000 without warmup
}
# transformers' other names, and why they are not here (the config refuses them with this reason)
UNSUPPORTED_SCHEDULES = {
    "reduce_lr_on_plateau": "it steps on eval metrics, which the worker loop does not feed to the scheduler",
    "warmup_stable_decay": "not implemented; use cosine_with_min_lr or linear with warmup",
    "cosine_warmup_with_min_lr": "not implemented; use cosine_with_min_lr",
    "greedy": "not implemented",
}


def scheduler_kwargs_problems(kind: str, kwargs: dict, learning_rate: float) -> list[str]:
    """What is wrong with ``lr_scheduler_kwargs`` for ``lr_scheduler_type`` kind (empty: nothing)."""
    if kind not in SCHEDULES:
        why = UNSUPPORTED_SCHEDULES.get(kind, "not a schedule")
        return [f"lr_scheduler_type {kind!r}: {why}; choose one of {', '.join(SCHEDULES)}"]
    allowed = SCHEDULES[kind]
    problems = [f"{k!r} is not an argument of the {kind} schedule"
                + (f"; it takes {', '.join(allowed)}" if allowed else "; it takes none") for k in kwargs
                if k not in allowed]
    if kind == "cosine_with_min_lr":
        given = [k for k in ("min_lr", "min_lr_rate") if kwargs.get(k) is not None]
        if len(given) != 1:
            problems.append("cosine_with_min_lr needs exactly one of min_lr (absolute) or min_lr_rate "
                            "(fraction of learning_rate), e.g. {min_lr_rate: 0.1}")
        elif given == ["min_lr"] and not 0 <= kwargs["min_lr"] <= learning_rate:
            problems.append(f"min_lr must be in [0, learning_rate={learning_rate}] (got {kwargs['min_lr']})")
    if kind == "polynomial" and kwargs.get("lr_end", 1e-7) > learning_rate:
        problems.append(f"lr_end ({kwargs['lr_end']}) must not exceed learning_rate ({learning_rate})")
    return problems


def lr_lambda(kind: str, total_steps: int, warmup: int, kwargs: dict | None = None,
              base_lr: float | None = None):
    """The multiplier of ``base_lr`` at each optimizer step (LambdaLR), as transformers' schedule ``kind``.

    ``kwargs``: the schedule's keyword arguments (``SCHEDULES``); ``base_lr``: the peak learning rate, needed
    by the schedules that end at an absolute rate (cosine_with_min_lr's min_lr, polynomial's lr_end).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type={kind!r} is not supported; choose one of {', '.join(SCHEDULES)}")
    if not base_lr and (kind == "polynomial"
                        or (kind == "cosine_with_min_lr" and (kwargs or {}).get("min_lr") is not None)):
        raise ValueError(f"the {kind} schedule needs base_lr (the peak learning rate) to reach an absolute "
                         "rate")
    opts = {k: v for k, v in SCHEDULES[kind].items() if v is not None} | dict(kwargs or {})
    if kind == "cosine_with_min_lr":
        floor = opts["min_lr"] / base_lr if opts.get("min_lr") is not None else opts.get("min_lr_rate")
        if floor is None:
            raise ValueError("cosine_with_min_lr needs min_lr or min_lr_rate in lr_scheduler_kwargs")
    if kind == "inverse_sqrt" and opts.get("timescale") is None:
        opts["timescale"] = warmup or 10_000

    def fn(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:  # as transformers' schedules: 0 at step 0, rising linearly
            return step / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        if kind == "inverse_sqrt":
            t = opts["timescale"]
            return 1.0 / math.sqrt((step + t - warmup) / t)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        if kind in ("cosine", "cosine_with_min_lr"):
            factor = 0.5 * (1.0 + math.cos(math.pi * float(opts["num_cycles"]) * 2.0 * progress))
            if kind == "cosine_with_min_lr":
                factor = factor * (1 - floor) + floor
            return max(0.0, factor)
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(opts["num_cycles"]) * progress) % 1.0))))
        # polynomial: from base_lr down to lr_end
        lr_end, power = opts["lr_end"], opts["power"]
        if step > total_steps:
            return lr_end / base_lr
        remaining = 1 - (step - warmup) / max(1, total_steps - warmup)
        return ((base_lr - lr_end) * remaining**power + lr_end) / base_lr

    return fn


def lr_lambda_for(cfg, total_steps: int):
    """The run's schedule from its config (DPOConfig): type, warmup, lr_scheduler_kwargs, learning_rate."""
    warm = warmup_steps(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    return lr_lambda(cfg.lr_scheduler_type, total_steps, warm, cfg.lr_scheduler_kwargs, cfg.learning_rate)


def build_scheduler(optimizer, cfg, total_steps: int,
                    last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule around ``optimizer`` (DeepSpeed steps it once per optimizer step); ``last_step`` > 0
    continues a run whose horizon changed at that step (the optimizer already holds each group's
    initial_lr)."""
    # LambdaLR's constructor takes one step: from last_step - 1 it lands on last_step and sets its rates
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg, total_steps),
                                             last_epoch=last_step - 1 if last_step else -1)
