"""Hyper-parameter sweeps on Ray Tune whose trials share one reference pass (docs/sweeps.md).

``run_sweep(base, param_space)`` (and ``dpo-ray sweep --config base.yaml --grid beta=0.05,0.1 ...``):

1. for every grid point, the reference log-probs are looked up in a content-addressed store
   (``dpo_ray.reference.store``) and computed where missing, once per distinct reference key, before any trial
   starts; a key none of the grid points gives (a sampled ``ld_alpha``, say) is computed by the first trial
   that needs it, under the store's lock, once;
2. every trial is a Tune function trainable (``dpo_trial``) that runs ``DPOTrainer.train`` (a Ray Train fit
   nested in the trial) with ``reference.source: precomputed`` pointing at the store, in its own directory
   ``<sweep_dir>/trials/<trial>``, and reports each logged row to Tune while it trains (so schedulers such as
   ASHA stop poor trials on the eval metric); a failed trial is recorded, the others go on;
3. the results: ``results.csv`` / ``results.json`` (one row per trial: the varied keys, final train and eval
   metrics, the bundled task's metric where defined, steps, wall time, status, output directory),
   ``sweep.png`` (eval reward accuracy and margins over steps, one line per trial) and ``sweep_summary.json``
   (the best trial and where its model is).

The Python pieces for a Tuner of one's own: ``plan = prepare_sweep(base, param_space)`` runs step 1 and gives
``plan.trainable`` and ``plan.param_space``; ``plan.summarize(tuner.fit(), metric, mode)`` writes step 3.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_ray.config import DPOConfig
from dpo_ray.dicts import merged, nest
from dpo_ray.errors import ConfigError
from dpo_ray.train.logger import read_metrics

# Keys that never change the reference log-probs (what the policy optimises and how the run is organised):
# trials that differ only in these share a reference pass without even hashing their data again. Any other key
# (seed, max_length, ld_alpha, the data, the model...) is checked by content: the store key decides.
REFERENCE_FREE_KEYS = frozenset((
    "beta", "loss_type", "loss_weights", "label_smoothing", "learning_rate", "rpo_alpha", "use_weighting",
    "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "weight_decay", "warmup_ratio",
    "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "optim", "optim_args", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "max_steps", "num_train_epochs", "logging_steps",
    "eval_steps", "save_steps", "save_strategy", "eval_strategy", "save_total_limit", "logging_first_step",
    "eval_on_start", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "report_to",
    "gradient_accumulation_steps", "per_device_train_batch_size", "router_aux_loss_coef", "output_dir",
    "run_name", "resume_from_checkpoint", "ray", "deepspeed", "gradient_checkpointing", "length_bucketing",
    "disable_dropout", "inspect", "overwrite_output_dir",
))
TABLE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies",
                 "eval_rewards/margins")
SWEEP_KEY = "_sweep"  # the param_space entry carrying the sweep's constants to the trials


# ============================================================================ grids and configs

def parse_grid(specs: list[str]) -> dict[str, list]:
    """``["beta=0.05,0.1", "loss_type=sigmoid,ipo"]`` ->
    ``{"beta": [0.05, 0.1], "loss_type": ["sigmoid", "ipo"]}`` (values read as YAML scalars; dotted keys name
    a section's key: ``reference.num_actors=1,2``)."""
    import yaml

    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not values.strip():
            raise ConfigError([("--grid", f"{spec!r} is not KEY=V1,V2,...; e.g. --grid beta=0.05,0.1,0.3")])
        if key in grid:
            raise ConfigError([("--grid",
                                f"{key} is given twice; put all its values in one --grid {key}=...")])
        grid[key] = [yaml.safe_load(v.strip()) for v in values.split(",")]
    return grid


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == SWEEP_KEY:
            continue
        if isinstance(v, dict) and not _is_domain(v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_domain(v: Any) -> bool:
    return (isinstance(v, dict) and set(v) == {"grid_search"}) or type(v).__module__.startswith("ray.tune")


def grid_space(grid: dict[str, list]) -> dict[str, Any]:
    """A Tune param_space: every listed key a ``tune.grid_search`` (the CLI's --grid)."""
    from ray import tune

    return nest({k: tune.grid_search(v) for k, v in grid.items()})


def grid_points(param_space: dict[str, Any]) -> list[dict[str, Any]]:
    """The cartesian product of the space's grid_search entries, as flat {dotted key: value}; other entries
    (Tune distributions) are left out: they are drawn per trial."""
    flat = _flatten(param_space)
    grids = {k: v["grid_search"] for k, v in flat.items() if isinstance(v, dict) and "grid_search" in v}
    consts = {k: v for k, v in flat.items() if not _is_domain(v)}
    return [{**consts, **dict(zip(grids, values))} for values in itertools.product(*grids.values())]


def shares_reference(cfg: DPOConfig) -> bool:
    """Whether the trials of this config can read a precomputed reference (not TR-DPO, not a PEFT
    adapter's)."""
    return (cfg.needs_reference and not cfg.sync_ref_model and not cfg.use_peft and not cfg.peft_adapter_path
            and cfg.reference.source in ("auto", "actor", "local", "precomputed"))


def trial_config(base: dict[str, Any], overrides: dict[str, Any], output_dir: str | Path,
                 cache_dir: str | None = None) -> DPOConfig:
    """The trial's DPOConfig: the base's keys, the trial's values (flat dotted or nested), its own output_dir
    and Ray Train run (run_name: the output folder's name, never the base's, so no two trials share a Ray
    Train folder under ray.storage_path) and, given ``cache_dir``, the shared precomputed reference."""
    data = merged(base, nest(_flatten(overrides)))
    data["output_dir"] = str(output_dir)
    data["run_name"] = Path(output_dir).name
    if cache_dir is not None:
        data = merged(data, {"reference": {"source": "precomputed", "cache_dir": cache_dir}})
        data.pop("precompute_ref_log_probs", None)
    return DPOConfig(**data)


def reference_projection(cfg: DPOConfig) -> str:
    """The config minus REFERENCE_FREE_KEYS, as a string: equal projections share a reference pass for
    certain."""
    dump = cfg.model_dump(mode="json")
    kept = {k: v for k, v in dump.items() if k not in REFERENCE_FREE_KEYS}
    kept["reference"] = {k: v for k, v in dump["reference"].items()
                         if k in ("model_name_or_path", "num_gpus")}
    return json.dumps(kept, sort_keys=True, default=str)


# ============================================================================ the trial

def _trial_dirname(trial_id: str, varied: dict[str, Any]) -> str:
    desc = ",".join(f"{k.split('.')[-1]}={v if not isinstance(v, float) else f'{v:.4g}'}"
                    for k, v in varied.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", f"{trial_id}_{desc}" if desc else trial_id)[:120]


class _MetricsReporter:
    """Tails the trial's metrics.jsonl and reports each new row to Tune (merged with the latest value of every
    key, so a scheduler sees the eval metric with the step it was measured at)."""

    POLL_S = 0.5

    def __init__(self, path: Path, metric: str | None):
        self.path, self.metric = path, metric
        self.latest: dict[str, Any] = {}
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpo-ray-sweep-report", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self.poll()

    def poll(self) -> None:
        from ray import tune

        try:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
        except OSError:
            return
        complete = [line for line in lines if line.endswith("}")]
        for n, line in enumerate(complete[self.seen:], self.seen + 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(complete):  # the last row, half-written: read it next time
                    break
                self.seen += 1  # torn for good (a later row follows it): skip it, as read_metrics does
                continue
            self.seen += 1
            self.latest.update(row)
            if self.metric is None or self.metric in row or (self.metric in self.latest and "loss" in row):
                tune.report({**self.latest, "step": row.get("step", 0)})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def task_metric(out_dir: Path, cfg: DPOConfig, prompts: int) -> float | None:
    """The bundled task's metric (the fraction of greedy answers that follow its rule) for a run on the
    bundled data; None for other data (no rule to check) or ``prompts`` 0."""
    from dpo_ray.data.bundled import TRAIN_FILE, eval_prompts, task_accuracy

    on_bundled = cfg.dataset_name is None or Path(cfg.dataset_name).resolve() == Path(TRAIN_FILE).resolve()
    if not prompts or not on_bundled or not (out_dir / "config.json").exists():
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    return task_accuracy(model, AutoTokenizer.from_pretrained(out_dir), eval_prompts()[:prompts])


def dpo_trial(config: dict[str, Any], sweep: dict[str, Any] | None = None) -> None:
    """Tune function trainable: one DPOTrainer run with the trial's keys. ``sweep`` (the base config, the
    store, the DPO_RAY_* variables) comes through ``tune.with_parameters`` (Ray's object store), never through
    ``config``: Tune writes a trial's config to its params.json / params.pkl."""
    from ray import tune

    from dpo_ray.trainer import DPOTrainer

    sweep = sweep if sweep is not None else config[SWEEP_KEY]
    os.environ.update(sweep["env"])  # a trial is a driver: the sweep driver's DPO_RAY_* (console, shared dir)
    overrides = {k: v for k, v in config.items() if k != SWEEP_KEY}
    varied = {k: v for k, v in _flatten(overrides).items() if k in sweep["varied"]}
    ctx = tune.get_context()
    out_dir = Path(sweep["sweep_dir"]) / "trials" / _trial_dirname(ctx.get_trial_id(), varied)
    cfg = trial_config(sweep["base"], overrides, out_dir)
    cache_dir = None
    if sweep["share_reference"]:
        cache_dir = sweep["reference_dirs"].get(reference_projection(cfg))
        if cache_dir is None:  # a key no grid point had (a sampled ld_alpha...): computed here, once, locked
            from dpo_ray.reference.store import ReferenceStore

            _, cache_dir = ReferenceStore(sweep["store"]).ensure(cfg)
        cfg = trial_config(sweep["base"], overrides, out_dir, cache_dir)
    elif sweep.get("own_reference"):  # N independent runs: each its own pass, into its own cache
        cache_dir = str(out_dir / "reference_cache")
        cfg = trial_config(sweep["base"], overrides, out_dir, cache_dir)
    t0 = time.perf_counter()
    reporter = _MetricsReporter(out_dir / "metrics.jsonl", sweep["metric"])
    try:
        out = DPOTrainer(args=cfg).train()
    finally:
        reporter.stop()
    reporter.poll()
    final = {**reporter.latest, **out.metrics, **out.eval_metrics, "steps": out.report.get("steps"),
             "wall_time_s": round(time.perf_counter() - t0, 2), "output_dir": str(out_dir),
             "reference_dir": cache_dir, "finished": True}
    accuracy = task_metric(out_dir, cfg, sweep["task_prompts"])
    if accuracy is not None:
        final["task_accuracy"] = accuracy
    if sweep["metric"] and sweep["metric"] not in final:
        final[sweep["metric"]] = float("nan")
    final["step"] = final.get("step") or final["steps"] or 0
    tune.report(final)


# ============================================================================ the sweep

@dataclass
class SweepPlan:
    """What ``prepare_sweep`` did: the store keys computed up front, and the trainable + space for a Tuner."""

    sweep_dir: Path
    store: Path
    trainable: Any
    param_space: dict[str, Any]
    varied: list[str]
    reference_keys: list[str] = field(default_factory=list)
    shared: bool = True

    def summarize(self, results, metric: str | None, mode: str = "max") -> dict[str, Any]:
        """results.csv / results.json / sweep.png / sweep_summary.json from a Tune ResultGrid; returns the
        summary."""
        rows = []
        for r in results:
            m = r.metrics or {}
            flat = _flatten(r.config or {})
            out_dir = m.get("output_dir") or _guess_dir(self.sweep_dir, r)
            row = {"trial": Path(out_dir or r.path or "?").name,
                   "status": "error" if r.error else ("ok" if m.get("finished") else "stopped early"),
                   **{k: flat.get(k) for k in self.varied},
                   **{k: m.get(k) for k in TABLE_METRICS}, "eval_rows": m.get("eval_num_pairs"),
                   "task_accuracy": m.get("task_accuracy"),
                   "steps": m.get("steps", m.get("step")), "wall_time_s": m.get("wall_time_s"),
                   "output_dir": out_dir,
                   "reference_dir": m.get("reference_dir"),
                   "error": _one_line(r.error) if r.error else None}
            rows.append(row)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(self.sweep_dir / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
            w.writeheader()
            w.writerows(rows)
        (self.sweep_dir / "results.json").write_text(json.dumps(rows, indent=1, default=str))
        plot = plot_sweep(rows, self.sweep_dir / "sweep.png", self.varied)
        scored = [r for r in rows if r["status"] == "ok" and _finite(r.get(metric))] if metric else []
        best = (max if mode == "max" else min)(scored, key=lambda r: r[metric]) if scored else None
        summary = {"metric": metric, "mode": mode, "trials": len(rows),
                   "ok": sum(r["status"] == "ok" for r in rows),
                   "failed": sum(r["status"] == "error" for r in rows),
                   "best": None if best is None else {"trial": best["trial"], "value": best[metric],
                                                      "model_dir": best["output_dir"],
                                                      "config": {k: best[k] for k in self.varied}},
                   "unranked": _why_unranked(rows, metric) if metric and best is None else None,
                   "reference": {"shared": self.shared, "store": str(self.store),
                                 "keys": self.reference_keys},
                   "results": str(self.sweep_dir / "results.csv"), "plot": str(plot) if plot else None}
        (self.sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary


def _why_unranked(rows: list[dict], metric: str) -> str:
    """Why no trial could be ranked by ``metric``: the sweep's one-line answer (the CLI exits 1 with it)."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "no trial finished; see the error column of results.csv"
    if metric.startswith("eval_") and not any(r.get("eval_rows") for r in ok):
        return (f"no finished trial scored an eval row, so {metric} is missing or NaN: give the runs an eval "
                "set (eval_dataset_name, a test-split file beside the training data, or eval_fraction) and "
                "eval_strategy steps or epoch")
    return (f"no finished trial logged a finite {metric} (eval rows per trial: "
            f"{', '.join(str(r.get('eval_rows')) for r in ok)}); check the metric's name (--metric) against "
            "the keys in a trial's metrics.jsonl")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:300]


def _guess_dir(sweep_dir: Path, result) -> str | None:
    m = re.search(r"([0-9a-f]{5}_\d{5})", Path(result.path).name) if result.path else None  # Tune's trial id
    found = sorted((sweep_dir / "trials").glob(f"{m.group(1)}_*")) if m else []
    return str(found[0]) if found else None


def plot_sweep(rows: list[dict], path: Path, varied: list[str]) -> Path | None:
    """Eval reward accuracy and margins over steps, one line per trial (train's when there is no eval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {}
    for r in rows:
        f = Path(r["output_dir"]) / "metrics.jsonl" if r.get("output_dir") else None
        if f is not None and f.exists():
            label = ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in varied) or r["trial"]
            histories[label] = read_metrics(f)  # a torn line (a trial killed mid-write) is skipped, not fatal
    if not histories:
        return None
    has_eval = any("eval_rewards/accuracies" in row for h in histories.values() for row in h)
    prefix = "eval_" if has_eval else ""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("rewards/accuracies", "rewards/margins")):
        for label, history in histories.items():
            points = [(row["step"], row[prefix + key]) for row in history if prefix + key in row]
            if points:
                ax.plot(*zip(*points), "o-", label=label, markersize=3)
        ax.set_title(prefix + key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prepare_sweep(base: DPOConfig, param_space: dict[str, Any], *,
                  metric: str | None = "eval_rewards/accuracies",
                  store: str | os.PathLike | None = None, trial_resources: dict[str, float] | None = None,
                  task_prompts: int = 200, share_reference: bool = True) -> SweepPlan:
    """Validate every grid point, run the reference pass once per distinct store key (before any trial), and
    return the trainable (``tune.with_resources(dpo_trial, ...)``) and the param_space for ``tune.Tuner``.

    base: the sweep's config; its ``output_dir`` is the sweep directory (trials under ``trials/``), its
    ``reference.cache_dir`` (if set) the store's root, else ``<output_dir>/reference_store``.
    trial_resources: what each trial's driver process reserves (default 0.25 CPU); its Ray Train workers,
    data tasks and reference pass request their own (``ray.resources_per_worker`` etc.).
    share_reference=False: each trial precomputes its own reference into its own directory (the baseline the
    benchmark compares against: N independent runs).
    """
    from ray import tune

    from dpo_ray.cluster import init_ray
    from dpo_ray.paths import resolve_config_paths
    from dpo_ray.reference.store import ReferenceStore

    base = resolve_config_paths(base)
    sweep_dir = Path(base.output_dir).resolve()
    store_root = Path(store or base.reference.cache_dir
                      or sweep_dir / "reference_store").expanduser().resolve()
    base_dump = base.model_dump(mode="json", exclude_unset=True)
    base_dump.pop("output_dir", None)
    base_dump.get("reference", {}).pop("cache_dir", None)
    points = grid_points(param_space) or [{}]
    varied = sorted({k for k, v in _flatten(param_space).items() if _is_domain(v)})
    problems, configs = [], []
    for point in points:  # every point valid before anything runs: one error listing them all
        try:
            configs.append(trial_config(base_dump, point, sweep_dir / "trials" / "check"))
        except ConfigError as e:
            problems += [(f"{key} (grid point {point})", msg) for key, msg in e.problems]
    if problems:
        raise ConfigError(problems)
    share = share_reference and all(shares_reference(c) for c in configs)
    init_ray(base)
    dirs: dict[str, str] = {}
    keys: list[str] = []
    if share:
        reference_store = ReferenceStore(store_root)
        for cfg in configs:
            proj = reference_projection(cfg)
            if proj not in dirs:
                key, dirs[proj] = reference_store.ensure(cfg)
                keys += [key] if key not in keys else []
        print(f"dpo-ray sweep: {len(points)} grid point(s), {len(dirs)} reference setting(s), {len(keys)} "
              f"reference key(s) in {store_root}", flush=True)
    elif share_reference:
        print("dpo-ray sweep: the trials' reference cannot be precomputed (TR-DPO or a PEFT adapter's "
              "reference): each trial runs its own", flush=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("DPO_RAY_")}
    constants = {"base": base_dump, "sweep_dir": str(sweep_dir), "store": str(store_root),
                 "reference_dirs": dirs, "share_reference": share, "own_reference": not share_reference,
                 "metric": metric, "varied": varied, "env": env, "task_prompts": task_prompts}
    # the constants hold the base config and DPO_RAY_* variables, secrets included: through the object store,
    # not the param_space (Tune writes that to every trial's params.json / params.pkl)
    trainable = tune.with_resources(tune.with_parameters(dpo_trial, sweep=constants),
                                    trial_resources or {"CPU": 0.25})
    return SweepPlan(sweep_dir=sweep_dir, store=store_root, trainable=trainable,
                     param_space=dict(param_space), varied=varied, reference_keys=keys, shared=share)


def run_sweep(base: DPOConfig, param_space: dict[str, Any], *, metric: str | None = "eval_rewards/accuracies",
              mode: str = "max", scheduler=None, search_alg=None, num_samples: int = 1,
              max_concurrent_trials: int | None = None, trial_resources: dict[str, float] | None = None,
              store: str | os.PathLike | None = None, task_prompts: int = 200, verbose: int = 0,
              share_reference: bool = True) -> dict[str, Any]:
    """Prepare (shared reference passes), run the trials under ``tune.Tuner``, summarize; returns the summary.
    ``verbose``: Tune's (0: none of its status tables, the trials' own lines only; 1 or 2: Tune's tables
    too)."""
    from ray import tune

    t0 = time.perf_counter()
    plan = prepare_sweep(base, param_space, metric=metric, store=store, trial_resources=trial_resources,
                         task_prompts=task_prompts, share_reference=share_reference)
    if max_concurrent_trials is None:
        max_concurrent_trials = default_concurrency(base, (trial_resources or {}).get("CPU", 0.25))
    print(f"dpo-ray sweep: up to {max_concurrent_trials} trial(s) at once", flush=True)
    tuner = tune.Tuner(
        plan.trainable, param_space=plan.param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=max_concurrent_trials),
        run_config=tune.RunConfig(name="tune", storage_path=str(plan.sweep_dir), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    with _tune_console(verbose):
        results = tuner.fit()
    summary = plan.summarize(results, metric, mode)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 2)
    (plan.sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


@contextlib.contextmanager
def _tune_console(verbose: int):
    """Tune's own console at ``verbose`` 0: nothing. Its newer reporter prints the experiment box and the
    result paths at every verbosity, so verbose 0 runs with Tune's older one (``RAY_AIR_NEW_OUTPUT=0``, silent
    at 0), and Tune's info lines (result files written) stay off the console. Both are restored afterwards."""
    if verbose:
        yield
        return
    tune_logger = logging.getLogger("ray.tune")
    saved_env, saved_level = os.environ.get("RAY_AIR_NEW_OUTPUT"), tune_logger.level
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger.setLevel(max(logging.WARNING, saved_level))
    try:
        yield
    finally:
        tune_logger.setLevel(saved_level)
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env


def default_concurrency(cfg: DPOConfig, trial_cpus: float) -> int:
    """Trials at once when not given: as many as the cluster's CPUs hold, counting each trial's driver, its
    Train workers and half a CPU for its data tasks (Tune would otherwise start a trial per free trial_cpus
    and starve the Train workers and Ray Data of CPUs: docs/sweeps.md)."""
    import ray

    from dpo_ray.cluster import worker_resources

    per_worker = worker_resources(cfg, bool(cfg.ray.use_gpu)).get("CPU", 0.5)
    per_trial = trial_cpus + cfg.ray.num_workers * per_worker + 0.5
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def asha(max_steps: int, grace_steps: int | None = None, reduction_factor: int = 2):
    """Tune's ASHA on the reported ``step`` (optimizer steps), for early stopping on the eval metric."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", max_t=max_steps,
                         grace_period=grace_steps or max(1, max_steps // 4),
                         reduction_factor=reduction_factor)
