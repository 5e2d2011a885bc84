"""Start-up and console: the command's time to its first optimizer step, stage by stage, its peak memory,
and how much of what it prints is the run's own output.

Two commands, each run as a user runs it (``python -m dpo_ray train ...`` in a fresh process, local Ray),
alternated ``--repeats`` times, each once with the console as shipped and once with
``DPO_RAY_RAY_LOGS=all`` (everything Ray forwards, as before the filter; the side-by-side baseline):

  demo   the demo's DPO stage: bundled data and tiny model, the defaults, ``--max_steps 6``
  lora   the same with ``--use_peft --lora_r 8`` (reference: the adapter disabled)

Per run: the start-up timeline from ``report.json`` (seconds from the process start to the end of each stage,
``dpo_ray.timeline``), the whole command's wall time, peak PSS of the process tree, and the console lines:
useful = the run header, data summary, plan, progress, the metrics table, data warnings, the start-up line and
the summary (lines dpo_ray prints), the rest is chatter.

    python bench/bench_startup.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CHILD_ENV, REPO, TreeMemory, machine, median, table, versions, write_result  # noqa: E402

COMMANDS = {
    "demo": ["--max_steps", "6"],
    "lora": ["--max_steps", "6", "--use_peft", "--lora_r", "8", "--lora_alpha", "16"],
}
# What dpo_ray itself prints on a run's console (driver and rank 0); anything else is chatter.
OURS = re.compile(r"^(\S+ )?(\x1b\[\d+m)?(\(RayTrainWorker pid=\d+\)(\x1b\[0m)? )?"
                  r"(dpo-ray|reference: |  (train|eval): |== |  [a-z_/]+ +[-0-9.e+na]+$|  data: |  outputs: |"
                  r"  start-up |  throughput: |\[#*-*\] step|step \d+/\d+ \||prefix sharing |"
                  r"length bucketing |resumed from)")


def run(name: str, quiet: bool, work: Path, timeout: float, extra_env: dict[str, str] | None = None) -> dict:
    out = work / f"{name}_{'quiet' if quiet else 'all'}"
    env = {**os.environ, **CHILD_ENV, "DPO_RAY_RAY_LOGS": "quiet" if quiet else "all",
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "dpo_ray", "train", "--output_dir", str(out), "--overwrite_output_dir",
           *COMMANDS[name]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=work)
    with TreeMemory(proc.pid) as mem:
        text, _ = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if OURS.search(ln)]
    report = json.loads((out / "report.json").read_text()) if proc.returncode == 0 else {}
    (work / f"{name}_{'quiet' if quiet else 'all'}.log").write_text(text)
    return {"rc": proc.returncode, "wall_s": wall, "lines": len(lines), "useful": len(useful),
            "startup": report.get("startup", {}), **mem.report()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--commands", default="demo,lora")
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/startup")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--consoles", default="quiet,all", help="quiet (as shipped), all (DPO_RAY_RAY_LOGS=all)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the measured commands (to try a setting)")
    ap.add_argument("--by-process", action="store_true", help="print each run's peak PSS by process title")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    consoles = [c == "quiet" for c in args.consoles.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = args.commands.split(",")
    runs: dict[str, list[dict]] = {f"{n}/{'quiet' if q else 'all'}": [] for n in names for q in consoles}
    for rep in range(args.repeats):
        for n in names:
            for quiet in consoles:
                key = f"{n}/{'quiet' if quiet else 'all'}"
                r = run(n, quiet, work, args.timeout, extra)
                runs[key].append(r)
                first = r["startup"].get("first step", float("nan"))
                print(f"[{rep}] {key}: rc {r['rc']}, first step {first:.1f}s, wall {r['wall_s']:.1f}s, "
                      f"PSS {r['peak_pss_mib']:.0f} MiB, console {r['useful']}/{r['lines']} lines useful",
                      flush=True)
                if args.by_process:
                    for title, v in r["peak_pss_by_process"].items():
                        print(f"      {v['mib']:6d} MiB  {v['n']:2d} x {title}")
    stages = ["imports", "ray", "data plan", "model", "reference pool", "fit", "worker", "policy", "engine",
              "reference ready", "first batch", "first step"]
    rows, summary = [], {}
    for key, rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0]
        if not ok:
            rows.append([key, "failed"] + [""] * 5)
            continue
        s = {"first_step_s": median([r["startup"].get("first step") for r in ok]),
             "wall_s": median([r["wall_s"] for r in ok]),
             "peak_pss_mib": median([r["peak_pss_mib"] for r in ok]),
             "useful_fraction": median([r["useful"] / r["lines"] for r in ok]),
             "lines": median([r["lines"] for r in ok]),
             "stages": {st: median([r["startup"].get(st) for r in ok]) for st in stages}}
        summary[key] = s
        rows.append([key, s["first_step_s"], s["wall_s"], s["peak_pss_mib"], s["lines"],
                     f"{s['useful_fraction']:.0%}"])
    print(table(["command/console", "first step s (from the command)", "wall s", "peak PSS MiB",
                 "console lines", "useful"], rows))
    timeline_rows = [[st] + [f"{summary[k]['stages'][st]:.1f}" if k in summary else "" for k in runs if
                             k.endswith("/quiet")] for st in stages]
    print(table(["stage ends at (s)"] + [k for k in runs if k.endswith("/quiet")], timeline_rows))
    path = write_result("startup", {"machine": machine(), "versions": versions(), "args": vars(args),
                                    "summary": summary, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
