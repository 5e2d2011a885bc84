"""``dpo-ray`` (same as ``python -m dpo_ray``): train | sft | validate | demo | inspect-data | sweep |
ref-store.

Flags are TRL's script flags (``--model_name_or_path``, ``--dataset_name``, ``--beta``, ...) plus
``--config FILE.yaml``; flags override the file. Sections use dots: ``--ray.num_workers 2``.
Exit status (also in README.md, "Exit codes"):

- 0: ok.
- 1: the run failed (a training error: its traceback is printed), or ``inspect-data`` found a problem at
  level ``error``.
- 2: bad configuration: every problem, by key (``ConfigError``).
- 130: Ctrl-C: one line with the step reached, the checkpoint saved and the command that resumes from it;
  report.json says "interrupted".
- 3: the data, or a file it is read with, cannot be used as given (``dpo_ray.errors.DataError``): a bad row
  under ``on_bad_row: raise``, a missing or unreadable data file, a column spelled another way, more than
  ``max_dropped_fraction`` of a split dropped, a run with nothing to train on, a model directory without
  tokenizer files. One message naming the file, row or key and the fix; the traceback goes to
  ``<output_dir>/error.log`` (``--debug`` prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from dpo_ray.config import (
    ConfigError,
    DPOConfig,
    add_config_arguments,
    deepspeed_config,
    load_config,
    overrides_from_args,
)
from dpo_ray.dicts import merged
from dpo_ray.errors import DataError
from dpo_ray.paths import check_paths, resolve_config_paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-ray",
                                description="DPO and its loss family on Ray Train + DeepSpeed")
    sub = p.add_subparsers(dest="command", required=True)
    specs = {
        "train": "run DPO (or any loss of the family) on Ray",
        "sft": "supervised fine-tuning on the chosen completions (the stage before DPO)",
        "validate": "print the resolved config and the DeepSpeed dict, or every config error (exit 2)",
        "demo": "SFT then DPO on the bundled task and tiny model; prints metrics and task accuracy",
        "inspect-data": "preflight report on a preference dataset, before any training resources are taken",
        "sweep": "a hyper-parameter sweep on Ray Tune: --grid KEY=V1,V2 ...; one shared reference pass "
                 "(docs/sweeps.md)",
        "iterate": "iterative on-policy DPO: each round samples K responses per prompt from the policy, "
                   "scores them, trains group DPO on them and syncs the weights (docs/iterative.md)",
    }
    for name, help_ in specs.items():
        # resolve: --debug below is this CLI's (a data error's traceback), not TRL's TrainingArguments.debug
        sp = sub.add_parser(name, help=help_, description=help_, conflict_handler="resolve")
        add_config_arguments(sp)
        sp.add_argument("--address", help="Ray cluster address (same as --ray.address; default RAY_ADDRESS)")
        sp.add_argument("--debug", action="store_true",
                        help="print the traceback of a data error (exit 3) too; it always goes to "
                             "<output_dir>/error.log")
        if name == "validate":
            sp.add_argument("--world_size", type=int, default=None, help="workers for the DeepSpeed dict")
            sp.add_argument("--no_path_check", action="store_true",
                            help="check the keys only, not that model directories exist (a config for "
                                 "another machine)")
        if name == "inspect-data":
            sp.add_argument("--report_dir", default=None, help="where the JSON + PNG report goes")
            sp.add_argument("--max_rows", type=int, default=None, help="inspect only the first N rows")
        if name == "sweep":
            _sweep_arguments(sp)
        if name == "iterate":
            sp.add_argument("--rounds", type=int, default=None, help="same as --iterate.rounds")
            sp.add_argument("--samples", type=int, default=None, help="same as --iterate.samples (K)")
            sp.add_argument("--scorer", default=None, help="same as --iterate.scorer")
        if name == "demo":
            sp.add_argument("--iterative", action="store_true",
                            help="after SFT, rounds of iterative DPO (sampled, rule-scored) instead of "
                                 "offline DPO")
    rs = sub.add_parser("ref-store", help="size report or cleanup of a reference store (docs/sweeps.md)",
                        description="size report (du) or cleanup (clean) of a content-addressed reference "
                                    "store")
    rs.add_argument("action", choices=["du", "clean"])
    rs.add_argument("--store", required=True,
                    help="the store's root (a sweep's <output_dir>/reference_store, or "
                         "the reference.cache_dir it was given)")
    rs.add_argument("--key", action="append", default=None, help="clean: this key (repeatable)")
    rs.add_argument("--older_than_days", type=float, default=None,
                    help="clean: keys not used for this many days")
    rs.add_argument("--all", action="store_true", help="clean: every key")
    return p


def _sweep_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a DPOConfig key and its values (repeatable: the sweep is the product)")
    sp.add_argument("--metric", default="eval_rewards/accuracies",
                    help="the metric that ranks trials (and ASHA's)")
    sp.add_argument("--mode", choices=["max", "min"], default="max")
    sp.add_argument("--max_concurrent_trials", type=int, default=None,
                    help="trials at once (default: what the cluster's CPUs hold, docs/sweeps.md)")
    sp.add_argument("--num_samples", type=int, default=1, help="repeats of the grid (Tune's num_samples)")
    sp.add_argument("--asha", action="store_true",
                    help="stop poor trials early (ASHA on --metric, time = optimizer steps)")
    sp.add_argument("--grace_steps", type=int, default=None, help="ASHA: steps before a trial may be stopped")
    sp.add_argument("--trial_cpus", type=float, default=0.25, help="CPUs each trial's driver reserves")
    sp.add_argument("--task_prompts", type=int, default=200,
                    help="held-out prompts for the bundled task's metric (0: off)")
    sp.add_argument("--verbose", action="store_true",
                    help="show Ray Tune's trial status tables too (default: "
                         "the trials' own dpo_ray lines and the summary)")
    sp.add_argument("--ref_store", default=None,
                    help="reference store root (default reference.cache_dir, else "
                         "<output_dir>/reference_store); shared storage on a cluster")


def _resolve(ns: argparse.Namespace, extra: dict[str, Any] | None = None) -> DPOConfig:
    overrides = overrides_from_args(ns)
    if getattr(ns, "address", None):
        overrides.setdefault("ray", {})["address"] = ns.address
    # Relative paths (flags and the YAML file alike) are the working directory's: absolute from here on.
    cfg = resolve_config_paths(load_config(ns.config, merged(extra or {}, overrides)))
    ns.error_log_dir = cfg.output_dir  # where main() writes a data error's traceback
    return cfg


def run_plan(cfg: DPOConfig) -> list[str]:
    """What the run will use, with every ``auto`` resolved as far as the config and this machine decide it;
    the rest says what decides it later (the cluster Ray joins, the first batch, each pool of rows)."""
    from dpo_ray.cluster import worker_resources
    from dpo_ray.data.batching import AUTO_MIN_SAVING
    from dpo_ray.reference.pool import actor_request

    joins = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    one = cfg.resolve_auto_reference(nodes=1)
    planned = cfg.resolve_auto_reference(nodes=2) if joins else one  # the reference of the lines below
    lines = []
    if not joins:
        lines.append(f"{one.describe_reference()}  [a local Ray: one node]")
    elif one.reference.source == planned.reference.source:
        lines.append(f"{planned.describe_reference()}  [on the cluster at {joins}]")
    else:
        lines.append(f"{planned.describe_reference()}  [on the cluster at {joins} if it has several nodes]")
        lines.append(f"{one.describe_reference()}  [if that cluster is one node]")
    if planned.reference.source == "actor" and cfg.needs_reference:
        label = f", on nodes labelled {dict(cfg.reference.node_label)}" if cfg.reference.node_label else ""
        lines.append(f"reference actors: {cfg.reference.num_actors} × {actor_request(cfg)}{label}")
    gpu = cfg.ray.use_gpu
    if gpu is None:
        gpu_words = "GPU workers where the cluster has a GPU (ray.use_gpu auto)"
        if not joins:
            import torch

            gpu = torch.cuda.is_available()
            gpu_words = (f"{'GPU' if gpu else 'CPU'} workers (ray.use_gpu auto: this machine has "
                         f"{'a' if gpu else 'no'} GPU)")
    else:
        gpu_words = f"{'GPU' if gpu else 'CPU'} workers (ray.use_gpu)"
    shapes: list[dict] = []
    for shape in (worker_resources(cfg, on_gpu)
                  for on_gpu in ([bool(gpu)] if gpu is not None else [False, True])):
        if shape not in shapes:
            shapes.append(shape)
    threads = (f", {cfg.ray.torch_threads} torch thread(s) each on CPU" if cfg.ray.torch_threads
               else ", the node's cores ÷ its workers as torch threads on CPU")
    lines.append(f"workers: {cfg.ray.num_workers} × {' or '.join(str(s) for s in shapes)}, "
                 f"{gpu_words}{threads}; {cfg.ray.placement_strategy} placement")
    sharing = {"off": "off", "on": "on (no first-batch check)",
               "auto": "on where the attention takes a 4-D mask (sdpa, eager) and the first batch agrees "
                       "with the standard layout (checked on it); else off, saying why"}[cfg.prefix_sharing]
    attention = {"dense": "dense 4-D mask", "flex": "FlexAttention (dense where it is missing or disagrees)",
                 "auto": "dense on CPU; on a GPU the fastest of dense and FlexAttention that agrees on the "
                         "first batch"}
    lines.append(f"prefix sharing: {sharing}" + (f"; attention: {attention[cfg.prefix_attention]}"
                                                  if cfg.prefix_sharing != "off" else ""))
    pool = cfg.bucket_size_multiplier * cfg.per_device_train_batch_size
    bucketing = {False: "off (shuffled batches, as TRL)", True: f"on (pools of {pool} rows sorted by length)",
                 "auto": f"per pool of {pool} rows: bucketed when that pads at least {AUTO_MIN_SAVING:.0%} "
                         "fewer tokens"}
    lines.append(f"length bucketing: {bucketing[cfg.length_bucketing]}")
    lines.append(f"gradient checkpointing: {checkpointing_plan(cfg)}")
    return lines


def checkpointing_plan(cfg: DPOConfig) -> str:
    """``gradient_checkpointing`` in words; for auto, the micro-batch size it switches at where the model's
    config can be read here (a model directory, or the bundled tiny model)."""
    if cfg.gradient_checkpointing is not True and cfg.gradient_checkpointing is not False:
        if cfg.deepspeed.zero_stage == 3:
            return "on for every micro-batch (auto under ZeRO-3: every rank must recompute alike)"
        words = f"auto: on for micro-batches whose activations pass {cfg.gradient_checkpointing_gib:g} GiB"
        per_token = _activation_bytes_per_token(cfg)
        if per_token:
            from dpo_ray.models import checkpoint_min_tokens

            tokens = checkpoint_min_tokens(cfg.gradient_checkpointing_gib, per_token)
            words += (f" ({tokens:,}+ tokens of this model in fp32, {per_token / 2**20:.2f} MiB per token; "
                      "twice as many in bf16)")
        return words
    return "on for every micro-batch" if cfg.gradient_checkpointing else "off"


def _activation_bytes_per_token(cfg: DPOConfig) -> int | None:
    from dpo_ray.models import TINY_LLAMA, activation_bytes_per_token

    if cfg.model_name_or_path is None:
        from types import SimpleNamespace

        return activation_bytes_per_token(SimpleNamespace(**TINY_LLAMA), 4)
    try:
        from transformers import AutoConfig

        return activation_bytes_per_token(AutoConfig.from_pretrained(cfg.model_name_or_path), 4)
    except (OSError, ValueError):  # a hub name offline, a path not there yet: the run decides
        return None


def cmd_validate(ns) -> int:
    cfg = _resolve(ns)
    if not ns.no_path_check:
        check_paths(cfg)
    world = ns.world_size or cfg.ray.num_workers
    print("# resolved DPOConfig")
    print(cfg.to_yaml())
    print("# what the run will use (auto settings resolved where the config and this machine decide them)")
    for line in run_plan(cfg):
        print(f"#   {line}")
    print(f"# DeepSpeed config (world_size={world}, CPU; on GPU bf16 turns on unless bf16: false)")
    print(json.dumps(deepspeed_config(cfg, world, on_gpu=False), indent=2))
    return 0


def cmd_train(ns, command: str) -> int:
    from dpo_ray.trainer import DPOTrainer, print_summary

    mode = "sft" if command == "sft" else "dpo"
    extra = {"reference": {"source": "none"}} if mode == "sft" else None
    cfg = _resolve(ns, extra)
    out = DPOTrainer(args=cfg, mode=mode).train()
    print_summary(out)
    return 0


def cmd_demo(ns) -> int:
    from pathlib import Path

    from dpo_ray.demo import run_demo

    overrides = overrides_from_args(ns)
    return run_demo(Path(overrides.pop("output_dir", "demo_output")), overrides, config_file=ns.config,
                    iterative=ns.iterative)


def cmd_inspect(ns) -> int:
    from dpo_ray.preflight import run_inspect

    cfg = _resolve(ns)
    return run_inspect(cfg, report_dir=ns.report_dir, max_rows=ns.max_rows)


def cmd_sweep(ns) -> int:
    from dpo_ray.sweep import asha, grid_space, parse_grid, run_sweep

    cfg = _resolve(ns)
    grid = parse_grid(ns.grid)
    if not grid:
        raise ConfigError([("--grid", "give at least one, e.g. --grid beta=0.05,0.1,0.3")])
    scheduler = None
    if ns.asha:
        if not cfg.max_steps or cfg.max_steps < 1:
            raise ConfigError([("--asha", "ASHA needs max_steps (its time budget, in optimizer steps)")])
        scheduler = asha(cfg.max_steps, ns.grace_steps)
    summary = run_sweep(cfg, grid_space(grid), metric=ns.metric, mode=ns.mode, scheduler=scheduler,
                        num_samples=ns.num_samples, max_concurrent_trials=ns.max_concurrent_trials,
                        trial_resources={"CPU": ns.trial_cpus}, store=ns.ref_store,
                        task_prompts=ns.task_prompts, verbose=1 if ns.verbose else 0)
    print(f"\n== sweep finished: {summary['ok']} of {summary['trials']} trial(s) ok, {summary['failed']} "
          f"failed, {summary['wall_time_s']} s; reference keys "
          f"{', '.join(summary['reference']['keys']) or 'none'}")
    print(f"  table: {summary['results']}  plot: {summary['plot']}")
    best = summary["best"]
    if best:
        print(f"  best ({summary['metric']} {summary['mode']}): {best['config']} = {best['value']:.6g}; "
              f"model: {best['model_dir']}")
    elif summary.get("unranked"):  # a sweep that cannot rank its trials has no answer: say why, exit 1
        print(f"dpo-ray sweep: cannot rank the trials by {summary['metric']}: {summary['unranked']}",
              file=sys.stderr)
        return 1
    return 0 if summary["ok"] else 1


def iterate_config(ns) -> DPOConfig:
    """``dpo-ray iterate``'s config: the file and flags, with --rounds / --samples / --scorer as the iterate
    keys (an explicit --iterate.* flag wins)."""
    extra = {k: v for k, v in (("rounds", ns.rounds), ("samples", ns.samples), ("scorer", ns.scorer))
             if v is not None}
    return _resolve(ns, {"iterate": extra} if extra else None)


def cmd_iterate(ns) -> int:
    from dpo_ray.iterate import print_rounds, run_iterate

    summary = run_iterate(iterate_config(ns))
    print_rounds(summary)
    return 0


def cmd_ref_store(ns) -> int:
    from dpo_ray.owned import OwnershipError, root_problem
    from dpo_ray.reference.store import ReferenceStore

    problem = root_problem(ns.store, "--store")
    if problem and (ns.action == "clean" or not ns.store.strip()):  # "" would mean the working directory
        raise ConfigError([("--store", f"{problem}; nothing deleted")])
    store = ReferenceStore(ns.store)
    failed = {}
    if ns.action == "clean":
        if not (ns.key or ns.older_than_days is not None or ns.all):
            raise ConfigError([("clean", "say what to remove: --key KEY, --older_than_days N or --all")])
        try:
            done = store.clean(ns.key, ns.older_than_days, ns.all)
        except OwnershipError as e:
            raise ConfigError([("--store", str(e))]) from None
        failed = done.failed
        print(f"removed {len(done.removed)} key(s){': ' + ', '.join(done.removed) if done.removed else ''}")
        for key, why in failed.items():
            print(f"FAILED to remove {key}: {why}", file=sys.stderr)
        if done.skipped:
            print(f"left alone (not entries this store wrote): {', '.join(done.skipped)}")
    print(store.report())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    ns.ray_was_up = _ray_up()
    try:
        if ns.command == "validate":
            return cmd_validate(ns)
        if ns.command in ("train", "sft"):
            return cmd_train(ns, ns.command)
        if ns.command == "demo":
            return cmd_demo(ns)
        if ns.command == "inspect-data":
            return cmd_inspect(ns)
        if ns.command == "sweep":
            return cmd_sweep(ns)
        if ns.command == "ref-store":
            return cmd_ref_store(ns)
        if ns.command == "iterate":
            return cmd_iterate(ns)
    except ConfigError as e:
        print(f"dpo-ray {ns.command}: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        return _data_error(ns, e)
    except KeyboardInterrupt as e:
        return _interrupted(ns, e, argv)
    return 1


def _interrupted(ns, e: KeyboardInterrupt, argv: list[str] | None) -> int:
    """Ctrl-C: one line, what was saved and the exact command that continues from it; exit status 130."""
    import shlex

    from dpo_ray.errors import TrainingInterrupted

    if _ray_up() and not ns.ray_was_up:  # a Ray this command started: no worker lines after ours
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - a second Ctrl-C during shutdown
            pass
    if not isinstance(e, TrainingInterrupted):
        print(f"\ndpo-ray {ns.command}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    args = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--resume_from_checkpoint", "--overwrite_output_dir"):  # ours replaces the first; the second
        while flag in args:                                              # would remove the checkpoint
            i = args.index(flag)
            del args[i:i + (2 if i + 1 < len(args) and not args[i + 1].startswith("--") else 1)]
        args = [a for a in args if not a.startswith(flag + "=")]
    if e.checkpoint is not None:
        args += ["--resume_from_checkpoint", e.checkpoint]
        again = f"resume: {shlex.join(['dpo-ray', *args])}"
    else:
        again = f"rerun: {shlex.join(['dpo-ray', *args, '--overwrite_output_dir'])}"
    report = f" (report: {e.report})" if e.report else ""
    print(f"\ndpo-ray {ns.command}: {e.saved()}{report}; {again}", file=sys.stderr, flush=True)
    return 130


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _data_error(ns, e: DataError) -> int:
    """The message alone (it names the file, row or key and the fix), last on stderr; the traceback in the
    log."""
    import traceback
    from pathlib import Path

    if _ray_up() and not ns.ray_was_up:  # a Ray this command started: stop its worker logs streaming in after
        sys.modules["ray"].shutdown()

    trace = "".join(traceback.format_exception(e))
    where = getattr(ns, "error_log_dir", None)
    log = Path(where) / "error.log" if where else Path(tempfile.gettempdir()) / "dpo-ray-error.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(trace)
    except OSError:
        log = None
    if getattr(ns, "debug", False):
        print(trace, file=sys.stderr)
    print(f"\ndpo-ray {ns.command}: {e}", file=sys.stderr)
    if log is not None and not getattr(ns, "debug", False):
        print(f"(traceback in {log}; --debug prints it)", file=sys.stderr)
    return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
