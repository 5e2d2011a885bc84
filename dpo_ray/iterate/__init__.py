"""Iterative on-policy DPO (``dpo-ray iterate``, ``run_iterate``): sample, score, group, train, sync, repeat.

    from dpo_ray import DPOConfig
    from dpo_ray.iterate import run_iterate

    cfg = DPOConfig(output_dir="out", model_name_or_path="sft_model", rpo_alpha=1.0, max_steps=30,
                    iterate={"rounds": 3, "samples": 4, "scorer": "my_checks:score"})
    summary = run_iterate(cfg)
    # summary["rounds"]: one record per round; summary["model_dir"]: the last policy

docs/iterative.md explains the loop, its settings and its numbers.
"""

from __future__ import annotations

from dpo_ray.iterate.engine import GenerationEngine, HFGenerateEngine, Prompt, SamplingParams
from dpo_ray.iterate.loop import NoPairsError, RoundRecord, run_iterate
from dpo_ray.iterate.scoring import ScorerError, load_scorer


def print_rounds(summary: dict) -> None:
    """The rounds as a table: held-out metric, sample scores, pairs, and where the time went."""
    print("\n== iterate: rounds (round 0 = the model before the first round)")
    print(f"  {'round':>5}  {'held-out':>8}  {'mean score':>10}  {'best of K':>9}  {'groups':>6}  "
          f"{'pairs':>6}  seconds")
    for r in summary["rounds"]:
        def f(v, w):
            return f"{v:>{w}.3f}" if isinstance(v, float) else f"{'-' if v is None else v:>{w}}"
        secs = ", ".join(f"{k} {v:.1f}" for k, v in r.get("seconds", {}).items())
        print(f"  {r['round']:>5}  {f(r['heldout'], 8)}  {f(r['mean_score'], 10)}  {f(r['best_of_k'], 9)}  "
              f"{r['groups']:>6}  {r['pairs']:>6}  {secs}")
    print(f"  model: {summary['model_dir']}\n  plot: {summary['plot']}\n  state: {summary['state']}")


__all__ = ["GenerationEngine", "HFGenerateEngine", "NoPairsError", "Prompt", "RoundRecord", "SamplingParams",
           "ScorerError", "load_scorer", "print_rounds", "run_iterate"]
