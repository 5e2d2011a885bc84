"""dpo_ray against TRL's DPOTrainer: same tiny model, data, hyper-parameters and CPU cores.

Both load the tiny Llama dpo_ray builds by default, saved once to a directory (TRL also gets an explicit
``ref_model`` loaded from it: TRL otherwise reloads the reference from the hub by name), and train one epoch
over the first ``--pairs`` rows of the bundled train.jsonl with a global batch of ``--batch`` pairs, sigmoid
loss, β 0.1, linear LR from ``--lr``, fp32, no gradient checkpointing, seed 42, logging every step.
Configurations, each in its own process, alternated (A B C A B C ...) ``--repeats`` times because the 2 cores
are shared:

  dpo_ray 2w×1t  2 Ray Train workers × 1 torch thread, reference actor pool (the default source)
  dpo_ray 1w×2t  1 worker × 2 threads (same global batch, same data order as trl below)
  trl            TRL DPOTrainer, 1 process, torch threads 2, in-process reference model

Per run: steady pairs/s (steps after ``--warmup`` steps; excludes start-up), time to the first
optimizer step, end-to-end wall time (process start to exit, Ray start-up included), peak memory
of the whole process tree (RSS and PSS summed over Ray's processes), the per-step loss.
Loss agreement: dpo_ray 1w×2t and trl see the same batches in the same order (trl's data is put in
the order dpo_ray's seeded pool shuffle produces, then read sequentially), so their per-step losses
must agree; 2w×1t shards the data differently, so only its smoothed curve is compared.

    python bench/bench_throughput.py [--pairs 1024] [--batch 16] [--repeats 3]
        [--configs dpo_ray_2w1t,dpo_ray_1w2t,trl]
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
    RESULTS,
    bundled_subset,
    machine,
    median,
    run_child,
    save_tiny_model,
    steady_rate,
    table,
    versions,
    warm_deepspeed_ops,
    write_result,
)

CONFIGS = {
    "dpo_ray_2w1t": {"kind": "dpo_ray", "workers": 2, "threads": 1},
    "dpo_ray_1w2t": {"kind": "dpo_ray", "workers": 1, "threads": 2},
    "dpo_ray_1w1t": {"kind": "dpo_ray", "workers": 1, "threads": 1},
    "dpo_ray_1w": {"kind": "dpo_ray", "workers": 1, "threads": 0},  # threads 0: the worker's own default
    # ray.num_workers' default, nothing else set
    "dpo_ray_2w": {"kind": "dpo_ray", "workers": 2, "threads": 0},
    "trl": {"kind": "trl", "workers": 1, "threads": 2},
}
# "+name" suffixes on a dpo_ray config name add DPOConfig keys (e.g. dpo_ray_1w2t+local+bucket)
VARIANTS = {
    "local": {"reference": {"source": "local"}},
    "bucket": {"length_bucketing": True},
    "nobucket": {"length_bucketing": False},  # the shuffled order TRL is given: identical batches
    "noshare": {"prefix_sharing": "off"},  # the standard [chosen; rejected] layout (before prefix sharing)
}
SEED = 42


def hparams(args) -> dict:
    return {"beta": 0.1, "learning_rate": args.lr, "max_length": args.max_length, "seed": SEED,
            "loss_type": "sigmoid", "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "weight_decay": 0.0}


# ------------------------------------------------------------------------------------- children

def child_dpo_ray(args) -> dict:
    from dpo_ray import DPOConfig, DPOTrainer

    hp = hparams(args)
    per_device = args.batch // args.workers
    extra = json.loads(args.dpo_ray_extra) if args.dpo_ray_extra else {}
    ray_cfg = {"num_workers": args.workers, "use_gpu": args.gpu,
               "resources_per_worker": {"CPU": 1, "GPU": 1} if args.gpu else {"CPU": 0.5}}
    if args.threads:
        ray_cfg["torch_threads"] = args.threads
    # e.g. {"resources_per_worker": {"CPU": 1, "GPU": 0.5}} (gpu_check.py)
    ray_cfg.update(extra.pop("ray", {}))
    settings = dict(
        model_name_or_path=args.model, dataset_name=args.data, dataset_test_split=None,
        output_dir=args.workdir, overwrite_output_dir=True,  # repeats reuse run_<name>
        per_device_train_batch_size=per_device, num_train_epochs=args.epochs,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], bf16=args.gpu,
        gradient_checkpointing=False, **{k: v for k, v in hp.items() if k != "loss_type"},
        loss_type=[hp["loss_type"]], ray=ray_cfg,
    )
    cfg = DPOConfig(**{**settings, **extra})  # extra may override a default here (gradient_checkpointing)
    import threading

    metrics_file = Path(args.workdir) / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    first = {}

    def watch():  # the first metrics row appears right after optimizer step 1
        while "t" not in first:
            if metrics_file.exists() and metrics_file.stat().st_size > 0:
                first["t"] = time.perf_counter()
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    out = DPOTrainer(model=args.model, args=cfg).train()
    train_wall = time.perf_counter() - t0
    first.setdefault("t", float("nan"))
    rows = [r for r in out.history if "loss" in r]
    # per-step durations from the logged rate (logging_steps 1: one row per optimizer step)
    step_times = [args.batch / r["samples_per_second"] for r in rows]
    return {"losses": [r["loss"] for r in rows], "step_times": step_times,
            "logps_chosen": [r.get("logps/chosen") for r in rows],
            "first_step_s": first["t"] - t0,  # train() start to the end of optimizer step 1
            "first_step_from_start_s": first["t"] - T_START,
            "train_wall_s": train_wall, "report_wall_s": out.report["wall_time_s"],
            "pairs": out.report["pairs"], "tokens": out.report["tokens"],
            "gpu_peak_mib": max((r.get("gpu_peak_mib", 0.0) for r in rows), default=0.0),  # rank 0, allocator
            "startup_s": first["t"] - t0 - step_times[0],
            "code": str(Path(__import__("dpo_ray").__file__).parent)}  # which checkout ran (--code)


def dpo_ray_order(n: int, batch: int, pool_batches: int, seed: int) -> list[int]:
    """The row order dpo_ray's BatchIterator yields for one worker (no bucketing, epoch 0): pools of
    pool_batches × batch rows in file order, each permuted by default_rng([seed, 0])."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    pool = pool_batches * batch
    order: list[int] = []
    for start in range(0, n, pool):
        m = min(pool, n - start)
        perm = rng.permutation(m)
        full = m - m % batch
        order += [start + int(i) for i in perm[:full]]
    return order


