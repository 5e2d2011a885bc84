"""AdamW step time: torch's default (single-tensor on CPU), foreach, and fused (what dpo_ray's workers use).

Parameters of the tiny Llama (the bundled default) and of a larger Llama (hidden 256 × 4 layers,
vocabulary 8,192, as in bench_prefix.py), random gradients, ``--steps`` steps after a warm-up, the three
implementations alternated ``--rounds`` times (medians).

    python bench/bench_optimizer.py [--steps 200] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, table, versions, write_result  # noqa: E402

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(params, kwargs: dict, steps: int) -> float:
    import torch

    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kwargs)
    for _ in range(5):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="optimizer")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.models import load_causal_lm

    torch.set_num_threads(args.threads)
    models = {
        "tiny Llama (bundled default)": load_causal_lm(None, DPOConfig(), load_tokenizer(None)),
        "Llama 256 × 4, vocab 8192": AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=682, num_hidden_layers=4,
            num_attention_heads=4)),
    }
    results, rows = {}, []
    for name, model in models.items():
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        times: dict[str, list[float]] = {k: [] for k in IMPLEMENTATIONS}
        for _ in range(args.rounds):
            for impl, kwargs in IMPLEMENTATIONS.items():
                times[impl].append(step_ms(params, kwargs, args.steps))
        med = {k: median(v) for k, v in times.items()}
        results[name] = {"params": sum(p.numel() for p in params), "ms": med, "times": times}
        rows.append([name, results[name]["params"], med["default"], med["foreach"], med["fused"],
                     med["default"] / med["fused"]])
    print(f"\nAdamW step, {args.steps} steps × {args.rounds} alternating rounds (medians), {args.threads} "
          "thread(s)")
    print(table(["parameters of", "count", "default ms", "foreach ms", "fused ms", "default / fused"], rows))
    path = write_result(args.name, {"machine": machine(), "versions": versions(), "args": vars(args),
                                    "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
