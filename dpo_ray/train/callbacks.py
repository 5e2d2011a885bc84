"""Callbacks: user code the training loop calls at its named points, on every worker.

    class StopAtLoss(Callback):
        def on_log(self, ctx):
            if ctx.rank == 0 and ctx.metrics.get("loss", 1.0) < 0.05:
                print(f"loss below 0.05 at step {ctx.global_step}")

    DPOTrainer(args=cfg, train_dataset=rows, callbacks=[StopAtLoss()]).train()

A callback is pickled on the driver and runs inside each Ray Train worker, so it must pickle (no open files,
locks or Ray handles it cannot carry) and it sees that worker's rank. It runs on every rank: a callback that
writes files or talks to a service checks ``ctx.rank``. Whatever it raises fails the step like any other
error of the loop (Ray Train restarts the worker group up to ``ray.max_failures`` times, from the last
checkpoint, and calls ``on_train_begin`` again on the new group). The hooks, in the order a run calls them:

    on_train_begin  after the model, the optimizer and a resumed checkpoint are in place, before the first
                    batch
    on_log          at each logging step, with the step's reduced metrics (the same on every rank)
    on_evaluate     after each evaluation, with the eval_ metrics (every rank)
    on_save         after a checkpoint was written (every rank joined the save)
    on_step_end     last thing of each optimizer step (after its TR-DPO sync, log, eval and checkpoint)
    on_train_end    after the final model was written

An evaluation or save at the run's end comes after the last ``on_step_end`` and before ``on_train_end``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CallbackContext:
    """What a hook sees. ``model`` is this worker's policy module (under ZeRO-3 its parameters are shards: use
    ``deepspeed.zero.GatheredParameters`` to read them whole); ``metrics`` holds the logged or eval metrics of
    ``on_log`` and ``on_evaluate`` and is empty elsewhere. The checkpoint ``on_save`` follows is the run's
    ``checkpoint-<global_step, 6 digits>`` folder in its Ray Train storage."""

    rank: int
    world_size: int
    global_step: int
    total_steps: int
    epoch: float
    output_dir: Path
    model: Any
    metrics: dict[str, float] = field(default_factory=dict)


class Callback:
    """Subclass and override the hooks you need; each gets a ``CallbackContext`` and returns nothing."""

    def on_train_begin(self, ctx: CallbackContext) -> None:
        pass

    def on_log(self, ctx: CallbackContext) -> None:
        pass

    def on_evaluate(self, ctx: CallbackContext) -> None:
        pass

    def on_save(self, ctx: CallbackContext) -> None:
        pass

    def on_step_end(self, ctx: CallbackContext) -> None:
        pass

    def on_train_end(self, ctx: CallbackContext) -> None:
        pass


def check_callbacks(callbacks) -> list[Callback]:
    """The callbacks as a list, each a ``Callback`` that pickles (it travels to the workers); else a TypeError
    naming the entry and the fix."""
    out = list(callbacks or [])
    for i, cb in enumerate(out):
        if not isinstance(cb, Callback):
            hint = (" (a transformers TrainerCallback: its hooks take TrainingArguments and a TrainerControl "
                    "that this loop does not have; port it to dpo_ray.Callback)"
                    if any(c.__name__ == "TrainerCallback" for c in type(cb).__mro__) else "")
            raise TypeError(f"callbacks[{i}] is a {type(cb).__name__}, not a dpo_ray.Callback{hint}: "
                            "subclass dpo_ray.Callback and override its on_* hooks")
        import ray.cloudpickle

        try:
            ray.cloudpickle.dumps(cb)
        except Exception as e:
            raise TypeError(f"callbacks[{i}] ({type(cb).__name__}) cannot be pickled to the training "
                            f"workers: {type(e).__name__}: {e}. Keep only picklable state on it (paths, "
                            "numbers), and open files or clients inside its hooks") from None
    return out
