"""Wall time of an N-trial sweep whose trials share one reference pass vs N independent runs (each its own
pass).

Both sides are the same Ray Tune sweep (dpo_ray.sweep.run_sweep) over ``beta`` with N values, the same trials
(bundled task, tiny Llama, 1 worker each), the same concurrency and resources; the only difference is
``share_reference``: one content-addressed pass before the trials, or a pass inside every trial into its own
cache. Each side runs in a fresh process (a fresh local Ray); rounds alternate the order of the two sides
(shared first in odd rounds, independent first in even ones) and the ratio is that of the medians. Results:
bench/results/sweep.json and docs/BENCHMARKS.md.

    python bench/bench_sweep.py                        # N = 4 and 8, 2 rounds
    python bench/bench_sweep.py --n 4 --rounds 2       # N = 4 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHILD_ENV, RESULTS, machine, versions, warm_deepspeed_ops  # noqa: E402

TRIAL = dict(max_steps=8, per_device_train_batch_size=8, per_device_eval_batch_size=16,
             max_train_samples=3000, max_eval_samples=64, eval_fraction=0.1, logging_steps=2,
             eval_strategy="steps", eval_steps=8, save_strategy="no", report_to=[], max_length=64, bf16=False,
             gradient_checkpointing=False, ray={"num_workers": 1, "resources_per_worker": {"CPU": 0.25}},
             reference={"num_cpus": 0.5, "batch_size": 32})


def child(n: int, shared: bool, out: Path, concurrency: int) -> None:
    from dpo_ray import DPOConfig
    from dpo_ray.sweep import grid_space, run_sweep

    betas = [round(0.05 * (i + 1), 3) for i in range(n)]
    t0 = time.perf_counter()
    summary = run_sweep(DPOConfig(**TRIAL, output_dir=str(out)), grid_space({"beta": betas}),
                        max_concurrent_trials=concurrency, task_prompts=0, verbose=0, share_reference=shared)
    wall = time.perf_counter() - t0
    counter = Path(os.environ["DPO_RAY_REFERENCE_COUNTER"])
    rows = sum(int(line.split()[1]) for line in counter.read_text().splitlines()) if counter.exists() else 0
    print("RESULT " + json.dumps({"n": n, "shared": shared, "wall_s": round(wall, 1), "ok": summary["ok"],
                                  "reference_rows_scored": rows}), flush=True)


def run_side(n: int, shared: bool, concurrency: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        env = {**os.environ, **CHILD_ENV, "DPO_RAY_REFERENCE_COUNTER": str(Path(tmp) / "forwards.txt")}
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--concurrency", str(concurrency),
               "--out", str(Path(tmp) / "sweep")] + (["--shared"] if shared else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(
                f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, action="append", help="trials (repeatable; default 4 and 8)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once, both sides")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians")
    p.add_argument("--child", action="store_true")
    p.add_argument("--shared", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.child:
        child(a.n[0], a.shared, a.out, a.concurrency)
        return
    warm_deepspeed_ops()
    results = []
    import statistics

    for n in a.n or [4, 8]:
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(a.rounds):
            for shared in ((True, False) if r % 2 == 0 else (False, True)):
                runs[shared].append(run_side(n, shared, a.concurrency))
                print(f"N={n} round {r + 1} {'shared' if shared else 'independent'}: {runs[shared][-1]}",
                      flush=True)
        med = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
        ratio = med[True] / med[False]
        print(f"N={n}: shared {med[True]:.1f} s, independent {med[False]:.1f} s (medians of {a.rounds}), "
              f"ratio {ratio:.2f} (reference rows scored: {runs[True][0]['reference_rows_scored']} vs "
              f"{runs[False][0]['reference_rows_scored']})", flush=True)
        results.append({"n": n, "shared": runs[True], "independent": runs[False],
                        "median_shared_s": med[True], "median_independent_s": med[False],
                        "ratio": round(ratio, 3)})
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "sweep.json"  # results for other N from earlier runs are kept
    earlier = json.loads(path.read_text()).get("results", []) if path.exists() else []
    results = sorted([r for r in earlier if r["n"] not in {x["n"] for x in results}] + results,
                     key=lambda r: r["n"])
    path.write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "trial": TRIAL, "concurrency": a.concurrency, "results": results,
         "machine": machine(), "versions": versions()}, indent=1, default=str))


if __name__ == "__main__":
    main()