def child_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.data.batching import SHUFFLE_POOL_BATCHES

    hp = hparams(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = load_dataset("json", data_files=args.data, split="train")
    ds = ds.select(dpo_ray_order(len(ds), args.batch, SHUFFLE_POOL_BATCHES, SEED))

    class Timer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []
            self.begin = None

        def on_train_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.stamps.append(time.perf_counter())

    timer = Timer()
    kw = dict(
        output_dir=args.workdir, per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], bf16=args.gpu, fp16=False,
        gradient_checkpointing=False, use_cpu=not args.gpu, disable_tqdm=True, dataloader_drop_last=True,
        train_sampling_strategy="sequential", warmup_steps=0, **hp,
    )
    # e.g. TRL's default gradient checkpointing
    kw.update(json.loads(args.trl_extra) if args.trl_extra else {})
    cfg = DPOConfig(**kw)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    train_wall = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "loss" in r]
    step_times = [b - a for a, b in zip([timer.begin, *timer.stamps[:-1]], timer.stamps)]
    return {"losses": [r["loss"] for r in logs], "step_times": step_times,
            "logps_chosen": [r.get("logps/chosen") for r in logs],
            "first_step_s": timer.stamps[0] - t0, "first_step_from_start_s": timer.stamps[0] - T_START,
            "train_wall_s": train_wall,
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
            "pairs": len(timer.stamps) * args.batch, "startup_s": timer.begin - t0}


