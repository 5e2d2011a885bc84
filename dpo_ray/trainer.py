"""The driver API:
``DPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=...).train()``.

Builds the Ray Data pipeline, the reference source, and a Ray Train ``TorchTrainer`` whose workers run
``dpo_ray.train.loop.train_loop_per_worker``; then writes the outputs (metrics, plot, report, config).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_ray.cluster import (
    TrainingProgress,
    alive_nodes,
    check_nodes_see_paths,
    cluster_has_gpu,
    init_ray,
    torch_trainer_class,
    worker_env,
    worker_resources,
)
from dpo_ray.config import DPOConfig
from dpo_ray.errors import ConfigError, ModelFilesError, TooFewRowsError, TrainingInterrupted
from dpo_ray.paths import check_paths, resolve_config_paths
from dpo_ray.timeline import Timeline
from dpo_ray.train.checkpoint import (
    CHECKPOINT_STATE_FILE,
    FINAL_STATE_FILE,
    checkpoint_problems,
    saved_checkpoints,
)
from dpo_ray.train.logger import METRICS_FILE, cut_metrics, read_metrics


@dataclass
class TrainOutput:
    """What ``train()`` returns: the last logged metrics, every logged row, and the final report."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    report: dict[str, Any]
    output_dir: str
    eval_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Run:
    """What the stages of one ``DPOTrainer.train`` call share, filled in as they run."""

    cfg: DPOConfig
    t0: float  # perf_counter at the start (the report's wall time)
    timeline: Timeline
    out: Path | None = None
    resume: Path | None = None  # the checkpoint to resume from
    tokenizer: Any = None
    use_gpu: bool = False
    prepared: Any = None  # data.PreparedData
    fingerprint: str | None = None  # the data's, for resume and checkpoints
    plan: Any = None  # data.step_plan.StepPlan
    model_source: Any = None  # a directory path or an ObjectRef of the weights
    progress: Any = None  # cluster.TrainingProgress
    pool: Any = None  # the reference actor pool, when there is one
    trainer: Any = None  # Ray Train's TorchTrainer
    result: Any = None  # what fit() returned


