"""``make bench``: every benchmark in turn, each printing its table and writing bench/results/<name>.json.

    python bench/run_all.py [--quick] [--only realistic,throughput,throughput_long,startup,scale,...]

--quick shrinks each run (fewer pairs/repeats, TRL scale capped at 1k) to check the scripts in minutes;
the numbers in docs/BENCHMARKS.md come from the full defaults. Every script behind a number the README
quotes is here (realistic: the headline; throughput_long; startup; scale; suite_floor). The ones that need
a downloaded model or a GPU have their own make targets: ``make long-context`` (SmolLM2), ``make gpu-check``;
the iterative-DPO tables take an SFT model (``bench_iterate.py``, ``bench_rollout.py``, docs/BENCHMARKS.md
section 11). The benchmarks run one after another, never side by side: they measure the same 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

FULL = {
    # the README's headline (docs/BENCHMARKS.md table 0): dpo_ray's defaults, TRL's batches on one worker, TRL
    "realistic": ["bench_realistic.py", "--pairs", "200", "--batch", "8", "--repeats", "2"],
    "throughput": ["bench_throughput.py", "--pairs", "1024", "--repeats", "3", "--configs",
                   "dpo_ray_2w1t,dpo_ray_1w2t+local,dpo_ray_2w1t+local+bucket,trl"],
    # the README's "2.04x on pairs of 64-256 tokens" (table 1, longer sequences)
    "throughput_long": ["bench_throughput.py", "--pairs", "512", "--long_pairs", "64,256", "--max_length",
                        "272", "--repeats", "3", "--loss_steps", "30", "--name", "throughput_long",
                        "--workdir", "/tmp/dpo_ray_bench/throughput_long", "--configs",
                        "dpo_ray_2w1t+local+bucket+noshare,dpo_ray_2w1t+local+bucket,dpo_ray_1w2t+local,trl"],
    # the README's first step and the memory of Ray's processes (start-up section)
    "startup": ["bench_startup.py", "--repeats", "2"],
    "scale": ["bench_scale.py", "--sizes", "1000,100000,1000000", "--trl_max", "100000"],
    "reference": ["bench_reference.py"],
    "padding": ["bench_padding.py", "--pairs", "512", "--rounds", "3"],
    "prefix": ["bench_prefix.py", "--pairs", "32", "--rounds", "3"],
    "groups": ["bench_groups.py"],
    "optimizer": ["bench_optimizer.py"],
    "gpu": ["bench_gpu.py"],
    # docs/training.md's step-time cost of a fixed mmap threshold (its memory part: make long-context)
    "allocator": ["bench_allocator.py", "--parts", "speed"],
    # the README's floor under `make test`: what one Ray Train fit of the tests' shape costs
    "suite_floor": ["bench_suite_floor.py", "--repeats", "3"],
}
QUICK = {
    "realistic": ["bench_realistic.py", "--pairs", "48", "--batch", "8", "--repeats", "1", "--name",
                  "realistic_quick"],
    "throughput_long": ["bench_throughput.py", "--pairs", "64", "--long_pairs", "64,256", "--max_length",
                        "272", "--repeats", "1", "--loss_steps", "4", "--name", "throughput_long_quick",
                        "--workdir", "/tmp/dpo_ray_bench/throughput_long_quick"],
    "startup": ["bench_startup.py", "--repeats", "1", "--commands", "demo"],
    "throughput": ["bench_throughput.py", "--pairs", "256", "--repeats", "1", "--name", "throughput_quick"],
    "scale": ["bench_scale.py", "--sizes", "1000,10000", "--trl_max", "1000", "--name", "scale_quick"],
    "reference": ["bench_reference.py", "--steps", "4", "--rounds", "1", "--out",
                  str(BENCH / "results" / "reference_quick.json")],
    "padding": ["bench_padding.py", "--pairs", "128", "--rounds", "1", "--name", "padding_quick"],
    "prefix": ["bench_prefix.py", "--pairs", "8", "--rounds", "1", "--name", "prefix_quick"],
    "groups": ["bench_groups.py", "--groups", "4", "--length", "16", "--hidden", "64", "--layers", "1",
               "--rounds", "1", "--name", "groups_quick"],
    "optimizer": ["bench_optimizer.py", "--steps", "20", "--rounds", "1", "--name", "optimizer_quick"],
    "gpu": ["bench_gpu.py", "--pairs", "256", "--repeats", "1"],
    "allocator": ["bench_allocator.py", "--parts", "speed", "--steps", "5", "--repeats", "1", "--out",
                  str(BENCH / "results" / "allocator_quick.json")],
    "suite_floor": ["bench_suite_floor.py", "--repeats", "1", "--name", "suite_floor_quick"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(FULL))
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    failed = []
    for name in args.only.split(","):
        cmd = [sys.executable, str(BENCH / plan[name][0]), *plan[name][1:]]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=BENCH.parent).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