# ------------------------------------------------------------------------------------- parent

def variant_extra(name: str, extra_json: str) -> dict:
    extra = json.loads(extra_json) if extra_json else {}
    for v in name.split("+")[1:]:
        extra.update(VARIANTS[v])
    return extra


def smooth(xs: list[float], k: int) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="global batch (pairs per optimizer step)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the steady rate")
    ap.add_argument("--loss_steps", type=int, default=50, help="N: compare losses over the first N steps")
    ap.add_argument("--configs", default="dpo_ray_2w1t,dpo_ray_1w2t,trl")
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/throughput")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--name", default="throughput", help="results file stem under bench/results/")
    ap.add_argument("--dpo_ray_extra", default="", help="JSON of extra DPOConfig keys for the dpo_ray runs")
    ap.add_argument("--trl_extra", default="", help="JSON of TRL DPOConfig keys overriding the TRL child's")
    ap.add_argument("--model_dir", help="a saved model directory to use instead of the tiny Llama")
    ap.add_argument("--data_file", help="a JSON Lines file to use instead of the bundled subset")
    ap.add_argument("--long_pairs", metavar="MIN,MAX",
                    help="generate --pairs bundled-task pairs of MIN..MAX tokens per sequence (prompt about "
                    "as long as the completion) instead of the bundled subset")
    ap.add_argument("--gpu", action="store_true", help="one GPU per trainer process, bf16 (bench_gpu.py)")
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                    help="a config name ending in @LABEL runs dpo_ray from DIR (another checkout, e.g. `git "
                         "worktree add DIR <commit>`): a change measured against the code before it, "
                         "alternated in one run")
    # child mode
    ap.add_argument("--child", choices=["dpo_ray", "trl"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.child:
        res = child_dpo_ray(args) if args.child == "dpo_ray" else child_trl(args)
        res["child_total_s"] = time.perf_counter() - T_START
        Path(args.out).write_text(json.dumps(res))
        return

    print(f"DeepSpeed ops ready in {warm_deepspeed_ops():.1f}s (built once, outside the timed runs)",
          flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_dir) if args.model_dir else save_tiny_model(work / "model")
    if args.long_pairs:
        from bench_gpu import long_pairs

        lo, hi = (int(x) for x in args.long_pairs.split(","))
        data = long_pairs(work / "data" / f"long_{lo}_{hi}_{args.pairs}.jsonl", args.pairs, lo, hi)
    else:
        data = (Path(args.data_file) if args.data_file
                else bundled_subset(work / "data" / "train.jsonl", args.pairs))
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    code = dict(kv.split("=", 1) for kv in args.code)
    for rep in range(args.repeats):
        for name in names:
            base, _, label = name.partition("@")
            c = CONFIGS[base.split("+")[0]]
            env = {"PYTHONPATH": code[label]} if label else None  # run_child puts this repo after it
            out = work / f"{name}.json"
            child = [__file__, "--child", c["kind"], "--model", str(model), "--data", str(data),
                     "--workers", str(c["workers"]), "--threads", str(c["threads"]), "--out", str(out),
                     "--workdir", str(work / f"run_{name}"), "--batch", str(args.batch), "--epochs",
                     str(args.epochs), "--lr", str(args.lr), "--max_length", str(args.max_length),
                     "--dpo_ray_extra", json.dumps(variant_extra(base, args.dpo_ray_extra))]
            child += ["--trl_extra", args.trl_extra] if args.trl_extra else []  # the child reads it
            child += ["--gpu"] if args.gpu else []
            res = run_child(child, out, args.timeout, env=env, log=work / f"{name}_{rep}.log",
                            cwd=Path(code[label]) if label else None)
            if "error" in res:
                print(f"[{rep}] {name}: FAILED ({res['error']})\n{res['log_tail']}", file=sys.stderr)
            else:
                res["steady_pairs_s"] = steady_rate(res["step_times"], args.batch, args.warmup)
                print(f"[{rep}] {name}: {res['steady_pairs_s']:.1f} pairs/s steady, first step "
                      f"{res['first_step_s']:.1f}s, wall {res['process_wall_s']:.1f}s, "
                      f"PSS {res['peak_pss_mib']:.0f} MiB", flush=True)
            runs[name].append(res)

    # tokens per pair: non-pad tokens of chosen + rejected, the same tokenization for both
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer, tokenize_rows

    rows_raw = [json.loads(ln) for ln in data.read_text().splitlines() if ln.strip()]
    cols = tokenize_rows(rows_raw, load_tokenizer(str(model)), DPOConfig(max_length=args.max_length))
    tokens_per_pair = (sum(len(x) for x in cols["chosen_input_ids"])
                       + sum(len(x) for x in cols["rejected_input_ids"])) / len(rows_raw)

    summary = {}
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        if not ok:
            summary[name] = {"error": runs[name][0].get("error")}
            continue
        summary[name] = {
            "steady_pairs_s": median([r["steady_pairs_s"] for r in ok]),
            "steady_tokens_s": median([r["steady_pairs_s"] for r in ok]) * tokens_per_pair,
            "first_step_s": median([r["first_step_s"] for r in ok]),
            "first_step_from_start_s": median([r["first_step_from_start_s"] for r in ok]),
            "process_wall_s": median([r["process_wall_s"] for r in ok]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in ok]),
            "peak_pss_mib": median([r["peak_pss_mib"] for r in ok]),
            "peak_processes": max(r["peak_processes"] for r in ok),
            "runs": len(ok),
        }
    # loss agreement, per step and smoothed, over the first N steps (first repeat of each)
    base = next((r for r in runs.get("trl", []) if "error" not in r), None)
    for name in names:
        if name == "trl" or base is None or "error" in summary[name]:
            continue
        other = next(r for r in runs[name] if "error" not in r)
        n = min(args.loss_steps, len(base["losses"]), len(other["losses"]))
        a, b = base["losses"][:n], other["losses"][:n]
        summary[name]["max_abs_dloss"] = max(abs(x - y) for x, y in zip(a, b))
        summary[name]["max_abs_dloss_smooth10"] = max(
            abs(x - y) for x, y in zip(smooth(a, 10), smooth(b, 10)))
        summary[name]["loss_steps_compared"] = n
        summary[name]["speedup_vs_trl"] = summary[name]["steady_pairs_s"] / summary["trl"]["steady_pairs_s"]
        summary[name]["pss_vs_trl"] = summary[name]["peak_pss_mib"] / summary["trl"]["peak_pss_mib"]

    headers = ["config", "pairs/s (steady)", "tokens/s", "× TRL", "first step s (trainer)",
               "first step s (process)", "wall s", "peak PSS MiB",
               "peak RSS MiB", "max |Δloss| (N steps)", "max |Δloss| smoothed"]
    rows = []
    for name in names:
        s = summary[name]
        if "error" in s:
            rows.append([name, "failed"] + [""] * (len(headers) - 2))
            continue
        rows.append([name, s["steady_pairs_s"], s["steady_tokens_s"],
                     s.get("speedup_vs_trl", 1.0 if name == "trl" else "-"), s["first_step_s"],
                     s["first_step_from_start_s"], s["process_wall_s"], s["peak_pss_mib"], s["peak_rss_mib"],
                     f"{s['max_abs_dloss']:.2e} ({s['loss_steps_compared']})" if "max_abs_dloss" in s
                     else "-",
                     f"{s['max_abs_dloss_smooth10']:.2e}" if "max_abs_dloss_smooth10" in s else "-"])
    print(f"\n{args.pairs} bundled pairs, global batch {args.batch}, max_length {args.max_length}, "
          f"{tokens_per_pair:.1f} tokens/pair, medians of {args.repeats} alternating runs")
    print(table(headers, rows))
    path = write_result(args.name, {"machine": machine(), "versions": versions(), "args": vars(args),
                                    "tokens_per_pair": tokens_per_pair, "summary": summary, "runs": runs})
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
