"""Iterative DPO against offline DPO on the bundled task, from the same SFT model, with the same total steps.

For each ``--seeds`` value, one after the other:
- ``offline``: the demo's DPO stage (``dpo_ray.demo.DEMO_DPO``: 3,000 bundled pairs, one epoch = 94 steps of 2
  workers × 16) from ``--sft``; the greedy task accuracy on the first 200 held-out prompts after it;
- ``iterative``: ``--rounds`` rounds of ``dpo_ray.iterate`` from ``--sft`` with the same optimizer settings
  and 94 // rounds steps per round; K = ``--samples`` answers per prompt at ``--temperature``,
  ``--prompts_per_round`` prompts per round, scored by the task's rule; the held-out accuracy after each
  round.

``--sft``: the SFT model (default: ``make demo``'s SFT stage is run once into ``--workdir``/sft).

The held-out file has 300 prompts (the runs' own per-round metric uses 200: ±0.03 at these accuracies), too
few to tell settings apart. Each final model (and the SFT model, and every round's) is also scored on
``--fresh`` prompts the task's generator makes that are in neither bundled file (``fresh_prompts``: the same
set in every call; 2,000 by default, ±0.01), reported as ``fresh``.

    .venv/bin/python bench/bench_iterate.py --seeds 42 --prompts_per_round 1024 --samples 4 --temperature 0.7

Writes bench/results/iterate.json (merged over calls) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, table, versions  # noqa: E402


def fresh_prompts(n: int, seed: int = 987_654) -> list[str]:
    """``n`` distinct prompts of the bundled task that neither its training nor its held-out file has."""
    from dpo_ray.data.bundled import TEST_FILE, TRAIN_FILE, make_pairs

    seen = {json.loads(line)["prompt"] for f in (TRAIN_FILE, TEST_FILE)
            for line in Path(f).read_text().splitlines() if line.strip()}
    out: dict[str, None] = {}
    for row in make_pairs(20 * n, seed):
        if row["prompt"] not in seen:
            out.setdefault(row["prompt"])
        if len(out) == n:
            return list(out)
    raise ValueError(f"the task's generator made fewer than {n} fresh prompts")


def fresh_accuracy(model_dir: Path, prompts: list[str]) -> float:
    """Greedy task accuracy of ``model_dir`` on ``prompts`` (4 decimals)."""
    from dpo_ray.demo import greedy_task_accuracy

    return round(greedy_task_accuracy(model_dir, prompts=prompts), 4)


def run_folder(work: Path, name: str) -> Path:
    """Where the run recorded as ``name`` writes its model(s)."""
    if name.startswith("offline seed "):
        return work / f"offline_{name.rsplit(' ', 1)[1]}"
    return work / name.replace(" ", "_")


def rescore(runs: dict, work: Path, fresh: list[str], sft_fresh: float) -> None:
    """Add the fresh-prompt accuracies to recorded runs whose models are still in ``work``."""
    for name, run in runs.items():
        folder = run_folder(work, name)
        models = ([folder] if name.startswith("offline") else
                  [folder / f"round-{r}" / "model" for r in range(1, len(run["heldout"]))])
        if "fresh" in run or not all((m / "config.json").exists() for m in models):
            continue
        run["fresh"] = [sft_fresh] + [fresh_accuracy(m, fresh) for m in models]
        print(f"{name}: fresh {run['fresh']}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", default=None, help="the SFT model directory (default: run the demo's SFT stage)")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--prompts_per_round", type=int, default=1024)
    ap.add_argument("--learning_rate", type=float, default=5e-4)
    ap.add_argument("--skip_offline", action="store_true")
    ap.add_argument("--overlap", action="store_true",
                    help="iterate.overlap: sample round r+1 while round r trains")
    ap.add_argument("--fresh", type=int, default=2000, help="fresh prompts each model is also scored on "
                    "(0: none)")
    ap.add_argument("--rescore", action="store_true", help="only score the models of recorded runs that "
                    "have no fresh-prompt numbers yet and whose folders are still in --workdir")
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/iterate")
    ap.add_argument("--dpo_extra", default="", help="JSON of DPOConfig keys for the iterative rounds (e.g. "
                    "'{\"group_pairs\": \"best_vs_worst\"}')")
    ap.add_argument("--iterate_extra", default="", help="JSON of iterate.* keys (e.g. '{\"reference\": "
                    "\"initial\"}')")
    args = ap.parse_args()

    from dpo_ray.config import DPOConfig
    from dpo_ray.data.bundled import TRAIN_FILE
    from dpo_ray.demo import DEMO_DPO, DEMO_SFT, greedy_task_accuracy
    from dpo_ray.iterate import run_iterate
    from dpo_ray.trainer import DPOTrainer

    work = Path(args.workdir)
    sft = Path(args.sft) if args.sft else work / "sft"
    if not args.sft and not (sft / "config.json").exists():
        DPOTrainer(args=DPOConfig(**DEMO_SFT, output_dir=str(sft), overwrite_output_dir=True),
                   mode="sft").train()
    out_file = RESULTS / "iterate.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {"runs": {}}
    results.update(machine=machine(), versions=versions(), sft=str(sft))
    steps = 94 // args.rounds
    fresh = fresh_prompts(args.fresh) if args.fresh else []
    sft_fresh = fresh_accuracy(sft, fresh) if fresh else None
    sft_heldout = greedy_task_accuracy(sft) if not (args.skip_offline or args.rescore) else None
    rows = []
    seeds = [] if args.rescore else [int(s) for s in args.seeds.split(",")]
    if args.rescore:
        rescore(results["runs"], work, fresh, sft_fresh)
        out_file.write_text(json.dumps(results, indent=2) + "\n")
    for seed in seeds:
        if not args.skip_offline:
            t0 = time.perf_counter()
            offline = f"offline seed {seed}"
            folder = run_folder(work, offline)
            cfg = DPOConfig(**{**DEMO_DPO, "eval_strategy": "no"}, seed=seed, output_dir=str(folder),
                            overwrite_output_dir=True, dataset_name=str(TRAIN_FILE), report_to=[])
            DPOTrainer(model=str(sft), args=cfg).train()
            results["runs"][offline] = {"heldout": [sft_heldout, greedy_task_accuracy(folder)],
                                        "seconds": round(time.perf_counter() - t0, 1)}
            if fresh:
                results["runs"][offline]["fresh"] = [sft_fresh, fresh_accuracy(folder, fresh)]
        dpo_extra = json.loads(args.dpo_extra) if args.dpo_extra else {}
        it_extra = json.loads(args.iterate_extra) if args.iterate_extra else {}
        extras = "".join(f" {k} {v}" for k, v in {**dpo_extra, **it_extra}.items())
        rounds = f" rounds {args.rounds}" if args.rounds != 3 else ""  # the 3-round runs keep their names
        name = (f"iterative seed {seed}{rounds} prompts {args.prompts_per_round} K {args.samples} T "
                f"{args.temperature:g} lr {args.learning_rate:g}{' overlap' if args.overlap else ''}{extras}")
        t0 = time.perf_counter()
        settings = {k: v for k, v in DEMO_DPO.items()
                    if k not in ("eval_strategy", "eval_steps", "num_train_epochs")}
        cfg = DPOConfig(**{**settings, "learning_rate": args.learning_rate, **dpo_extra}, seed=seed,
                        max_steps=steps,
                        eval_strategy="no", report_to=[], model_name_or_path=str(sft),
                        overwrite_output_dir=True, output_dir=str(run_folder(work, name)),
                        iterate={"rounds": args.rounds, "samples": args.samples,
                                 "temperature": args.temperature, "prompts_per_round": args.prompts_per_round,
                                 "max_new_tokens": 16, "eval_limit": 200, "overlap": args.overlap,
                                 **it_extra})
        summary = run_iterate(cfg)
        results["runs"][name] = {"heldout": [r["heldout"] for r in summary["rounds"]],
                                 "groups": [r["groups"] for r in summary["rounds"][1:]],
                                 "pairs": [r["pairs"] for r in summary["rounds"][1:]],
                                 "seconds": [r["seconds"] for r in summary["rounds"]],
                                 "wall_s": round(time.perf_counter() - t0, 1)}
        if fresh:
            results["runs"][name]["fresh"] = [sft_fresh] + [fresh_accuracy(Path(r["model_dir"]), fresh)
                                                            for r in summary["rounds"][1:]]
        out_file.write_text(json.dumps(results, indent=2) + "\n")
    for name, run in results["runs"].items():
        rows.append([name, " / ".join(f"{x:.3f}" for x in run["heldout"]),
                     " / ".join(f"{x:.3f}" for x in run.get("fresh", [])) or "-",
                     run.get("wall_s", run.get("seconds"))])
    print(table(["run", "held-out accuracy by round (0 = SFT)", "fresh prompts", "seconds"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
