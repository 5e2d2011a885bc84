"""``dpo-ray demo`` / ``make demo``: SFT then DPO on the bundled task with the tiny Llama, on a local Ray.

Prints each stage's metrics, the held-out eval rewards/accuracies, and the task metric (the fraction of
greedy answers that follow the bundled task's rule) after SFT and after DPO. ``--iterative``: after SFT,
rounds of iterative DPO (``dpo_ray.iterate``) instead of the offline DPO stage, the task metric after each
round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_ray.config import load_config

# The embedded default of `dpo-ray demo` (and examples/tiny_demo.yaml): SFT then DPO on the bundled task.
DEMO_SFT = {"learning_rate": 3e-3, "num_train_epochs": 4, "per_device_train_batch_size": 32,
            "logging_steps": 10, "warmup_ratio": 0.05, "lr_scheduler_type": "cosine", "save_strategy": "no",
            "eval_strategy": "no", "reference": {"source": "none"}}
# rpo_alpha 1.0 (the RPO paper's value): plain DPO on this task lowers the likelihood of the chosen
# answers too and the greedy accuracy falls below SFT's; the NLL term keeps them up (docs/data.md).
DEMO_DPO = {"learning_rate": 5e-4, "beta": 0.1, "rpo_alpha": 1.0, "num_train_epochs": 1,
            "per_device_train_batch_size": 16,
            "logging_steps": 10, "eval_strategy": "steps", "eval_steps": 40, "warmup_ratio": 0.05,
            "lr_scheduler_type": "cosine", "save_strategy": "no"}


# `dpo-ray demo --iterative`: after the same SFT stage, 3 rounds of iterative DPO, each sampling 8 answers to
# 1,024 of the bundled prompts from the current policy and scoring them by the task's rule; DEMO_DPO's
# settings at lr 2e-4 and beta 0.02, its 94 optimizer steps split over the rounds. docs/BENCHMARKS.md section
# 11: the best of the settings tried (on 2,000 fresh prompts 0.682 -> 0.715 over seeds 1-3, offline DPO
# 0.727; at beta 0.1 the policy's own near misses pull it back to 0.690).
DEMO_ITERATE = {**{k: v for k, v in DEMO_DPO.items()
                   if k not in ("eval_strategy", "eval_steps", "num_train_epochs")},
                "learning_rate": 2e-4, "beta": 0.02, "max_steps": 31, "eval_strategy": "no",
                "iterate": {"rounds": 3, "samples": 8, "temperature": 1.0, "prompts_per_round": 1024,
                            "max_new_tokens": 16, "eval_limit": 200}}


def _stage_config(base: dict, output_dir: Path, overrides: dict, config_file) -> Any:
    from dpo_ray.dicts import merged

    # the demo re-runs into the same folders: each run replaces the last (overwrite_output_dir); sections such
    # as iterate merge key by key (a flag's iterate.rounds keeps the stage's other iterate settings)
    settings = merged(merged({"overwrite_output_dir": True}, base), overrides)
    return load_config(config_file, {**settings, "output_dir": str(output_dir)})


def greedy_task_accuracy(model_dir: Path, limit: int = 200, prompts: list[str] | None = None) -> float:
    """Greedy task accuracy of ``model_dir`` on ``prompts`` (default: the first ``limit`` held-out ones)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_ray.data.bundled import eval_prompts, task_accuracy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return task_accuracy(model, tokenizer, eval_prompts()[:limit] if prompts is None else prompts)


def run_iterative(output_dir: Path, sft_dir: Path, overrides: dict, config_file=None) -> dict:
    """The iterative stage of ``dpo-ray demo --iterative``: rounds from the SFT model, scored by the task's
    rule."""
    from dpo_ray.dicts import merged
    from dpo_ray.iterate import print_rounds, run_iterate

    cfg = _stage_config(DEMO_ITERATE, output_dir, merged({"model_name_or_path": str(sft_dir)}, overrides),
                        config_file)
    summary = run_iterate(cfg)
    print_rounds(summary)
    return summary


def run_demo(output_dir: Path, overrides: dict, config_file=None, iterative: bool = False) -> int:
    from transformers.utils import logging as hf_logging

    from dpo_ray.trainer import DPOTrainer, print_summary

    hf_logging.disable_progress_bar()  # the metrics table is the demo's output

    output_dir = output_dir.resolve()
    then = "rounds of iterative DPO" if iterative else "DPO"
    print(f"== dpo_ray demo: SFT then {then} on the bundled task, tiny Llama, local Ray -> {output_dir}")
    sft_cfg = _stage_config(DEMO_SFT, output_dir / "sft", overrides, config_file)
    sft = DPOTrainer(args=sft_cfg, mode="sft").train()
    print_summary(sft)
    acc_sft = greedy_task_accuracy(output_dir / "sft")
    print(f"  task accuracy after SFT (greedy, held-out prompts): {acc_sft:.3f}")

    if iterative:
        summary = run_iterative(output_dir / "iterate", output_dir / "sft", overrides, config_file)
        acc = summary["rounds"][-1]["heldout"]
        (output_dir / "demo_summary.json").write_text(json.dumps(
            {"sft_task_accuracy": acc_sft, "iterative_task_accuracy": acc, "rounds": summary["rounds"],
             "plot": summary["plot"]}, indent=2))
        print("\n== demo summary (iterative)")
        print(f"  task accuracy (rule followed), SFT -> {len(summary['rounds']) - 1} round(s) of iterative "
              f"DPO: {acc_sft:.3f} -> {acc:.3f}")
        print(f"  plot: {summary['plot']}")
        return 0
    dpo_cfg = _stage_config(DEMO_DPO, output_dir / "dpo", overrides, config_file)
    if dpo_cfg.dataset_name is None:  # a model of its own (the SFT output) names its data: no silent default
        from dpo_ray.data.bundled import TRAIN_FILE

        dpo_cfg = dpo_cfg.model_copy(update={"dataset_name": str(TRAIN_FILE)})
    dpo = DPOTrainer(model=str(output_dir / "sft"), args=dpo_cfg).train()
    print_summary(dpo)
    acc_dpo = greedy_task_accuracy(output_dir / "dpo")
    eval_acc = dpo.eval_metrics.get("eval_rewards/accuracies", float("nan"))
    summary = {"sft_task_accuracy": acc_sft, "dpo_task_accuracy": acc_dpo,
               "eval_rewards/accuracies": eval_acc, "plot": str(output_dir / "dpo" / "metrics.png")}
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== demo summary")
    print(f"  held-out eval rewards/accuracies after DPO : {eval_acc:.3f}")
    print(f"  task accuracy (rule followed), SFT -> DPO  : {acc_sft:.3f} -> {acc_dpo:.3f}")
    print(f"  plot: {summary['plot']}")
    return 0
