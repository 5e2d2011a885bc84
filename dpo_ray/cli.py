"""``dpo-ray`` (same as ``python -m dpo_ray``): train | sft | validate | demo | inspect-data.

Flags are TRL's script flags (``--model_name_or_path``, ``--dataset_name``, ``--beta``, ...) plus
``--config FILE.yaml``; flags override the file. Sections use dots: ``--ray.num_workers 2``.
Exit status (also in README.md, "Exit codes"):

- 0: ok.
- 1: the run failed (a training error: its traceback is printed), or ``inspect-data`` found a problem at
  level ``error``.
- 2: bad configuration: every problem, by key (``ConfigError``).
- 3: the data, or a file it is read with, cannot be used as given (``dpo_ray.errors.DataError``): a bad row
  under ``on_bad_row: raise``, a missing or unreadable data file, a column spelled another way, more than
  ``max_dropped_fraction`` of a split dropped, a run with nothing to train on, a model directory without
  tokenizer files. One message naming the file, row or key and the fix; the traceback goes to
  ``<output_dir>/error.log`` (``--debug`` prints it).
"""

from __future__ import annotations

import argparse
import json
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
from dpo_ray.errors import DataError
from dpo_ray.paths import check_paths, resolve_config_paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-ray", description="DPO and its loss family on Ray Train + DeepSpeed")
    sub = p.add_subparsers(dest="command", required=True)
    specs = {
        "train": "run DPO (or any loss of the family) on Ray",
        "sft": "supervised fine-tuning on the chosen completions (the stage before DPO)",
        "validate": "print the resolved config and the DeepSpeed dict, or every config error (exit 2)",
        "demo": "SFT then DPO on the bundled task and tiny model; prints metrics and task accuracy",
        "inspect-data": "preflight report on a preference dataset, before any training resources are taken",
    }
    for name, help_ in specs.items():
        # resolve: --debug below is this CLI's (a data error's traceback), not TRL's TrainingArguments.debug
        sp = sub.add_parser(name, help=help_, description=help_, conflict_handler="resolve")
        add_config_arguments(sp)
        sp.add_argument("--address", help="Ray cluster address (same as --ray.address; default RAY_ADDRESS)")
        sp.add_argument("--debug", action="store_true",
                        help="print the traceback of a data error (exit 3) too; it always goes to <output_dir>/error.log")
        if name == "validate":
            sp.add_argument("--world_size", type=int, default=None, help="workers for the DeepSpeed dict")
            sp.add_argument("--no_path_check", action="store_true",
                            help="check the keys only, not that model directories exist (a config for another machine)")
        if name == "inspect-data":
            sp.add_argument("--report_dir", default=None, help="where the JSON + PNG report goes")
            sp.add_argument("--max_rows", type=int, default=None, help="inspect only the first N rows")
    return p


def _resolve(ns: argparse.Namespace, extra: dict[str, Any] | None = None) -> DPOConfig:
    overrides = overrides_from_args(ns)
    if getattr(ns, "address", None):
        overrides.setdefault("ray", {})["address"] = ns.address
    merged: dict[str, Any] = {}
    for src in (extra or {}), overrides:
        for k, v in src.items():
            merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    # Relative paths (flags and the YAML file alike) are the working directory's: absolute from here on.
    cfg = resolve_config_paths(load_config(ns.config, merged))
    ns.error_log_dir = cfg.output_dir  # where main() writes a data error's traceback
    return cfg


def cmd_validate(ns) -> int:
    cfg = _resolve(ns)
    if not ns.no_path_check:
        check_paths(cfg)
    world = ns.world_size or cfg.ray.num_workers
    print("# resolved DPOConfig")
    print(cfg.to_yaml())
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
    return run_demo(Path(overrides.pop("output_dir", "demo_output")), overrides, config_file=ns.config)


def cmd_inspect(ns) -> int:
    from dpo_ray.preflight import run_inspect

    cfg = _resolve(ns)
    return run_inspect(cfg, report_dir=ns.report_dir, max_rows=ns.max_rows)


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
    except ConfigError as e:
        print(f"dpo-ray {ns.command}: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        return _data_error(ns, e)
    return 1


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _data_error(ns, e: DataError) -> int:
    """The message alone (it names the file, row or key and the fix), last on stderr; the traceback in the log."""
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
