"""Time to the first optimizer step and peak memory against dataset size: 1k, 100k, 1M pairs.

Pairs are generated with ``dpo_ray.data.bundled.make_pairs`` into JSON Lines under ``--workdir``. Each
(size, trainer) runs in its own process with ``max_steps`` 1 on the saved tiny Llama, alternating
dpo_ray and TRL per size:

  dpo_ray  2 workers × 1 thread, streaming Ray Data pipeline (tokenizes while it trains)
  trl      TRL DPOTrainer, torch threads 2: ``datasets`` load + tokenization of every row before step 1

Time to first step counts from the start of the process (imports included) to the end of optimizer
step 1. TRL is run only up to ``--trl_max`` pairs (default 100k: 1M takes ~10 min here); larger sizes are
linearly extrapolated from the largest measured size and marked "extrapolated" (its tokenization is a
per-row ``datasets.map``, linear in rows).

    python bench/bench_scale.py [--sizes 1000,100000,1000000] [--trl_max 100000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    generated_pairs,
    machine,
    median,
    run_child,
    save_tiny_model,
    table,
    versions,
    warm_deepspeed_ops,
    write_result,
)


def _first_row_watch(path: Path) -> dict:
    import threading

    path.unlink(missing_ok=True)
    first: dict = {}

    def watch():
        while "t" not in first:
            if path.exists() and path.stat().st_size > 0:
                first["t"] = time.perf_counter()
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return first


def child_dpo_ray(args) -> dict:
    from dpo_ray import DPOConfig, DPOTrainer

    cfg = DPOConfig(model_name_or_path=args.model, dataset_name=args.data, dataset_test_split=None,
                    output_dir=args.workdir, per_device_train_batch_size=8, max_steps=1, logging_steps=1,
                    save_strategy="no", eval_strategy="no", report_to=[], bf16=False,
                    gradient_checkpointing=False, learning_rate=5e-4, max_length=128,
                    ray={"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5},
                         "torch_threads": 1})
    first = _first_row_watch(Path(args.workdir) / "metrics.jsonl")
    DPOTrainer(model=args.model, args=cfg).train()
    return {"first_step_s": first.get("t", float("nan")) - T_START}


def child_trl(args) -> dict:
    import torch

    torch.set_num_threads(2)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: dict = {}

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.setdefault("first", time.perf_counter())

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t_load = time.perf_counter()
    ds = load_dataset("json", data_files=args.data, split="train",
                      cache_dir=str(Path(args.workdir) / "hf_cache"))
    cfg = DPOConfig(output_dir=args.workdir, per_device_train_batch_size=16, max_steps=1, logging_steps=1,
                    save_strategy="no", report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True,
                    disable_tqdm=True, learning_rate=5e-4, max_length=128, beta=0.1)
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Timer()])
    t_prep = time.perf_counter()
    trainer.train()
    return {"first_step_s": stamps.get("first", float("nan")) - T_START, "prepare_s": t_prep - t_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--trl_max", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/scale")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--name", default="scale")
    ap.add_argument("--child", choices=["dpo_ray", "trl"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.child:
        res = child_dpo_ray(args) if args.child == "dpo_ray" else child_trl(args)
        Path(args.out).write_text(json.dumps(res))
        return

    print(f"DeepSpeed ops ready in {warm_deepspeed_ops():.1f}s (built once, outside the timed runs)",
          flush=True)
    work = Path(args.workdir)
    model = save_tiny_model(work / "model")
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {"dpo_ray": {}, "trl": {}}
    for n in sizes:
        t0 = time.perf_counter()
        data = generated_pairs(work / f"pairs_{n}" / "train.jsonl", n)
        size_mib = data.stat().st_size / 2**20
        print(f"{n} pairs: {size_mib:.1f} MiB of JSON Lines ({time.perf_counter() - t0:.1f}s to generate)",
              flush=True)
        for rep in range(args.repeats):
            for kind in ("dpo_ray", "trl"):
                if kind == "trl" and n > args.trl_max:
                    continue
                out = work / f"{kind}_{n}.json"
                child = [__file__, "--child", kind, "--model", str(model), "--data", str(data), "--out",
                         str(out), "--workdir", str(work / f"run_{kind}_{n}")]
                res = run_child(child, out, args.timeout, log=work / f"{kind}_{n}_{rep}.log")
                res["data_mib"] = size_mib
                runs[kind].setdefault(n, []).append(res)
                msg = res.get("error") or (
                    f"first step {res['first_step_s']:.1f}s, PSS {res['peak_pss_mib']:.0f} MiB")
                print(f"[{rep}] {kind} {n}: {msg}", flush=True)

    summary: dict[str, dict[int, dict]] = {"dpo_ray": {}, "trl": {}}
    for kind in runs:
        for n, rs in runs[kind].items():
            ok = [r for r in rs if "error" not in r]
            if ok:
                summary[kind][n] = {"first_step_s": median([r["first_step_s"] for r in ok]),
                                    "peak_pss_mib": median([r["peak_pss_mib"] for r in ok]),
                                    "peak_rss_mib": median([r["peak_rss_mib"] for r in ok]), "measured": True}
    measured = sorted(n for n in summary["trl"])
    for n in sizes:
        if n not in summary["trl"] and measured:
            # linear extrapolation of the per-row part from the two largest measured sizes
            hi = measured[-1]
            lo = measured[-2] if len(measured) > 1 else None
            s_hi = summary["trl"][hi]
            if lo is not None:
                s_lo = summary["trl"][lo]
                slope_t = (s_hi["first_step_s"] - s_lo["first_step_s"]) / (hi - lo)
                slope_m = (s_hi["peak_pss_mib"] - s_lo["peak_pss_mib"]) / (hi - lo)
            else:
                slope_t, slope_m = s_hi["first_step_s"] / hi, 0.0
            summary["trl"][n] = {"first_step_s": s_hi["first_step_s"] + slope_t * (n - hi),
                                 "peak_pss_mib": s_hi["peak_pss_mib"] + slope_m * (n - hi),
                                 "peak_rss_mib": float("nan"), "measured": False}
    rows = []
    for n in sizes:
        d, t = summary["dpo_ray"].get(n), summary["trl"].get(n)
        rows.append([f"{n:,}",
                     d["first_step_s"] if d else "failed", d["peak_pss_mib"] if d else "-",
                     (t["first_step_s"] if t else "-"), (t["peak_pss_mib"] if t else "-"),
                     "" if t is None or t["measured"] else "TRL extrapolated"])
    print("\ntime to first optimizer step (process start -> end of step 1) and peak PSS of the process tree")
    print(table(["pairs", "dpo_ray first step s", "dpo_ray peak PSS MiB", "TRL first step s",
                 "TRL peak PSS MiB", "note"], rows))
    path = write_result(args.name, {"machine": machine(), "versions": versions(), "args": vars(args),
                                    "summary": summary, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
