"""Padding fraction and policy step time with and without length bucketing, on a skewed length mix.

Tokenized pairs with log-normal lengths (most short, a long tail up to ``--max_len``: the mix of real
preference data) go through a local Ray Dataset and ``dpo_ray.data.iter_train_batches`` with
``length_bucketing`` off and on. For each setting: the padding fraction of one epoch of batches, and
the time of one epoch of policy steps (``dpo_step`` forward + backward + AdamW, tiny Llama, reference
log-probs given) over those batches, alternated off/on ``--rounds`` times (medians).

    python bench/bench_padding.py [--pairs 512] [--batch 8] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine, median, table, versions, write_result  # noqa: E402


def skewed_rows(n: int, vocab: int, max_len: int, seed: int) -> list[dict]:
    """Pairs whose sequence lengths follow a log-normal (median ~48 tokens, p99 ~ max_len)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = int(np.clip(rng.lognormal(3.0, 0.6), 2, max_len // 2))
        comp = [int(np.clip(rng.lognormal(3.0, 0.9), 1, max_len - prompt)) for _ in range(2)]
        p_ids = rng.integers(3, vocab, prompt).tolist()
        rows.append({"row_id": i,
                     "chosen_input_ids": p_ids + rng.integers(3, vocab, comp[0]).tolist(),
                     "chosen_prompt_len": prompt,
                     "rejected_input_ids": p_ids + rng.integers(3, vocab, comp[1]).tolist(),
                     "rejected_prompt_len": prompt})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="padding")
    args = ap.parse_args()

    import ray
    import torch

    from dpo_ray.config import DPOConfig
    from dpo_ray.data import iter_train_batches, load_tokenizer
    from dpo_ray.models import load_causal_lm, prepare_policy
    from dpo_ray.train.steps import dpo_step

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(None)
    base = DPOConfig(max_length=args.max_len, per_device_train_batch_size=args.batch, learning_rate=1e-4)
    model = load_causal_lm(None, base, tok)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rows = skewed_rows(args.pairs, len(tok), args.max_len, seed=0)

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # never joins another
    try:
        ds = ray.data.from_items(rows).materialize()
        settings = {"off": False, "on": True}
        batches, stats = {}, {}
        for name, bucketing in settings.items():
            cfg = base.model_copy(update={"length_bucketing": bucketing})
            t0 = time.perf_counter()
            it = iter_train_batches(ds, cfg, tok.pad_token_id, batch_size=args.batch, epoch=0, seed=42)
            batches[name] = list(it)
            stats[name] = {"padding_fraction": it.padding_fraction, "batches": len(batches[name]),
                           "data_s": time.perf_counter() - t0,
                           "padded_tokens": sum(b["input_ids"].numel() for b in batches[name]),
                           "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches[name])}
    finally:
        ray.shutdown()

    def epoch_time(name: str) -> float:
        model.load_state_dict(init)
        policy = prepare_policy(model, base).train()
        opt = torch.optim.AdamW(policy.parameters(), lr=base.learning_rate)
        zeros = torch.zeros(args.batch)
        t0 = time.perf_counter()
        for b in batches[name]:
            loss, _ = dpo_step(policy, base, b, zeros, zeros)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in settings}
    for r in range(args.rounds):
        for name in settings:
            times[name].append(epoch_time(name))
            print(f"[{r}] bucketing {name}: epoch {times[name][-1]:.2f}s", flush=True)
    rows_out = []
    for name in settings:
        s = stats[name]
        s["epoch_s"] = median(times[name])
        s["step_s"] = s["epoch_s"] / s["batches"]
        rows_out.append([f"length_bucketing {name}", s["padding_fraction"], s["padded_tokens"], s["step_s"],
                         s["epoch_s"], stats["off"]["epoch_s"] / s["epoch_s"] if "epoch_s" in stats["off"]
                         else 1.0])
    print(f"\n{args.pairs} pairs, log-normal lengths ≤ {args.max_len}, batch {args.batch}, {args.threads} "
          f"thread(s), medians of {args.rounds} alternating rounds")
    print(table(["setting", "padding fraction", "tokens incl. pad", "s/step", "s/epoch", "speed-up"],
                rows_out))
    path = write_result(args.name, {"machine": machine(), "versions": versions(), "args": vars(args),
                                    "stats": stats, "epoch_times": times})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
