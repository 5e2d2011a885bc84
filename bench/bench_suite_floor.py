"""What one Ray Train fit costs the test suite, and how many fits a suite run makes: the floor under
``make test``'s time on this machine (docs/BENCHMARKS.md, "The test suite's time").

Two parts, each optional:

  fits   one process starts a local Ray as the tests' ``ray_local`` does (8 logical CPUs, no dashboard)
         and runs ``--repeats`` rounds of back-to-back fits in the tests' shape (the bundled tiny model, 64
         generated pairs of the bundled task, 4 steps, ZeRO-0, the in-worker reference), 2 workers then 1
         worker each round. Per fit: its wall time and the start-up timeline of its report.json
         (``dpo_ray.timeline``). The first fit pays the cold start (a fresh Ray, first imports; DeepSpeed's
         CPU op is built or loaded before it, untimed); the rest are what a test's fit costs on a warm Ray.
  reuse  whether Ray hands an actor (Ray Train's controller and workers are actors) a process an earlier task
         left idle, with and without a runtime_env: if it did, a warm pool could spare each fit its imports.
  count  the Ray Train runs (one TrainController log each under ``logs/train``) in the Ray sessions started
         in a time window under ``--ray_tmp`` (default /tmp/ray): a suite run's fit count, given the window
         it ran in. Sessions under the tests' own temp folders (test_job_submit, test_deploy_cluster: removed
         at teardown) are not in it.

    python bench/bench_suite_floor.py --parts fits,reuse --repeats 3
    python bench/bench_suite_floor.py --parts count --since 2026-12-05_08-18 --until 2026-12-05_08-54
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CHILD_ENV, machine, median, table, versions, warm_deepspeed_ops, write_result  # noqa: E402

STAGES = ("worker", "policy", "first batch", "first step")


def fits(repeats: int, work: Path) -> list[dict]:
    """``repeats`` rounds of a 2-worker then a 1-worker fit on one local Ray; per fit its wall time and the
    seconds from ``fit()`` to each start-up stage (the first fit of all is the cold one)."""
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as tests/conftest.py
    print(f"DeepSpeed's CPU op built or loaded outside the timed fits: {warm_deepspeed_ops():.1f} s")
    import ray

    from dpo_ray import DPOConfig, DPOTrainer
    from dpo_ray.data.bundled import make_pairs

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for r in range(repeats):
            for workers in (2, 1):
                out = work / f"fit{r}_{workers}w"
                cfg = DPOConfig(learning_rate=5e-3, beta=0.5, per_device_train_batch_size=4, logging_steps=1,
                                max_length=64, save_strategy="no", report_to=[], seed=7, max_steps=4,
                                ray={"num_workers": workers}, reference={"source": "local"},
                                deepspeed={"zero_stage": 0}, output_dir=str(out))
                t0 = time.perf_counter()
                DPOTrainer(args=cfg, train_dataset=list(make_pairs(64, 0))).train()
                wall = time.perf_counter() - t0
                startup = json.loads((out / "report.json").read_text())["startup"]
                fit_at = startup["fit"]
                run = {"round": r, "workers": workers, "cold": not runs, "wall_s": round(wall, 2),
                       **{s: round(startup[s] - fit_at, 2) for s in STAGES}}
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        ray.shutdown()
    return runs


def reuse() -> dict:
    """Four tasks run (each imports torch), then two actors start: do they get those tasks' idle processes?"""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0.1)
        def task() -> int:
            import torch  # noqa: F401 - the import a reused process would spare the actor

            return os.getpid()

        @ray.remote(num_cpus=0.1)
        class Probe:
            def pid(self) -> int:
                return os.getpid()

        idle = set(ray.get([task.remote() for _ in range(4)]))
        time.sleep(1.0)  # the task workers are idle in Ray's pool now
        plain = ray.get(Probe.remote().pid.remote())
        with_env = ray.get(Probe.options(runtime_env={"env_vars": {"PROBE": "1"}}).remote().pid.remote())
    finally:
        ray.shutdown()
    return {"task_pids": sorted(idle), "actor_pid": plain, "actor_with_runtime_env_pid": with_env,
            "actor_reused_a_task_process": plain in idle or with_env in idle}


def count(ray_tmp: Path, since: str, until: str) -> dict:
    """Ray Train runs per Ray session started in [since, until) (session folders are named by start time)."""
    sessions = {}
    for s in sorted(ray_tmp.glob("session_*")):
        stamp = s.name[len("session_"):]
        if s.is_symlink() or not (since <= stamp < until):
            continue
        sessions[s.name] = len(list((s / "logs" / "train").glob("ray-train-app-controller-*.log")))
    return {"ray_tmp": str(ray_tmp), "since": since, "until": until, "sessions": sessions,
            "fits": sum(sessions.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="fits,reuse", help="comma-separated: fits, reuse, count")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray_tmp", default="/tmp/ray")
    ap.add_argument("--since", default="", help="session folder time stamp, e.g. 2026-12-05_08-18")
    ap.add_argument("--until", default="9999")
    ap.add_argument("--name", default="suite_floor")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    result: dict = {"machine": machine(), "versions": versions(), "command": " ".join(sys.argv)}
    if "fits" in parts:
        with tempfile.TemporaryDirectory(prefix="suite-floor-") as tmp:
            runs = fits(args.repeats, Path(tmp))
        warm = [r for r in runs if not r["cold"]]
        summary = []
        for workers in (2, 1):
            mine = [r for r in warm if r["workers"] == workers]
            if mine:
                summary.append([f"{workers} worker(s), warm", len(mine), median([r["wall_s"] for r in mine]),
                                *(median([r[s] for r in mine]) for s in STAGES)])
        cold = runs[0]
        summary.append(["2 workers, cold (first fit)", 1, cold["wall_s"], *(cold[s] for s in STAGES)])
        print(table(["fit", "n", "wall s (median)", *(f"{s} s after fit()" for s in STAGES)], summary))
        result["fits"] = runs
    if "reuse" in parts:
        result["reuse"] = reuse()
        print(json.dumps(result["reuse"]))
    if "count" in parts:
        result["count"] = count(Path(args.ray_tmp), args.since, args.until)
        print(json.dumps(result["count"], indent=1))
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
