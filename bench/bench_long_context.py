"""Memory at long context: one DPO optimizer step on the real SmolLM2-135M-Instruct at 1k..8k tokens per pair.

Per length L (tokens per pair: prompt + one response, the prompt half of it; chosen and rejected are as long
and differ), one pair, one optimizer step, fp32, one training process, in its own process tree
(bench/common.py ``run_child``, PSS sampled every 50 ms):

- ``trl``: TRL 1.16's DPOTrainer with its defaults for memory (``gradient_checkpointing=True``, a separate
  reference model in the same process); bf16 off (TRL's default bf16 autocast runs ~10x slower on this CPU);
- ``dpo_ray``: dpo_ray's defaults (prefix sharing auto, the reference where ``reference.source`` auto puts it,
  ``gradient_checkpointing: auto``), 1 worker;
- ``dpo_ray-gc``: the same with ``gradient_checkpointing: false`` (what the defaults were before auto);
- ``dpo_ray+gc``: the same with ``gradient_checkpointing: true``;
- ``dpo_ray+gc+noshare``: and ``prefix_sharing: off`` (the standard [chosen; rejected] layout, as TRL).

Reported per configuration: the training process's peak PSS (for dpo_ray the Ray Train worker; its reference
actor, Ray's daemons and the driver are separate processes, listed at the tree's peak) and the whole tree's.
``--budget_gib``: the longest measured L whose training process stays within it; ``--stop_over_budget`` kills
a run as soon as its largest process passes the budget (recorded as over budget, not failed), so a length that
does not fit is settled without filling the machine.

    .venv/bin/python bench/bench_long_context.py --lengths 1024,2048,4096 [--configs trl,dpo_ray]
        # make long-context

Writes bench/results/long_context.json (merged over calls: one length per call is fine) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from common import BENCH, RESULTS, machine, run_child, table, versions  # noqa: E402

CONFIGS = {"trl": ("trl", {"gradient_checkpointing": True}),
           # the product's default (the child's is off)
           "dpo_ray": ("dpo_ray", {"gradient_checkpointing": "auto"}),
           "dpo_ray-gc": ("dpo_ray", {"gradient_checkpointing": False}),
           "dpo_ray+gc": ("dpo_ray", {"gradient_checkpointing": True}),
           "dpo_ray+gc+noshare": ("dpo_ray", {"gradient_checkpointing": True, "prefix_sharing": "off"})}
WORDS = ("river stone light garden window paper music morning table silver forest letter candle market "
         "bridge winter harbor meadow lantern orchard valley thunder pocket ribbon violet anchor basket "
         "castle").split()


def text_of(tok, n: int, rng: random.Random) -> str:
    """About ``n`` tokens of plain words (re-tokenized exactly by the caller's count)."""
    words = " ".join(rng.choice(WORDS) for _ in range(n))
    ids = tok(words, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


def one_pair(tok, length: int, out: Path) -> dict:
    rng = random.Random(length)
    half = length // 2
    row = {"prompt": text_of(tok, half, rng), "chosen": " " + text_of(tok, half - 1, rng),
           "rejected": " " + text_of(tok, half - 1, rng)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row) + "\n")
    n = {k: len(tok(v, add_special_tokens=False)["input_ids"]) for k, v in row.items()}
    return {"prompt": n["prompt"], "chosen": n["chosen"], "rejected": n["rejected"],
            "pair": n["prompt"] + n["chosen"]}


def worker_peak(res: dict, kind: str) -> float:
    """The training process's PSS at the tree's peak (dpo_ray: the Ray Train worker; TRL: the process)."""
    by = res.get("peak_pss_by_process", {})
    if kind == "trl":
        return max((v["mib"] for v in by.values()), default=res.get("peak_pss_mib", 0.0))
    train = [v["mib"] / v["n"] for k, v in by.items() if "RayTrainWorker" in k or "TrainWorker" in k]
    return max(train) if train else max((v["mib"] / v["n"] for v in by.values()), default=0.0)


MASK_CODE = """
import resource, sys, torch
from dpo_ray import prefix
T, how = int(sys.argv[1]), sys.argv[2]
ids = torch.randint(1, 50, (2, T)); attn = torch.ones(2, T, dtype=torch.long)
ids[1, :T // 2] = ids[0, :T // 2]
comp = attn.clone(); comp[:, :T // 2] = 0
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pk = prefix.pack_pairs(ids, attn, comp, dense=how == "now")
if how == "before":  # the expression pack_pairs used before 2026-12-03 (the baseline)
    s = pk.input_ids.shape[1]; p = torch.arange(s)[None]; q, k = pk.branch[:, :, None], pk.branch[:, None, :]
    keep = (p[:, :, None] >= p[:, None, :]) & (q < 3) & (k < 3) & ((k == 0) | (k == q))
    keep = (keep | torch.eye(s, dtype=torch.bool))[:, None]
print(pk.input_ids.shape[1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def mask_memory(lengths: list[int]) -> list[list]:
    """Peak memory of building prefix sharing's dense (B, 1, S, S) mask for one pair: now vs the old
    expression."""
    import subprocess

    rows = []
    for length in lengths:
        got = {}
        for how in ("before", "now"):
            r = subprocess.run([sys.executable, "-c", MASK_CODE, str(length), how], capture_output=True,
                               text=True, check=True)
            s, mib = r.stdout.split()
            got[how] = float(mib)
        rows.append([length, int(s), round(int(s) ** 2 / 2**20), round(got["before"]), round(got["now"]),
                     f"{got['now'] / got['before']:.2f}"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="the SmolLM2 directory (default: scripts/smollm2.py's cache)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--budget_gib", type=float, default=16.0)
    ap.add_argument("--stop_over_budget", action="store_true",
                    help="kill a run once its training process passes --budget_gib (recorded as over "
                         "budget): what does not fit is measured without filling the machine")
    ap.add_argument("--timeout", type=float, default=3000,
                    help="seconds per run (8k takes ~20 minutes on 2 cores)")
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/long_context")
    ap.add_argument("--out", default=str(RESULTS / "long_context.json"))
    ap.add_argument("--tag", default="", help="a label for this code state (e.g. before/after a change)")
    ap.add_argument("--mask", action="store_true",
                    help="only the dense mask's build: now vs the old expression")
    args = ap.parse_args()
    if args.mask:
        print(table(["L", "S packed", "mask MiB", "build peak MiB before", "now", "now/before"],
                    mask_memory([int(x) for x in args.lengths.split(",")])))
        return 0

    import smollm2
    from transformers import AutoTokenizer

    model = Path(args.model) if args.model else smollm2.ensure(do_check=False)
    tok = AutoTokenizer.from_pretrained(model)
    work = Path(args.workdir)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results.update(machine=machine(), versions=versions(), model=str(model), budget_gib=args.budget_gib)
    for length in [int(x) for x in args.lengths.split(",")]:
        data = work / f"pair_{length}.jsonl"
        lens = one_pair(tok, length, data)
        for name in args.configs.split(","):
            kind, extra = CONFIGS[name]
            child = [str(BENCH / "bench_throughput.py"), "--child", kind, "--model", str(model), "--data",
                     str(data), "--workers", "1", "--threads", "2", "--out",
                     str(work / f"{name}_{length}.json"), "--workdir", str(work / f"run_{name}_{length}"),
                     "--batch", "1", "--epochs", "1", "--lr", "1e-6", "--max_length", str(length + 64)]
            child += ["--trl_extra" if kind == "trl" else "--dpo_ray_extra", json.dumps(extra)]
            t0 = time.perf_counter()
            res = run_child(child, work / f"{name}_{length}.json", args.timeout,
                            log=work / f"{name}_{length}.log",
                            stop_above_mib=args.budget_gib * 1024 if args.stop_over_budget else None)
            row = {"config": name, "length": length, "tokens": lens, "tag": args.tag,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            if "stopped_above_mib" in res:
                row.update(over_budget=True, process_peak_mib=res["stopped_above_mib"],
                           tree_peak_mib=round(res["peak_pss_mib"]))
                print(f"{name} @ {length} tokens/pair: stopped, its training process passed "
                      f"{args.budget_gib:g} GiB ({res['stopped_above_mib']} MiB)", flush=True)
            elif "error" in res:
                row["error"] = res["error"]
                print(f"{name} @ {length}: FAILED {res['error']}\n{res.get('log_tail', '')[-1500:]}",
                      flush=True)
            else:
                row.update(process_peak_mib=round(worker_peak(res, kind)),
                           tree_peak_mib=round(res["peak_pss_mib"]),
                           by_process=res.get("peak_pss_by_process"),
                           loss=res["losses"][0] if res["losses"] else None)
                print(f"{name} @ {length} tokens/pair: training process {row['process_peak_mib']} MiB, tree "
                      f"{row['tree_peak_mib']} MiB, {row['wall_s']:.0f} s", flush=True)
            results["runs"][f"{args.tag}{name}@{length}"] = row
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    rows, longest = [], {}
    for row in sorted(results["runs"].values(), key=lambda r: (r.get("tag", ""), r["length"], r["config"])):
        ok = "error" not in row
        label = f"{row.get('tag', '')}{row['config']}"
        if ok and not row.get("over_budget") and row["process_peak_mib"] <= args.budget_gib * 1024:
            longest[label] = max(longest.get(label, 0), row["length"])
        peak = (f"> {args.budget_gib:g} GiB (stopped at {row['process_peak_mib']})" if row.get("over_budget")
                else row.get("process_peak_mib", "failed"))
        rows.append([label, row["length"], row["tokens"]["pair"], peak,
                     row.get("tree_peak_mib", ""), row["wall_s"]])
    print(table(["config", "L", "tokens/pair", "training process peak PSS MiB", "tree peak PSS MiB",
                 "wall s"], rows))
    print(f"longest measured L within {args.budget_gib:g} GiB (training process):", json.dumps(longest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
