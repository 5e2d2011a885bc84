"""The per-worker training recipe, run by Ray Train's TorchTrainer on every rank:
``setup → restore → train (epochs of micro-batches, a hook per optimizer step) → finish``.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; each micro-batch is one forward of the
mode's step (``dpo_ray.train.steps``). Metrics stay on device until a logging step, then one all-reduce.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any

import torch

from dpo_ray.data.step_plan import plan_for_micro_batches
from dpo_ray.errors import TooFewRowsError
from dpo_ray.forward import eval_mode
from dpo_ray.schedule import interval_steps
from dpo_ray.train.callbacks import CallbackContext
from dpo_ray.train.checkpoint import (
    TrainerState,
    checkpoint_problems,
    load_checkpoint,
    save_checkpoint,
    save_final_state,
    save_model,
)
from dpo_ray.train.logger import METRICS_FILE, Logger, Throughput, cut_metrics
from dpo_ray.train.metrics import EvalAccumulator, MetricAccumulator
from dpo_ray.train.setup import LoopConfig, Worker, mark, setup
from dpo_ray.train.steps import DPOStep, SFTStep, TrainingStep


class NonFiniteError(RuntimeError):
    pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["loop"]`` is the driver's ``LoopConfig``."""
    lc: LoopConfig = config["loop"]
    w = setup(lc)
    run = None
    try:  # whatever fails, the TensorBoard writer is flushed and the reference requests in flight are dropped
        state = restore(w)
        step = (DPOStep(w.cfg, w.device, w.pad_id, w.reference, w.checkpointing, announce=w.rank == 0)
                if lc.mode == "dpo"
                else SFTStep(w.cfg, w.device, w.pad_id, w.checkpointing, announce=w.rank == 0))
        run = Run(w, step, state)
        run.fire("on_train_begin")
        if lc.progress is not None and w.rank == 0:  # the driver's display measures rates from here
            lc.progress.post.remote(state.global_step, {"epoch": round(run.epoch_fraction(), 3)})
        if w.eval_shard is not None and w.cfg.eval_on_start and state.global_step == 0:
            run.logger.log(0, run.evaluate())
        while state.global_step < run.total_steps and state.epoch < run.num_epochs:
            if run.epoch():  # the data ran out before the last step: a full epoch
                if state.micro_per_epoch is None:
                    run.fit_plan_to_epoch(state.micro_in_epoch)
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
                run.on_epoch_end()
        run.finish()
    finally:
        if run is not None:
            run.logger.close()
        if w.reference is not None:
            w.reference.close()


