"""Prefix sharing against the standard [chosen; rejected] layout: tokens and DPO step time.

One DPO step = reference forward (no grad) + policy forward + backward + AdamW, both layouts on the
same batches and weights, alternated ``--rounds`` times (medians), for several prompt/completion
length mixes (random token ids; lengths drawn around the given means):

    short prompt    prompt ~32,  completions ~128   (single-turn instructions)
    balanced        prompt ~128, completions ~128
    long prompt     prompt ~512, completions ~128   (multi-turn chat, RAG context)
    bundled         the bundled sort/reverse task (prompt about half of each sequence)

The model is a small Llama built from a config (``--hidden``, ``--layers``; random weights, fp32,
sdpa attention). Before timing, each mix checks that the two layouts give the same log-probs.

    python bench/bench_prefix.py [--pairs 64] [--batch 8] [--hidden 256] [--layers 4] [--rounds 3]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine, median, table, versions, write_result  # noqa: E402

MIXES = {"short prompt": (32, 128), "balanced": (128, 128), "long prompt": (512, 128)}


def synthetic_columns(n: int, vocab: int, prompt_mean: int, comp_mean: int, seed: int) -> dict[str, list]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def around(mean: int) -> int:
        return max(1, int(rng.normal(mean, mean / 4)))

    cols: dict[str, list] = {k: [] for k in ("chosen_input_ids", "rejected_input_ids", "chosen_prompt_len",
                                             "rejected_prompt_len", "row_id")}
    for i in range(n):
        p = around(prompt_mean)
        prompt = rng.integers(3, vocab, p).tolist()
        for side in ("chosen", "rejected"):
            cols[f"{side}_input_ids"].append(prompt + rng.integers(3, vocab, around(comp_mean)).tolist())
            cols[f"{side}_prompt_len"].append(p)
        cols["row_id"].append(i)
    return cols


def bundled_columns(n: int, tok, cfg) -> dict[str, list]:
    from dpo_ray.data import tokenize_rows
    from dpo_ray.data.bundled import DATA_DIR

    with open(DATA_DIR / "train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return tokenize_rows(rows, tok, cfg)


def epoch(policy, ref, init: dict, batches: list[dict], cfg, share: bool) -> float:
    """Seconds for one pass of DPO steps over ``batches`` from the weights ``init``."""
    import torch

    from dpo_ray.forward import reference_logps
    from dpo_ray.sharing import PrefixSharing
    from dpo_ray.train.steps import dpo_step

    policy.load_state_dict(init)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    sharing = PrefixSharing("on" if share else "off", "reference")
    t0 = time.perf_counter()
    for x in batches:
        ref_c, ref_r = reference_logps(ref, x, sharing=sharing)
        loss, _ = dpo_step(policy, cfg, x, ref_c, ref_r, share_prefix=share)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="pairs per mix (an epoch)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="prefix")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpo_ray import prefix
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import collate_pairs, load_tokenizer
    from dpo_ray.forward import sequence_forward
    from dpo_ray.models import load_causal_lm

    torch.set_num_threads(args.threads)
    cfg = DPOConfig(max_length=None, learning_rate=1e-4)
    tok = load_tokenizer(None)

    def llama(vocab: int):
        torch.manual_seed(0)
        conf = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                           num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                           max_position_embeddings=2048, attn_implementation="sdpa")
        return AutoModelForCausalLM.from_config(conf, dtype=torch.float32)

    mixes: dict[str, tuple[list[dict], object]] = {}
    for i, (name, (p, c)) in enumerate(MIXES.items()):
        cols = synthetic_columns(args.pairs, args.vocab, p, c, seed=i)
        mixes[name] = (cols, lambda: llama(args.vocab))
    mixes["bundled"] = (bundled_columns(args.pairs, tok, cfg), lambda: load_causal_lm(None, cfg, tok))

    results = {}
    for name, (cols, make_model) in mixes.items():
        batches = [collate_pairs({k: v[i:i + args.batch] for k, v in cols.items()}, 0)
                   for i in range(0, args.pairs - args.pairs % args.batch, args.batch)]
        policy, ref = make_model().train(), make_model().eval()
        init = {k: v.clone() for k, v in policy.state_dict().items()}
        with torch.no_grad():  # the two layouts agree before anything is timed
            a = sequence_forward(ref, batches[0]).stats.logps
            b = sequence_forward(ref, batches[0], share_prefix=True).stats.logps
        max_diff = float((a - b).abs().max())
        packed = [prefix.pack_pairs(x["input_ids"], x["attention_mask"], x["completion_mask"])
                  for x in batches]
        tokens = {"standard": sum(int(x["attention_mask"].sum()) for x in batches),
                  "shared": sum(pk.tokens for pk in packed)}
        padded = {"standard": sum(x["input_ids"].numel() for x in batches),
                  "shared": sum(pk.input_ids.numel() for pk in packed)}

        epoch(policy, ref, init, batches, cfg, False)  # warm-up (allocator, kernels)
        times: dict[str, list[float]] = {"standard": [], "shared": []}
        for r in range(args.rounds):
            for layout in times:
                times[layout].append(epoch(policy, ref, init, batches, cfg, layout == "shared"))
                print(f"[{r}] {name} {layout}: {times[layout][-1]:.2f}s", flush=True)
        t_std, t_sh = median(times["standard"]), median(times["shared"])
        results[name] = {"tokens": tokens, "padded_tokens": padded,
                         "epoch_s": {"standard": t_std, "shared": t_sh}, "times": times,
                         "speedup": t_std / t_sh, "max_abs_logp_diff": max_diff, "steps": len(batches)}

    rows = []
    for name, r in results.items():
        rows.append([name, r["tokens"]["standard"], r["tokens"]["shared"],
                     r["tokens"]["shared"] / r["tokens"]["standard"],
                     r["padded_tokens"]["shared"] / r["padded_tokens"]["standard"],
                     r["epoch_s"]["standard"] / r["steps"], r["epoch_s"]["shared"] / r["steps"], r["speedup"],
                     r["max_abs_logp_diff"]])
    print(f"\n{args.pairs} pairs per mix, batch {args.batch}, Llama hidden {args.hidden} × {args.layers} "
          f"layers (bundled: the tiny Llama), {args.threads} thread(s), medians of {args.rounds} alternating "
          "rounds; step = reference forward + policy forward/backward + AdamW")
    print(table(["mix", "tokens standard", "tokens shared", "token ratio", "padded ratio", "s/step standard",
                 "s/step shared", "speed-up", "max |Δlogp|"], rows))
    path = write_result(args.name, {"machine": machine(), "versions": versions(), "args": vars(args),
                                    "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
