"""The GPU variant of bench_throughput (and, through its actor-vs-local rows, the reference overlap) on a
0.5B-class model with random weights: a Qwen2-0.5B-shaped ``Qwen2Config`` (24 layers, hidden 896, 14
heads / 2 KV heads, vocabulary 151,936, tied embeddings) built from the config, nothing downloaded.

Data: generated pairs of the bundled task with long digit lists (``--min_tokens``..``--max_tokens``
tokens per sequence), bundled tokenizer (the model's larger vocabulary is kept: the LM head's cost is
the realistic part). Configurations, alternated ``--repeats`` times, bf16, one GPU each:

  dpo_ray_1w   1 worker, reference actor pool on the same GPU (reference.num_gpus 0.5)
  dpo_ray_1w_local  1 worker, reference as a frozen copy on the worker (no overlap): actor / local
               is the reference-overlap gain on GPU; with and without prefix sharing (+noshare)
  trl          TRL DPOTrainer, bf16, in-process reference

Without CUDA it prints why it is skipped, writes bench/results/gpu.json saying so, and exits 0.

    python bench/bench_gpu.py [--pairs 2048] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, machine, versions, write_result  # noqa: E402

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936)


def save_qwen_like(out: Path, shape: dict | None = None) -> Path:
    """A Qwen2 model with random weights (seed 0) of ``shape`` (default Qwen2-0.5B's; the vocabulary defaults
    to the bundled tokenizer's) and the bundled tokenizer, saved once."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dpo_ray.data import load_tokenizer

    tok = load_tokenizer(None)
    shape = {"vocab_size": len(tok), **(QWEN2_05B if shape is None else shape)}
    cfg = Qwen2Config(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def long_pairs(out: Path, n: int, min_tokens: int, max_tokens: int, seed: int = 0,
               skew: float | None = None) -> Path:
    """Bundled-task pairs with long digit lists (one token per digit in the bundled tokenizer); the prompt
    holds about half of each sequence. Lengths uniform in [min_tokens, max_tokens], or with ``skew`` k skewed
    like real preference data: min + (max - min)·u^k, u uniform (k = 3: the median pair an eighth of the way
    up)."""
    from dpo_ray.data.bundled import apply_op

    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for _ in range(n):
            if skew is None:
                k = rng.randint(min_tokens // 2, max_tokens // 2 - 4)
            else:
                k = max(2, int(min_tokens + (max_tokens - min_tokens) * rng.random() ** skew) // 2 - 4)
            # digits in the prompt's list; the answer repeats them
            items = [str(rng.randrange(10)) for _ in range(k)]
            op = rng.choice(("sort", "reverse"))
            answer = apply_op(op, items)
            wrong = list(answer)
            i = rng.randrange(len(wrong))
            wrong[i] = str((int(wrong[i]) + 1) % 10)
            f.write(json.dumps({"prompt": f"{op}: {' '.join(items)} =", "chosen": " " + " ".join(answer),
                                "rejected": " " + " ".join(wrong)}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min_tokens", type=int, default=128)
    ap.add_argument("--max_tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/gpu")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        msg = ("bench_gpu: skipped, no CUDA device (torch.cuda.is_available() is False); run it on a GPU "
               "machine")
        print(msg)
        write_result("gpu", {"skipped": msg, "machine": machine(), "versions": versions()})
        return
    work = Path(args.workdir)
    model = save_qwen_like(work / "qwen2_0.5b_random")
    data = long_pairs(work / "data" / "train.jsonl", args.pairs, args.min_tokens, args.max_tokens)
    base = [sys.executable, str(BENCH / "bench_throughput.py"), "--gpu", "--model_dir", str(model),
            "--data_file", str(data), "--pairs", str(args.pairs), "--batch", str(args.batch), "--lr",
            str(args.lr), "--max_length", str(args.max_tokens + 8), "--repeats", str(args.repeats)]
    # dpo_ray with the actor pool sharing the worker's GPU, then with a local reference, then TRL
    subprocess.run(base + ["--configs", "dpo_ray_1w2t,trl", "--name", "gpu_throughput", "--workdir",
                           str(work / "actor"),
                           # the worker and the actor share one GPU: half each (a whole GPU each needs 2)
                           "--dpo_ray_extra",
                           json.dumps({"reference": {"source": "actor", "num_gpus": 0.5},
                                       "ray": {"resources_per_worker": {"CPU": 1, "GPU": 0.5}}})],
                   check=True)
    # local reference with and without prefix sharing: the sharing gain on GPU (bf16, sdpa)
    subprocess.run(base + ["--configs", "dpo_ray_1w2t+noshare,dpo_ray_1w2t", "--name",
                           "gpu_throughput_local_ref", "--workdir", str(work / "local"),
                           "--dpo_ray_extra", json.dumps({"reference": {"source": "local"}})],
                   check=True)


if __name__ == "__main__":
    main()