def restore(w: Worker) -> TrainerState:
    """This run's latest checkpoint (after a worker-group restart), else the one the driver was asked to
    resume from, else a fresh state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and w.lc.resume_checkpoint:
        # A rerun under the same run_name gets Ray's last registered checkpoint; the driver's choice (the
        # newest complete one) wins when that one was damaged since.
        with checkpoint.as_directory() as d:
            missing = checkpoint_problems(Path(d))
        if missing:
            if w.rank == 0:
                sys.stdout.write(f"Ray Train's latest checkpoint {checkpoint.path} is incomplete "
                                 f"({missing}); resuming from {w.lc.resume_checkpoint}\n")
            checkpoint = None
    if checkpoint is None and w.lc.resume_checkpoint:
        checkpoint = ray.train.Checkpoint.from_directory(w.lc.resume_checkpoint)
    if checkpoint is None:
        state = TrainerState()
    else:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(w.engine, d, w.rank, reference=w.reference)
        if w.rank == 0:
            sys.stdout.write(f"resumed from checkpoint at step {state.global_step} (epoch {state.epoch}, "
                             f"micro-batch {state.micro_in_epoch})\n")
    cfg = w.cfg  # what the data position means, kept in every checkpoint (a resume checks them: trainer.py)
    state.per_device_train_batch_size = cfg.per_device_train_batch_size
    state.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    state.data_seed = cfg.data_order_seed
    state.data_fingerprint = w.lc.data_fingerprint
    if w.rank == 0:  # rows past the checkpoint (a restarted worker group, a torn write) are logged again
        cut_metrics(Path(w.cfg.output_dir) / METRICS_FILE, state.global_step)
    return state


class Run:
    """The loop's moving parts: what happens per micro-batch, per optimizer step, per epoch, at the end."""

    def __init__(self, w: Worker, step: TrainingStep, state: TrainerState):
        self.w, self.step, self.state = w, step, state
        self.cfg, self.lc = w.cfg, w.lc
        self.logger = Logger(self.cfg, w.rank, self.lc.total_steps, run_name=_run_name(self.lc),
                             start_step=state.global_step)
        self.acc = MetricAccumulator()
        self.throughput = Throughput(state)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=w.device)  # checked once per optimizer step
        self.best = w.cfg.best_model_metric()  # (eval key, greater is better) for load_best_model_at_end
        self.last_eval: dict[str, float] = {}
        self.noted = False  # the length-bucketing note, printed once
        # The steps of the last eval and checkpoint: the final ones are not run twice. A restored step was
        # saved, after its eval (if one was due): resuming a finished run evaluates and saves nothing again.
        self.eval_step = self.saved_step = state.global_step if state.global_step else -1
        # The plan: sized on the driver from the rows counted; after the first epoch, from the rows kept.
        self.total_steps, self.num_epochs = self.lc.total_steps, self.lc.num_epochs
        if state.micro_per_epoch is not None:  # resumed after that resizing
            self._resize(state.micro_per_epoch, announce=False)
        state.planned_steps = self.total_steps

    def fire(self, hook: str, metrics: dict[str, float] | None = None) -> None:
        """Call ``hook`` of every callback (dpo_ray.train.callbacks) with this worker's view of the run."""
        if not self.lc.callbacks:
            return
        w = self.w
        ctx = CallbackContext(rank=w.rank, world_size=w.world, global_step=self.state.global_step,
                              total_steps=self.total_steps, epoch=self.epoch_fraction(),
                              output_dir=Path(self.cfg.output_dir), model=w.model,
                              metrics=dict(metrics or {}))
        for cb in self.lc.callbacks:
            getattr(cb, hook)(ctx)

    def epoch(self) -> bool:
        """Train from the state's data position to the end of its epoch; False when the run's last step
        came first."""
        w, state = self.w, self.state
        source = self.step.batches(w.train_shard, epoch=state.epoch)
        try:
            for item in self.step.stream(_skip(source, state.micro_in_epoch)):
                mark(self.lc, w.rank, "first batch")  # the board keeps the first of each stage
                self.throughput.begin()  # training time (every rate's clock) starts at the first batch
                loss, metrics = self.step(w.model, item)
                self.nonfinite |= ~torch.isfinite(loss.detach())
                boundary = w.engine.is_gradient_accumulation_boundary()
                w.engine.backward(loss)  # at a boundary this also all-reduces the gradients
                grad_norm = (_stage0_grad_norm(w.engine) if boundary and self.cfg.deepspeed.zero_stage == 0
                             else None)
                w.engine.step()
                self.acc.add(metrics)
                state.micro_in_epoch += 1
                if boundary:
                    state.global_step += 1
                    mark(self.lc, w.rank, "first step")
                    self.on_optimizer_step(grad_norm if grad_norm is not None else _grad_norm(w.engine))
                    if state.global_step >= self.total_steps:
                        return False
            return True
        finally:
            if w.rank == 0 and self.cfg.length_bucketing == "auto" and getattr(source, "pools", 0) \
                    and not self.noted:
                self.noted = True  # once per run: what the data decided (docs/training.md)
                sys.stdout.write(f"length bucketing (auto): {source.pools_bucketed} of {source.pools} "
                                 f"pool(s) of {source.pool_batches} batches bucketed by length (bucketing "
                                 "saves >= 10% of a pool's tokens there); padding "
                                 f"{source.padding_fraction:.1%} of the tokens\n")

    def fit_plan_to_epoch(self, micro: int) -> None:
        """The first full epoch gave ``micro`` micro-batches on every worker (``counted`` checks they agree);
        the driver planned from the rows it counted, before bad rows were dropped. Fewer: size the rest of the
        run (its steps or its epochs, and the LR schedule's horizon) by the rows that arrived."""
        self.state.micro_per_epoch = micro
        if micro // self.cfg.gradient_accumulation_steps == 0:
            raise TooFewRowsError(
                f"the training data gave {micro} micro-batch(es) per worker in a whole epoch, fewer than one "
                f"optimizer step (gradient_accumulation_steps {self.cfg.gradient_accumulation_steps}): the "
                "rows kept after bad rows were dropped are too few. Give more rows, or lower "
                "per_device_train_batch_size / gradient_accumulation_steps / ray.num_workers")
        if micro < self.lc.micro_per_epoch:
            self._resize(micro, announce=self.w.rank == 0)
            self.state.planned_steps = self.total_steps

    def _resize(self, micro: int, announce: bool) -> None:
        cfg, lc = self.cfg, self.lc
        plan = plan_for_micro_batches(micro, cfg, cfg.ray.num_workers)
        if cfg.max_steps > 0:  # the steps asked for stay; more epochs reach them
            self.num_epochs = plan.num_epochs
        else:
            self.total_steps = min(lc.total_steps, plan.total_steps)
        if self.total_steps != lc.total_steps:
            self.w.resize_schedule(self.total_steps, self.state.global_step)
            self.logger.total = self.total_steps
        if announce:
            sys.stdout.write(f"the first epoch gave {micro} micro-batches per worker, not the "
                             f"{lc.micro_per_epoch} planned from the rows counted (bad rows dropped): the "
                             f"run now has {self.total_steps} optimizer steps over up to {self.num_epochs} "
                             "epoch(s)\n")

    def on_optimizer_step(self, grad_norm: float | None) -> None:
        """Every N steps: the non-finite check, fault injection, the TR-DPO sync, logging, eval,
        checkpoint."""
        cfg, w, step = self.cfg, self.w, self.state.global_step
        if bool(self.nonfinite) or (grad_norm is not None and not math.isfinite(grad_norm)):  # host sync
            raise NonFiniteError(
                f"loss or gradient norm is not finite at step {step} (grad_norm={grad_norm}); lower "
                "learning_rate, check the data of this step, or set max_grad_norm")
        if w.reference is not None and cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
            w.reference.sync_from(w.model, cfg.ref_model_mixup_alpha)
        # fractions of the run's steps
        every = functools.partial(interval_steps, total_steps=self.total_steps)
        log_due = (step % every(cfg.logging_steps) == 0 or step == self.total_steps
                   or (cfg.logging_first_step and step == 1))
        logged = self.log(step, grad_norm) if log_due else {}
        if self.lc.progress is not None and w.rank == 0:  # fire and forget: the driver draws it
            post = {"epoch": round(self.epoch_fraction(), 3),
                    **self.throughput.whole_run(self.state, bool(logged))}
            post.update({k: logged[k] for k in ("loss",) if k in logged})
            self.lc.progress.post.remote(step, post)
        if w.eval_shard is not None and cfg.eval_strategy == "steps" \
                and step % every(cfg.eval_steps or cfg.logging_steps) == 0:
            self.logger.log(step, self.evaluate())
        # the last step's checkpoint is taken by finish(), after its eval (load_best_model_at_end ranks it)
        if cfg.save_strategy == "steps" and step % every(cfg.save_steps) == 0 and step < self.total_steps:
            self.save()
        self.fire("on_step_end")

    def epoch_fraction(self) -> float:
        per_epoch = self.state.micro_per_epoch or self.lc.micro_per_epoch
        return self.state.epoch + self.state.micro_in_epoch / max(per_epoch, 1)

    def save(self) -> None:
        """A checkpoint; with load_best_model_at_end it carries the latest eval metric for Ray Train to
        rank."""
        metrics = {}
        # every checkpoint carries the key Ray ranks by; one before any eval ranks last
        if self.best is not None:
            key, greater = self.best
            metrics[key] = self.last_eval.get(key, float("-inf") if greater else float("inf"))
        if self.w.reference is not None:
            self.state.ref_version = self.w.reference.version  # TR-DPO: the mixed weights travel along
        save_checkpoint(self.w.engine, self.state, self.w.rank, metrics, reference=self.w.reference)
        self.saved_step = self.state.global_step
        self.fire("on_save")

    def log(self, step: int, grad_norm: float | None) -> dict[str, float]:
        reduced = self.acc.reduce()  # the logging step's one collective and host sync
        reduced.update(self.throughput.update(self.state, reduced))
        reduced.update({
            "learning_rate": self.w.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "epoch": self.epoch_fraction(),
        })
        if self.w.device.type == "cuda":  # this rank's allocator peak so far (the GPU check reads it)
            reduced["gpu_peak_mib"] = torch.cuda.max_memory_allocated(self.w.device) / 2**20
        self.logger.log(step, reduced)
        self.fire("on_log", metrics=reduced)
        return reduced

    def on_epoch_end(self) -> None:
        cfg, state = self.cfg, self.state
        if self.w.eval_shard is not None and cfg.eval_strategy == "epoch":
            self.logger.log(state.global_step, self.evaluate())
        if cfg.save_strategy == "epoch" and state.epoch < self.num_epochs:
            self.save()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """One pass over this worker's share of the eval rows (every row scored by one worker, partial last
        batches included); metrics over all rows, reduced over all workers, prefixed eval_."""
        acc = EvalAccumulator()
        real: list[bool] = []
        with eval_mode(self.w.model):
            for item in self.step.eval_stream(self.w.eval_shard, real):
                acc.add(self.step(self.w.model, item)[1], real=real.pop(0))
        self.last_eval = {f"eval_{k}": v for k, v in acc.reduce().items()}
        self.eval_step = self.state.global_step
        self.fire("on_evaluate", metrics=self.last_eval)
        return self.last_eval

    def finish(self) -> None:
        """The last eval, the saved model (every rank joins the ZeRO-3 gather), rank 0's final state."""
        w = self.w
        if self.state.global_step == 0:  # never save the untouched input weights as the result
            raise TooFewRowsError("the run trained 0 optimizer steps: the training data gave no full batch "
                                  "on every worker. Give more rows, or lower per_device_train_batch_size / "
                                  "gradient_accumulation_steps / ray.num_workers")
        if w.eval_shard is not None and self.cfg.eval_strategy != "no" \
                and self.eval_step != self.state.global_step:
            self.logger.log(self.state.global_step, self.evaluate())
        if self.cfg.save_strategy != "no" and self.saved_step != self.state.global_step:
            self.save()  # the last step is never lost to a crash while the model is written
        save_model(w.engine, self.cfg, self.lc.tokenizer, w.rank)
        if w.rank == 0:
            save_final_state(self.cfg, self.state)
        self.fire("on_train_end")


def _run_name(lc: LoopConfig) -> str:
    """The run's TensorBoard folder name: run_name; a resume without one continues its checkpoint's run."""
    import ray.train

    if lc.cfg.run_name:
        return lc.cfg.run_name
    if lc.resume_checkpoint:
        return Path(lc.resume_checkpoint).parent.name
    return ray.train.get_context().get_experiment_name()


def _skip(batches, n: int):
    it = iter(batches)
    for _ in range(n):
        if next(it, None) is None:
            break
    return it


def _stage0_grad_norm(engine) -> float | None:
    """ZeRO-0 engines with a client optimizer don't record the global norm; the grads are already reduced."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