class DPOTrainer:
    """TRL-shaped driver. ``mode="sft"`` runs the supervised stage on the same machinery.

    model: a directory path, an in-memory ``PreTrainedModel`` (shipped through the object store), or None
    (``args.model_name_or_path``, else the bundled tiny Llama). ref_model: a directory or in-memory model
    for the reference (default: the policy's initial weights). processing_class: a tokenizer (default:
    loaded from the model directory, else the bundled one; required with an in-memory model).
    """

    def __init__(self, model=None, ref_model=None, args: DPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, mode: str = "dpo",
                 callbacks=None):
        from dpo_ray.train.callbacks import check_callbacks

        if mode not in ("dpo", "sft"):
            raise ValueError(f"mode={mode!r}: choose 'dpo' or 'sft'")
        self.callbacks = check_callbacks(callbacks)
        args = args or DPOConfig()
        # A model or reference given as a path is the config's path (one place to resolve and check it).
        # Rebuilt from the keys the user set, so defaults that depend on others (the reference under PEFT)
        # are worked out again.
        if isinstance(model, (str, os.PathLike)):
            args = DPOConfig(**{**args.model_dump(exclude_unset=True), "model_name_or_path": str(model)})
            model = None
        if ref_model is not None and args.reference_source_defaulted and args.reference.source != "actor":
            # TRL uses a ref_model it is given, also under PEFT: a separate reference model (the actor pool)
            dump = args.model_dump(exclude_unset=True)
            args = DPOConfig(**{**dump, "reference": {**dump.get("reference", {}), "source": "actor"}})
        if isinstance(ref_model, (str, os.PathLike)):
            dump = args.model_dump(exclude_unset=True)
            args = DPOConfig(**{**dump, "reference": {**dump.get("reference", {}),
                                                      "model_name_or_path": str(ref_model)}})
            ref_model = None
        # Relative paths are the working directory's, here on the driver; workers get absolute ones.
        self.args = resolve_config_paths(args)
        self.mode = mode
        self.model = model if model is not None else self.args.model_name_or_path
        self.ref_model = ref_model
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        if model is not None and processing_class is None:  # never the bundled tokenizer and toy data
            raise ModelFilesError(
                f"DPOTrainer(model=<{type(model).__name__}>) got a model object and no processing_class: "
                "pass its tokenizer as processing_class= (as with TRL), or the model's directory as model= "
                "with the tokenizer saved beside it. The bundled 66-token tokenizer and toy data belong to "
                "the bundled tiny model only")
        if peft_config is not None:  # a peft.LoraConfig, TRL style: fold it into the config
            self.args = _apply_peft_config(self.args, peft_config)
        if self.ref_model is not None and self.args.sync_ref_model and self.args.uses_peft:
            raise ConfigError([("sync_ref_model",
                                "TR-DPO with a PEFT policy mixes the adapter-wrapped policy into a "
                                "copy of itself; a separate ref_model= has no adapter parameters to "
                                "mix into: drop ref_model, or turn off sync_ref_model")])

    # ---------------------------------------------------------------------------------------- train
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run the training. For its whole length the run holds an exclusive lock on output_dir (and on its
        Ray Train folder under a local ray.storage_path): a second run into either stops at once, naming this
        one."""
        from dpo_ray.owned import OwnershipError

        self._run_name = self.args.run_name or default_run_name(self.mode)
        locks = run_locks(self.args, self._run_name)
        try:
            for lock in locks:
                try:
                    lock.acquire()
                except OwnershipError as e:
                    raise ConfigError([(lock.what, str(e))]) from None
            return self._train(resume_from_checkpoint)
        finally:
            for lock in locks:
                lock.release()

    def _train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """The recipe: each stage is a method below, in this order; ``_Run`` carries what they share."""
        # checks that need no cluster: fail fast, delete nothing
        run = self._before_ray(resume_from_checkpoint)
        self._start_ray(run)
        self._prepare_data(run)
        self._ship_model(run)
        self._fit(run)
        self._check_outputs(run)
        return self._write_outputs(run)

    # ------------------------------------------------------------------------------------- the stages
    def _before_ray(self, resume_from_checkpoint) -> _Run:
        """Paths, output_dir, the checkpoint to resume (and its batch geometry), the tokenizer: before Ray
        starts, so a missing model directory or a refused output_dir fails at once, naming the key."""
        from dpo_ray.data import load_processing_class

        run = _Run(cfg=self.args, t0=time.perf_counter(), timeline=Timeline.for_run())
        run.timeline.mark("imports")
        check_paths(run.cfg)
        run.out = Path(run.cfg.output_dir).resolve()
        # Before anything starts or is deleted: which checkpoint, and whether output_dir may be written.
        run.resume = _find_checkpoint(resume_from_checkpoint or run.cfg.resume_from_checkpoint, run.out,
                                      run.cfg)
        _check_output_dir(run.cfg, run.out, run.resume, self._run_name)
        if run.resume is not None:  # the batch geometry now; the data's content once it is read
            _check_resume(run.resume, run.cfg, None)
        run.tokenizer = self.processing_class or load_processing_class(
            self.model if isinstance(self.model, str) else run.cfg)
        return run

    def _start_ray(self, run: _Run) -> None:
        """Start or join Ray; decide ``reference.source: auto`` by the cluster's size; check every node sees
        the paths; GPU or CPU workers."""
        import ray

        where = run.cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():  # the first line of the run: Ray's start takes seconds
            print(f"dpo-ray {self.mode}: "
                  f"{f'joining the Ray cluster at {where}' if where else 'starting a local Ray'}",
                  flush=True)
        init_ray(run.cfg)
        run.timeline.mark("ray")
        if self.mode == "dpo":
            run.cfg = run.cfg.resolve_auto_reference(nodes=alive_nodes())
            print(run.cfg.describe_reference(), flush=True)
        check_nodes_see_paths(run.cfg)
        run.out.mkdir(parents=True, exist_ok=True)
        run.use_gpu = run.cfg.ray.use_gpu if run.cfg.ray.use_gpu is not None else cluster_has_gpu()

    def _prepare_data(self, run: _Run) -> None:
        """The Ray Data pipeline, its fingerprint (resume checks the data is the same), the quick data checks
        and the step plan from the rows counted."""
        from dpo_ray.data import build_datasets
        from dpo_ray.data.step_plan import plan_steps, require_steps
        from dpo_ray.vision import is_processor

        cfg = run.cfg
        prepared = run.prepared = build_datasets(cfg, run.tokenizer, self.train_dataset, self.eval_dataset,
                                                 mode=self.mode)
        print(f"dpo-ray {self.mode}: model {_describe_model(self.model)}", flush=True)
        print(prepared.summary(), flush=True)  # which tokenizer, which files: never a silent fallback
        run.fingerprint = (data_fingerprint(prepared, cfg, self.train_dataset)
                           if run.resume is not None or cfg.save_strategy != "no" else None)
        if run.resume is not None:
            _check_resume(run.resume, cfg, run.fingerprint)
        if self.mode == "dpo" and prepared.preview_rows and not is_processor(run.tokenizer) \
                and not prepared.groups:
            from dpo_ray.data.checks import quick_checks

            for warning in quick_checks(prepared.preview_rows, run.tokenizer, cfg):  # once per kind
                print(f"dpo-ray data warning: {warning}", file=sys.stderr)
        # rows counted, not kept
        run.plan = plan_steps(prepared.num_train_rows_estimate, cfg, cfg.ray.num_workers)
        require_steps(run.plan, cfg)
        run.timeline.mark("data plan")

    def _ship_model(self, run: _Run) -> None:
        """The policy's source for the workers: a directory path, or the weights in Ray's object store (the
        tiny default is built here, once: every worker and the reference start from bit-identical weights)."""
        import ray

        from dpo_ray.models import load_causal_lm, shippable

        source: Any = self.model
        if source is None:
            source = load_causal_lm(None, run.cfg, run.tokenizer)
        if not isinstance(source, str):
            source = ray.put(shippable(source))
        run.model_source = source
        run.timeline.mark("model")

    def _loop_config(self, run: _Run):
        """What every worker gets; prints the step plan. Ray Train V2 resumes its own run from
        get_checkpoint(); a checkpoint from an earlier run is handed to the workers as a path (shared storage
        on a cluster)."""
        from dpo_ray.train.setup import LoopConfig

        cfg, plan, prepared = run.cfg, run.plan, run.prepared
        world = cfg.ray.num_workers
        lc = LoopConfig(cfg=cfg, mode=self.mode, tokenizer=run.tokenizer, total_steps=plan.total_steps,
                        num_epochs=plan.num_epochs, micro_per_epoch=plan.micro_per_epoch,
                        model=run.model_source,
                        resume_checkpoint=str(run.resume) if run.resume is not None else None,
                        data_fingerprint=run.fingerprint, callbacks=tuple(self.callbacks))
        rows = "prompt groups" if prepared.groups else "pairs" if self.mode == "dpo" else "sequences"
        used = plan.micro_per_epoch * world * cfg.per_device_train_batch_size
        print(f"dpo-ray {self.mode}: plan: {plan.total_steps} optimizer steps ({plan.steps_per_epoch} per "
              f"epoch, up to {plan.num_epochs} epoch(s)); {plan.rows_per_step(cfg)} {rows} per step = "
              f"{world} worker(s) × per_device_train_batch_size {cfg.per_device_train_batch_size} × "
              "gradient_accumulation_steps "
              f"{cfg.gradient_accumulation_steps}{_untrained(prepared.num_train_rows_estimate, used)}",
              flush=True)
        return lc

    def _fit(self, run: _Run) -> None:
        """The reference (actor pool or precompute pass), the progress display, Ray Train's fit. Whatever
        fails, the reference actors and the progress board are stopped; a Ctrl-C, a reference that never
        loaded and a bad row met mid-stream are each raised as what they are."""
        import ray
        import ray.train

        from dpo_ray.data import ingest_config, unwrap_data_error
        from dpo_ray.train.loop import train_loop_per_worker

        cfg, out, prepared = run.cfg, run.out, run.prepared
        lc = self._loop_config(run)
        pool = None
        try:
            run.progress = TrainingProgress(self.mode, run.plan.total_steps, run.plan.rows_per_step(cfg))
            lc.progress = run.progress.board
            if self.mode == "dpo" and cfg.needs_reference:
                pool = run.pool = self._reference_setup(cfg, run.model_source, run.tokenizer, prepared, lc)
                run.timeline.mark("reference pool")
            _prepare_metrics_file(out, run.resume)
            (out / "dpo_config.yaml").write_text(cfg.to_yaml())
            datasets = {"train": prepared.train}
            if prepared.eval is not None and (cfg.eval_strategy != "no" or cfg.eval_on_start):
                datasets["eval"] = prepared.eval
            best = cfg.best_model_metric()
            run.trainer = trainer = torch_trainer_class()(
                train_loop_per_worker,
                train_loop_config={"loop": lc},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.ray.num_workers, use_gpu=run.use_gpu,
                    resources_per_worker=worker_resources(cfg, run.use_gpu),
                    placement_strategy=cfg.ray.placement_strategy),
                run_config=ray.train.RunConfig(
                    name=self._run_name, storage_path=storage_root(cfg, out),
                    failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                    checkpoint_config=ray.train.CheckpointConfig(
                        num_to_keep=cfg.save_total_limit,
                        checkpoint_score_attribute=best[0] if best else None,
                        checkpoint_score_order="max" if best and best[1] else "min"),
                    worker_runtime_env={"env_vars": worker_env(run.use_gpu)},
                ),
                datasets=datasets,
                dataset_config=ingest_config(),  # eval rows: each scored once (docs/training.md)
            )
            run.timeline.mark("fit")
            try:
                with _sigint_restored():  # Ray's fit() installs a Ctrl-C handler (ours) and never removes it
                    # Ray Train V2 raises a worker's error (WorkerGroupError) from fit()
                    run.result = trainer.fit()
            except Exception as e:
                if trainer.interrupted:  # Ctrl-C: whatever the aborted workers raised, the user stopped it
                    raise self._interrupted(run) from e
                # the reference actors never loaded: that is the cause
                if getattr(pool, "error", None) is not None:
                    raise pool.error from e
                data_error = unwrap_data_error(e)  # a bad row met mid-stream: name it, not the worker
                if data_error is None:
                    raise
                if isinstance(data_error, TooFewRowsError) and prepared.stats is not None:
                    # the workers found no optimizer step in the rows kept: say how many were kept of how many
                    from dpo_ray.data.stats import check_trained

                    check_trained(0, run.plan.total_steps, prepared.stats.report(),
                                  prepared.num_train_rows_estimate, cfg.max_dropped_fraction)
                raise data_error from e
        except KeyboardInterrupt as e:  # Ctrl-C outside fit(), or a second one inside it
            if isinstance(e, TrainingInterrupted):
                raise
            raise self._interrupted(run) from e
        finally:
            if run.progress is not None:
                run.progress.close()
                run.timeline.merge(run.progress.marks)
            if pool is not None:
                if getattr(pool, "ready_at", None) is not None:
                    run.timeline.mark("reference ready", pool.ready_at)
                pool.shutdown()

    def _check_outputs(self, run: _Run) -> None:
        """fit() returned: a Ctrl-C before the model was written, a worker's error, or model files that are
        not whole are raised; never reported as success."""
        from dpo_ray.data import unwrap_data_error
        from dpo_ray.train.checkpoint import model_files_problem

        out, trainer, result = run.out, run.trainer, run.result
        if trainer.interrupted and model_files_problem(out, run.cfg):
            raise self._interrupted(run)
        # Ctrl-C after the model was written (the workers' last moments): the run is finished, a success
        if getattr(result, "error", None) is not None and not trainer.interrupted:
            if getattr(run.pool, "error", None) is not None:
                raise run.pool.error from result.error
            raise (unwrap_data_error(result.error) or result.error) from result.error
        missing = model_files_problem(out, run.cfg)
        if missing:
            raise RuntimeError(f"training finished but {out} lacks {missing}; the model was not saved "
                               "completely (a full disk, or a worker lost while writing). Resume with "
                               "resume_from_checkpoint: latest")

    def _write_outputs(self, run: _Run) -> TrainOutput:
        """report.json (steps, data counts, throughput, start-up, the best model), metrics.png; a run that
        trained no step, or dropped most of a split, is an error (exit 3), fewer steps than planned a note."""
        from dpo_ray.data.stats import check_trained

        cfg, out, prepared = run.cfg, run.out, run.prepared
        history = read_metrics(out / METRICS_FILE)
        report = self._final_report(cfg, history, prepared, time.perf_counter() - run.t0, out)
        # the whole run's, from the first batch (train.logger.Throughput)
        report["throughput"] = run.progress.final
        report["startup"] = run.timeline.seconds()
        report["startup_line"] = run.timeline.render()
        short = check_trained(report["steps"], run.plan.total_steps, report["data"],
                              prepared.num_train_rows_estimate, cfg.max_dropped_fraction)
        if short:
            print(f"dpo-ray: {short}", file=sys.stderr)
            report["note"] = short
        best = cfg.best_model_metric()
        if best is not None:
            report["best_model"] = _load_best_model(cfg, best, history,
                                                    trainer_storage(cfg, self._run_name, out),
                                                    run.model_source, run.tokenizer, out)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        train_rows = [r for r in history if "loss" in r]
        eval_rows = [r for r in history if any(k.startswith("eval_") for k in r)]
        if history:
            from dpo_ray.plotting import plot_metrics

            try:
                plot_metrics(history, out / "metrics.png")
            except ImportError as e:  # the air-gapped wheelhouse ships no matplotlib (docs/deploy.md)
                sys.stderr.write(f"metrics.png not written: {e} (pip install matplotlib); metrics.jsonl has "
                                 "every row\n")
        return TrainOutput(metrics=train_rows[-1] if train_rows else {}, history=history, report=report,
                           output_dir=str(out), eval_metrics=eval_rows[-1] if eval_rows else {})

    # ------------------------------------------------------------------------------------- helpers
    def _reference_setup(self, cfg, model_source, tokenizer, prepared, lc):
        """Start the reference actor pool, or run the precompute pass; returns what to shut down after."""
        source = cfg.reference.source
        ref_source = self.ref_model if self.ref_model is not None else cfg.reference.model_name_or_path
        if ref_source is not None and not isinstance(ref_source, str):
            import ray

            from dpo_ray.models import shippable

            ref_source = ray.put(shippable(ref_source))
        if ref_source is None:
            ref_source = model_source
        if source == "actor":
            from dpo_ray.reference.pool import ReferencePool

            # loading overlaps the worker group's start; a failure to load stops the run naming the actor
            pool = ReferencePool.create(cfg, ref_source, tokenizer, wait=False)
            lc.reference_pool = pool.handles()
            return pool
        if source == "precomputed":
            from dpo_ray.reference.precompute import attach_reference_logps

            prepared.train = attach_reference_logps(prepared.train, cfg, ref_source, tokenizer, split="train",
                                                    groups=prepared.groups)
            if prepared.eval is not None:
                prepared.eval = attach_reference_logps(prepared.eval, cfg, ref_source, tokenizer,
                                                       split="eval", groups=prepared.groups)
        elif source == "local" and ref_source is not model_source:
            lc.ref_model = ref_source
        return None

    def _final_report(self, cfg, history, prepared, wall, out: Path) -> dict[str, Any]:
        state_file = out / FINAL_STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        report = {
            "mode": self.mode,
            "status": "completed",
            "steps": state.get("global_step"),
            "pairs": state.get("pairs_seen"),
            "tokens": state.get("tokens_seen"),
            "wall_time_s": round(wall, 2),
            "data": prepared.stats.report() if prepared.stats is not None else {},
            "final_metrics": next((r for r in reversed(history) if "loss" in r), {}),
            "final_eval_metrics": next((r for r in reversed(history)
                                        if any(k.startswith("eval_") for k in r)), {}),
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report


    def _interrupted(self, run: _Run) -> TrainingInterrupted:
        """After Ctrl-C: report.json says "interrupted", with the last step and the checkpoint to resume from
        (the newest complete one of this run, else the one it resumed from); the exception the CLI turns into
        one line and exit status 130."""
        cfg, out, run_name, resume, progress = run.cfg, run.out, self._run_name, run.resume, run.progress
        history = read_metrics(out / METRICS_FILE)
        step = getattr(progress, "step", None) or max((r["step"] for r in history if "loss" in r),
                                                      default=None)
        checkpoint = _newest_complete_checkpoint(trainer_storage(cfg, run_name, out)) or resume
        checkpoint_step = (json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text())["global_step"]
                           if checkpoint is not None else None)
        report = {"mode": self.mode, "status": "interrupted", "steps": step,
                  "checkpoint": str(checkpoint) if checkpoint is not None else None,
                  "checkpoint_step": checkpoint_step,
                  "resume_from_checkpoint": str(checkpoint) if checkpoint is not None else None}
        path = out / "report.json"
        try:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
        except OSError:
            path = None
        return TrainingInterrupted(step, report["checkpoint"], checkpoint_step, str(path) if path else None)


def _describe_model(model) -> str:
    """The run header's policy: a directory, an in-memory model (its class and size), or the bundled tiny
    one."""
    if model is None:
        return "the bundled tiny Llama (no model_name_or_path)"
    if isinstance(model, str):
        return model
    params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    size = f", {params / 1e6:.3g}M parameters" if params else ""
    return f"an in-memory {type(model).__name__} (given to DPOTrainer{size})"


def _newest_complete_checkpoint(storage: Path) -> Path | None:
    found = saved_checkpoints(storage)
    for ckpt in (found[step] for step in sorted(found, reverse=True)):
        if not checkpoint_problems(ckpt):
            return ckpt
    return None


class _sigint_restored:
    """Puts back the SIGINT handler that was in place before (Ray Train's fit() installs its own, for
    good)."""

    def __enter__(self):
        import signal
        import threading

        self.main = threading.current_thread() is threading.main_thread()
        self.previous = signal.getsignal(signal.SIGINT) if self.main else None
        return self

    def __exit__(self, *exc):
        import signal

        if self.main and self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _find_checkpoint(resume, out: Path, cfg: DPOConfig) -> Path | None:
    """resume_from_checkpoint: a checkpoint directory, or True/'latest': the newest *complete* checkpoint of
    run ``run_name`` under the Ray Train storage (``ray.storage_path`` or ``output_dir/ray_results``); with no
    run_name, of the most recently written run there. Half-written checkpoints are skipped, saying so."""
    if not resume:
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        root = Path(cfg.ray.storage_path or out / "ray_results").resolve()
        if cfg.run_name:
            found = saved_checkpoints(root / cfg.run_name)
        else:  # the run folder whose newest-written checkpoint is the most recent
            runs = [c for c in (saved_checkpoints(p) for p in root.glob("*") if p.is_dir()) if c]
            found = max(runs, key=lambda c: max(p.stat().st_mtime for p in c.values()), default={})
        for ckpt in (found[step] for step in sorted(found, reverse=True)):
            problem = checkpoint_problems(ckpt)
            if not problem:
                if not cfg.run_name:
                    print(f"resume_from_checkpoint latest: run {ckpt.parent.name!r}, the most recent under "
                          f"{root}: {ckpt.name}", flush=True)
                return ckpt
            print(f"resume_from_checkpoint latest: skipping {ckpt}, half-written ({problem})",
                  file=sys.stderr)
        where = root / cfg.run_name if cfg.run_name else root
        raise FileNotFoundError(f"resume_from_checkpoint latest: no complete checkpoint under {where}"
                                + ("" if cfg.run_name else " (no run_name given: the most recent run was "
                                                           "searched)"))
    path = Path(resume).resolve()
    if not (path / CHECKPOINT_STATE_FILE).exists():
        raise FileNotFoundError(f"resume_from_checkpoint={resume}: not a dpo_ray checkpoint (no "
                                f"{CHECKPOINT_STATE_FILE})")
    problem = checkpoint_problems(path)
    if problem:
        raise FileNotFoundError(f"resume_from_checkpoint={resume}: the checkpoint is half-written "
                                f"({problem}); give an earlier one, or 'latest' for the newest complete one")
    return path


# What a finished (or running) run leaves in output_dir; a second run must not mix its files with them.
_PREVIOUS_RUN_FILES = ("model.safetensors", "config.json", "adapter_model.safetensors", METRICS_FILE,
                       "dpo_config.yaml", FINAL_STATE_FILE, "report.json")


def _check_output_dir(cfg: DPOConfig, out: Path, resume: Path | None, run_name: str | None = None) -> None:
    """Refuse a new run into an output_dir holding an earlier run's outputs (or into a run_name whose Ray
    Train storage has checkpoints, which Ray would silently continue), unless resuming or
    overwrite_output_dir; refuse a root, a home directory or a repository as output_dir, and an overwrite of
    files dpo_ray did not write. Then mark output_dir and the run's Ray Train folder as dpo_ray's
    (dpo_ray/owned.py): only marked folders, and inside them only what dpo_ray wrote, are ever deleted or
    replaced."""
    from dpo_ray.owned import (
        LOCK_FILE,
        OWNER_FILE,
        OwnershipError,
        is_owned,
        mark_owned,
        remove_owned,
        root_problem,
    )
    from dpo_ray.paths import is_remote

    problem = root_problem(out, "output_dir")
    if problem:
        raise ConfigError([("output_dir",
                            f"{problem}; dpo_ray writes (and on overwrite replaces) a model there")])
    remote = bool(cfg.ray.storage_path) and is_remote(cfg.ray.storage_path)
    run_name = run_name or cfg.run_name
    storage = trainer_storage(cfg, run_name, out) if run_name and not remote else None
    if resume is None:
        found = [f for f in _PREVIOUS_RUN_FILES if (out / f).exists()]
        reused = storage is not None and bool(saved_checkpoints(storage))
        if (found or reused) and not cfg.overwrite_output_dir:
            what = (f"output_dir {out} holds an earlier run's {', '.join(found)}" if found else
                    f"run_name {run_name!r} already has checkpoints in {storage}")
            raise ConfigError([("output_dir",
                                f"{what}. Continue that run with resume_from_checkpoint: latest (or a "
                                "checkpoint directory), or replace it with overwrite_output_dir: true "
                                "(or choose another output_dir / run_name)")])
        if found and not is_owned(out):
            raise ConfigError([("output_dir",
                                f"overwrite_output_dir: {out} holds {', '.join(found)} but no {OWNER_FILE} "
                                "marker, so dpo_ray did not write them and will not replace them; remove "
                                "them yourself or choose another output_dir")])
        if reused:  # overwriting: Ray Train would otherwise resume from this run name's last checkpoint
            print(f"overwrite_output_dir: removing run {run_name!r}'s checkpoints in {storage}", flush=True)
            try:
                if not is_owned(storage):
                    raise OwnershipError(f"{storage} has no {OWNER_FILE} marker, so dpo_ray did not make it")
                for child in storage.iterdir():  # the folder stays: it holds this run's lock
                    if child.name not in (LOCK_FILE, OWNER_FILE):
                        remove_owned(child, storage)
            except OSError as e:
                raise ConfigError([("run_name",
                                    f"overwrite_output_dir: {e}; choose another run_name")]) from None
    mark_owned(out, "output_dir")
    if storage is not None:
        problem = root_problem(storage.parent, "ray.storage_path")
        if problem:
            raise ConfigError([("ray.storage_path", problem)])
        mark_owned(storage.parent, "ray-storage")
        mark_owned(storage, "ray-train-run")


def _check_resume(resume: Path, cfg: DPOConfig, fingerprint: str | None) -> None:
    """Refuse to resume from a checkpoint whose data position means other rows in this run: another world
    size, per-device batch size, gradient accumulation, data seed, or dataset (``fingerprint``; None: not
    checked yet)."""
    from dpo_ray.train.checkpoint import resume_mismatches

    state = json.loads((resume / CHECKPOINT_STATE_FILE).read_text())
    now = {"world_size": cfg.ray.num_workers, "per_device_train_batch_size": cfg.per_device_train_batch_size,
           "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
           "data_seed": cfg.data_order_seed, "data_fingerprint": fingerprint}
    problems = resume_mismatches(state, now)
    if problems:
        raise ConfigError(problems)


# settings that decide which rows the training split holds and in which order (the seeds are checked apart)
_DATA_SETTINGS = ("dataset_config", "dataset_train_split", "eval_fraction", "max_train_samples", "on_bad_row",
                  "max_length", "max_prompt_length", "truncation_mode")


def data_fingerprint(prepared, cfg: DPOConfig, given=None) -> str:
    """A hash of the training rows' identity, recorded in every checkpoint: each input file's name, size and
    the bytes of its first and last 64 KiB (a moved or copied file matches; an edited one does not), the row
    count and the data settings. In-memory data (``given``): a list of rows by content, a Hugging Face dataset
    by its own fingerprint; other in-memory datasets by row count only (nothing is read twice to hash it)."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    try:
        files = sorted(prepared.train.input_files())
    except Exception:  # a dataset without a file list
        files = []
    for f in files:
        h.update(f"{os.path.basename(f)}|".encode())
        if os.path.isfile(f):
            size = os.path.getsize(f)
            h.update(f"{size}|".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(65536))
                fh.seek(max(0, size - 65536))
                h.update(fh.read(65536))
    if not files and isinstance(given, (list, tuple)):
        h.update(json.dumps(list(given), sort_keys=True, default=str).encode())
    elif not files and getattr(given, "_fingerprint", None):  # datasets.Dataset
        h.update(str(given._fingerprint).encode())
    settings = {k: getattr(cfg, k, None) for k in _DATA_SETTINGS}
    h.update(json.dumps([prepared.num_train_rows_estimate, settings], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _prepare_metrics_file(out: Path, resume) -> None:
    """A fresh run starts a fresh metrics.jsonl; a resumed one keeps the rows up to its checkpoint (rank 0
    cuts it again at restore, as after a worker-group restart)."""
    from dpo_ray.owned import remove_owned

    path = out / METRICS_FILE
    for stale in (FINAL_STATE_FILE, "report.json"):
        remove_owned(out / stale, out)
    if not path.exists():
        return
    if resume is None:
        remove_owned(path, out)
        return
    cut_metrics(path, json.loads((resume / CHECKPOINT_STATE_FILE).read_text())["global_step"])


def print_summary(out) -> None:
    print(f"\n== {out.report['mode']} finished: {out.report['steps']} steps, {out.report['pairs']} "
          f"{'pairs' if out.report['mode'] == 'dpo' else 'sequences'}, {out.report['tokens']} tokens, "
          f"{out.report['wall_time_s']} s")
    rows = {**out.metrics, **out.eval_metrics}
    window = ("samples_per_second", "tokens_per_second")  # the last logging window's: metrics.jsonl has them
    for k in sorted(rows):
        if k != "step" and k not in window and isinstance(rows[k], (int, float)):
            print(f"  {k:<28} {rows[k]:.6g}")
    rates = out.report.get("throughput") or {}
    if rates:
        print(f"  throughput: pairs_per_s {rates['pairs_per_s']:.4g} | tokens_per_s "
              f"{rates['tokens_per_s']:.4g} over {rates['train_runtime_s']:.1f} s of training (from the "
              "first batch; start-up on its own line)")
    if out.report.get("data"):
        print(f"  data: {json.dumps(out.report['data'])}")
    if out.report.get("startup_line"):
        print(f"  {out.report['startup_line']}")
    print(f"  outputs: {out.output_dir} (model, tokenizer, dpo_config.yaml, metrics.jsonl, metrics.png, "
          "report.json)")


def trainer_storage(cfg: DPOConfig, run_name: str, out: Path) -> Path:
    """Where Ray Train keeps this run's checkpoints:
    ``<ray.storage_path or output_dir/ray_results>/<run_name>`` (a local path: see ``storage_root`` for a
    URI)."""
    return Path(cfg.ray.storage_path or out / "ray_results").resolve() / run_name


def storage_root(cfg: DPOConfig, out: Path) -> str:
    """Ray Train's ``storage_path``: a URI (``s3://``, ``gs://``, ``file://``...) exactly as given, so Ray's
    own file systems (pyarrow) write there; else the absolute local path (default
    ``output_dir/ray_results``)."""
    from dpo_ray.paths import is_remote

    if cfg.ray.storage_path and is_remote(cfg.ray.storage_path):
        return cfg.ray.storage_path
    return str(Path(cfg.ray.storage_path or out / "ray_results").resolve())


def default_run_name(mode: str) -> str:
    """``dpo_ray-<mode>-<date>-<time>-<6 random hex>``: two runs started in the same second never share a
    name."""
    import secrets

    return f"dpo_ray-{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def run_locks(cfg: DPOConfig, run_name: str) -> list:
    """The run's exclusive locks (dpo_ray.owned.RunLock): output_dir, and its Ray Train folder when that lies
    outside output_dir (a local ray.storage_path). Not acquired yet."""
    from dpo_ray.owned import RunLock, root_problem
    from dpo_ray.paths import is_remote

    out = Path(cfg.output_dir).resolve()
    problem = root_problem(out, "output_dir")
    if problem:
        raise ConfigError([("output_dir",
                            f"{problem}; dpo_ray writes (and on overwrite replaces) a model there")])
    locks = [RunLock(out, "output_dir")]
    if cfg.ray.storage_path and not is_remote(cfg.ray.storage_path):
        storage = trainer_storage(cfg, run_name, out)
        if out not in storage.parents:
            locks.append(RunLock(storage, "ray.storage_path/run_name"))
    return locks


def _load_best_model(cfg: DPOConfig, best: tuple[str, bool], history: list[dict], storage: Path, model_source,
                     tokenizer, out: Path) -> dict[str, Any]:
    """load_best_model_at_end: when a saved step scored better on the eval metric than the final weights, its
    weights replace the model in ``output_dir`` (transformers' rule: the best among the saved checkpoints and,
    as transformers also saves the last step, the end of the run)."""
    from dpo_ray.train.checkpoint import export_checkpoint
    from dpo_ray.train.metrics import best_checkpoint_step

    key, greater = best
    saved = saved_checkpoints(storage)
    last = max((r["step"] for r in history), default=0)
    step = best_checkpoint_step(history, [*saved, last], key, greater)
    if step is None or step == last or step not in saved:
        return {"metric": key, "step": last, "from": "the final weights"}
    export_checkpoint(saved[step], cfg, model_source, tokenizer, out)
    return {"metric": key, "step": step, "from": str(saved[step])}


def _untrained(rows: int, used: int) -> str:
    """The plan line's note on the rows an epoch leaves out: each worker's last partial batch and the uneven
    remainder of the shards (as TRL with dataloader_drop_last; docs/training.md)."""
    left = rows - used
    return (f"; {left} of ~{rows} rows per epoch not trained (the last partial batch of each worker's share, "
            "as dataloader_drop_last)") if left > 0 else ""


def _apply_peft_config(cfg: DPOConfig, peft_config) -> DPOConfig:
    update = {"use_peft": True, "lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
              "lora_dropout": peft_config.lora_dropout}
    if peft_config.target_modules:
        update["lora_target_modules"] = sorted(peft_config.target_modules)
    if peft_config.modules_to_save:
        update["lora_modules_to_save"] = list(peft_config.modules_to_save)
    return DPOConfig(**{**cfg.model_dump(exclude_unset=True), **update})
