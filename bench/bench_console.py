"""How much of what each command prints is dpo_ray's own: `dpo-ray train`, `dpo-ray inspect-data` and
`dpo-ray sweep`, each run as a user runs it (a fresh process, local Ray, output into a pipe), with the console
as shipped and with ``DPO_RAY_RAY_LOGS=all`` (everything Ray forwards: the side-by-side baseline).

A line is dpo_ray's own unless it is Ray's or a library's: a line under a Ray process prefix
(``(RayTrainWorker pid=N) ...``) that dpo_ray's worker code did not print, or a line in Ray's log formats
(``2026-12-03 17:09:47,422 INFO ...``, ``[2026-12-03 ... E 8874 8874] core_worker.cc ...``). Blank lines do
not count. ``tests/test_console.py`` holds train's console to >= 90 % with the same function.

    python bench/bench_console.py [--commands train inspect sweep] [--consoles quiet all]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_RAY_PREFIX = re.compile(r"^\((?:[\w.:]+ )?pid=\d+(?:, ip=[\d.]+)?\) ")
# what dpo_ray's worker-side code prints (rank 0's metrics
# line and notes; a trial's own driver lines in a sweep)
_OWN_WORKER = ("step ", "prefix sharing", "length bucketing", "resumed from", "the first epoch gave",
               "Ray Train's latest checkpoint", "reference actor", "reference cache", "dpo-ray",
               "reference: ", "  train: ", "  eval: ", "== ", "  data: ", "  outputs: ", "  start-up ",
               "  throughput: ", "  not used: ", "  warning: ")
_RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR|DEBUG)\b"
                      r"|^\[\d{4}-\d\d-\d\d [\d:,]+ [EWI] \d+")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def own_share(lines: list[str]) -> tuple[float, list[str]]:
    """(share of the non-blank lines that are dpo_ray's own, the other lines)."""
    counted = [_ANSI.sub("", ln) for ln in lines if ln.strip()]
    foreign = []
    for line in counted:
        body = _RAY_PREFIX.sub("", line)
        if (body != line and not body.startswith(_OWN_WORKER)
                and not re.match(r"\s+[a-z_/]+ +[-0-9.e+na]+$", body)) \
                or _RAY_LOG.search(line):
            foreign.append(line)
    return 1 - len(foreign) / max(len(counted), 1), foreign


def commands(work: Path) -> dict[str, list[str]]:
    tiny = ["--config", str(REPO / "examples" / "tiny_demo.yaml")]
    return {
        "train": ["train", *tiny, "--max_steps", "6", "--output_dir", str(work / "train"),
                  "--overwrite_output_dir"],
        "inspect": ["inspect-data", *tiny, "--max_rows", "200", "--report_dir", str(work / "inspect")],
        "sweep": ["sweep", *tiny, "--max_steps", "4", "--logging_steps", "2", "--eval_strategy", "steps",
                  "--eval_steps", "4", "--ray.num_workers", "1", "--output_dir", str(work / "sweep"),
                  "--grid", "beta=0.1,0.3", "--task_prompts", "0", "--max_concurrent_trials", "1"],
    }


def run(name: str, argv: list[str], quiet: bool, timeout: float) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_V2_ENABLED": "1", "PYTHONUNBUFFERED": "1",
           "DPO_RAY_RAY_LOGS": "quiet" if quiet else "all"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dpo_ray", *argv], cwd=REPO, env=env, text=True,
                         timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = res.stdout.splitlines()
    share, foreign = own_share(lines)
    return {"command": name, "console": "quiet" if quiet else "all", "rc": res.returncode,
            "wall_s": round(time.perf_counter() - t0, 1), "lines": len([ln for ln in lines if ln.strip()]),
            "own_share": round(share, 3), "foreign": foreign[:20], "ansi": bool(_ANSI.search(res.stdout))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", nargs="+", default=["train", "inspect", "sweep"])
    ap.add_argument("--consoles", nargs="+", default=["quiet", "all"], choices=["quiet", "all"])
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "console.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        argvs = commands(Path(tmp))
        for name in args.commands:
            for console in args.consoles:
                row = run(name, argvs[name], console == "quiet", args.timeout)
                rows.append(row)
                print(f"{name:<8} {console:<6} rc {row['rc']}  {row['lines']:>4} lines  "
                      f"{row['own_share']:.0%} dpo_ray's own  ({row['wall_s']} s)", flush=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
