"""How many optimizer steps a number of training rows gives. One rule, for the trainer's plan (which sizes the
learning-rate schedule and the epochs) and for `dpo-ray inspect-data`'s forecast from the rows it keeps.

Each worker reads ``rows // world`` rows per epoch (``streaming_split(equal=True)``) and drops its last
partial micro-batch, so an epoch is ``rows // (world × per_device_train_batch_size)`` micro-batches and
``// gradient_accumulation_steps`` optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo_ray.errors import TooFewRowsError


@dataclass(frozen=True)
class StepPlan:
    rows: int
    world: int
    micro_per_epoch: int  # micro-batches per worker per epoch
    steps_per_epoch: int
    total_steps: int  # max_steps, else ceil(num_train_epochs × steps_per_epoch); 0 when rows give no step
    num_epochs: int  # epochs the worker loop runs at most

    def rows_per_step(self, cfg) -> int:
        return self.world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps


def plan_steps(rows: int, cfg, world: int | None = None) -> StepPlan:
    """The plan for ``rows`` training rows over ``world`` workers (default ray.num_workers)."""
    world = world or cfg.ray.num_workers
    return plan_for_micro_batches(rows // (world * cfg.per_device_train_batch_size), cfg, world, rows)


def plan_for_micro_batches(micro: int, cfg, world: int, rows: int = 0) -> StepPlan:
    """The plan when each worker's epoch is ``micro`` micro-batches: max_steps as asked (epochs enough to
    reach it), else ceil(num_train_epochs × steps per epoch) steps. The worker loop re-plans with it when the
    first epoch gave fewer micro-batches than the rows counted promised (bad rows dropped)."""
    per_epoch = micro // cfg.gradient_accumulation_steps
    if per_epoch == 0:
        return StepPlan(rows, world, micro, 0, 0, 0)
    if cfg.max_steps > 0:
        return StepPlan(rows, world, micro, per_epoch, cfg.max_steps, math.ceil(cfg.max_steps / per_epoch))
    return StepPlan(rows, world, micro, per_epoch, max(1, math.ceil(cfg.num_train_epochs * per_epoch)),
                    math.ceil(cfg.num_train_epochs))


def steps_reached(plan: StepPlan, kept_rows: int, cfg) -> int:
    """The steps the worker loop reaches when only ``kept_rows`` of the planned rows arrive: the planned
    epochs, each as long as the kept rows make it, capped at the planned total."""
    return min(plan.total_steps, plan.num_epochs * plan_steps(kept_rows, cfg, plan.world).steps_per_epoch)


def require_steps(plan: StepPlan, cfg, what: str = "the training set") -> None:
    """TooFewRowsError when ``plan`` has no optimizer step, naming the settings to lower."""
    if plan.steps_per_epoch == 0:
        raise TooFewRowsError(
            f"{what} (~{plan.rows} rows) is too small for one optimizer step, which takes "
            f"{plan.rows_per_step(cfg)} rows: {plan.world} worker(s) × per_device_train_batch_size "
            f"{cfg.per_device_train_batch_size} × gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps}; give more rows or lower one of them")
