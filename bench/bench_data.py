"""Data pipeline benchmark: tokenized pairs/s and time to first batch.

    python bench/bench_data.py [--repeat 10] [--sizes 1000 100000 1000000]

1. Throughput on the bundled data (its 3000 train pairs repeated --repeat times into one JSONL file):
   dpo_ray's Ray Data pipeline (build_datasets + read every tokenized row) vs ``datasets.Dataset.map``
   with the same tokenizer (a full pre-pass, as TRL does), both in this run.
2. Time to first batch (build_datasets + the first collated batch of iter_train_batches) for generated
   files of 1k, 100k and 1M pairs: it should not grow with the dataset size.
Writes bench/results/data.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    from dpo_ray.data.bundled import make_pairs

    with open(path, "w") as f:
        for r in make_pairs(n, seed):
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def bench_ours(path: Path, tok, cfg) -> dict:
    from dpo_ray.data import build_datasets

    t0 = time.perf_counter()
    prep = build_datasets(cfg.model_copy(update={"dataset_name": str(path)}), tok)
    first, rows = None, 0
    for batch in prep.train.iter_batches(batch_size=1024, batch_format="numpy", prefetch_batches=2):
        if first is None:
            first = time.perf_counter() - t0
        rows += len(batch["row_id"])
    wall = time.perf_counter() - t0
    return {"rows": rows, "wall_s": round(wall, 3), "pairs_per_s": round(rows / wall, 1),
            "first_rows_s": round(first, 3)}


def bench_datasets_map(path: Path, tok) -> dict:
    """TRL-style pre-pass: load, then tokenize prompt / chosen / rejected with Dataset.map (batched)."""
    import datasets

    datasets.disable_caching()
    eos = tok.eos_token_id

    def tokenize(batch):
        p = tok(batch["prompt"])["input_ids"]
        c = tok(batch["chosen"], add_special_tokens=False)["input_ids"]
        r = tok(batch["rejected"], add_special_tokens=False)["input_ids"]
        return {"prompt_input_ids": p, "chosen_input_ids": [x + [eos] for x in c],
                "rejected_input_ids": [x + [eos] for x in r]}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        rows = len(ds)
    wall = time.perf_counter() - t0
    return {"rows": rows, "wall_s": round(wall, 3), "pairs_per_s": round(rows / wall, 1),
            "first_rows_s": round(wall, 3)}  # the first batch exists only after the full pre-pass


def time_to_first_batch(path: Path, tok, cfg) -> dict:
    from dpo_ray.data import build_datasets, iter_train_batches

    t0 = time.perf_counter()
    prep = build_datasets(cfg.model_copy(update={"dataset_name": str(path)}), tok)
    t_build = time.perf_counter() - t0
    it = iter(iter_train_batches(prep.train, cfg, tok.pad_token_id,
                                 batch_size=cfg.per_device_train_batch_size, epoch=0, seed=0))
    next(it)
    t_first = time.perf_counter() - t0
    return {"rows": prep.num_train_rows_estimate, "build_s": round(t_build, 3),
            "first_batch_s": round(t_first, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10, help="copies of the bundled train pairs for throughput")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = ap.parse_args()

    import ray

    from dpo_ray import DPOConfig
    from dpo_ray.data import bundled, load_tokenizer

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # never joins another
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    tok = load_tokenizer(None)
    cfg = DPOConfig(max_length=64, per_device_train_batch_size=32, dataset_test_split=None)
    results: dict = {"date": date.today().isoformat(),
                     "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}",
                     "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
                     "ray": ray.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_file = tmp / "bundled_x.jsonl"
        lines = bundled.TRAIN_FILE.read_text()
        bench_file.write_text(lines * args.repeat)
        bench_ours(bench_file, tok, cfg)  # warm-up: worker processes, imports
        ours = bench_ours(bench_file, tok, cfg)
        ref = bench_datasets_map(bench_file, tok)
        results["throughput"] = {"rows": ours["rows"], "dpo_ray": ours, "datasets_map": ref,
                                 "ratio_dpo_ray_over_datasets_map": round(
                                     ours["pairs_per_s"] / ref["pairs_per_s"], 2)}
        ttfb = []
        for n in args.sizes:
            f = tmp / f"gen_{n}.jsonl"
            t0 = time.perf_counter()
            write_pairs(f, n)
            gen_s = time.perf_counter() - t0
            r = time_to_first_batch(f, tok, cfg)
            r.update(file_mb=round(f.stat().st_size / 2**20, 1), generate_s=round(gen_s, 1))
            ttfb.append(r)
            f.unlink()
        results["time_to_first_batch"] = ttfb
    ray.shutdown()

    t = results["throughput"]
    print(f"\nthroughput: {t['rows']} pairs (bundled train x{args.repeat}), {results['machine']}")
    print(f"{'pipeline':<28}{'pairs/s':>10}{'wall s':>9}{'first rows s':>14}")
    for name, key in (("dpo_ray (Ray Data)", "dpo_ray"), ("datasets.Dataset.map", "datasets_map")):
        print(f"{name:<28}{t[key]['pairs_per_s']:>10}{t[key]['wall_s']:>9}{t[key]['first_rows_s']:>14}")
    print(f"ratio dpo_ray / datasets.map: {t['ratio_dpo_ray_over_datasets_map']}")
    print(f"\n{'pairs':>10}{'file MB':>9}{'build s':>9}{'first batch s':>15}")
    for r in results["time_to_first_batch"]:
        print(f"{r['rows']:>10}{r['file_mb']:>9}{r['build_s']:>9}{r['first_batch_s']:>15}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
