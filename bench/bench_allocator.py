"""glibc's mmap threshold: what a fixed one costs in step time on short rows and saves in memory on long ones
(dpo_ray/allocator.py, docs/training.md "Memory: freed activations go back to the system").

Each cell runs in its own process with ``MALLOC_MMAP_THRESHOLD_`` set (what ``allocator.return_freed_memory``
does from inside a worker) or unset (glibc's dynamic default), alternated over ``--repeats`` rounds:

- ``speed``: training steps of a Llama of 11M parameters (hidden 256, 4 layers, a 32,000 vocabulary) on
  batches of 4 pairs of ~300-900 tokens through dpo_ray's packed forward, AdamW, 1 thread; the median step
  after two warm-up steps. The shape of the realistic benchmark, whose micro-batches stay under
  ``gradient_checkpointing_gib`` (where dpo_ray leaves glibc's default alone).
- ``memory``: one forward with gradient checkpointing of SmolLM2-135M (scripts/smollm2.py's cache) over one
  pair of ``--length`` tokens, packed by prefix sharing; the process's peak resident memory.

    .venv/bin/python bench/bench_allocator.py [--repeats 2] [--length 4096] [--parts speed,memory]

Writes bench/results/allocator.json and prints both tables with the ratio to glibc's default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SPEED_THRESHOLDS = [None, 1 * MIB, 4 * MIB, 16 * MIB]
MEMORY_THRESHOLDS = [None, 4 * MIB, 8 * MIB]


def _speed(steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_ray.forward import sequence_forward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=2048, tie_word_embeddings=True)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)

    def batch(pairs: int = 4) -> dict:
        prompt = int(torch.randint(60, 400, (1,), generator=gen))
        length = prompt + int(torch.randint(60, 500, (1,), generator=gen))
        ids = torch.randint(3, 31999, (2 * pairs, length), generator=gen)
        ids[pairs:, :prompt] = ids[:pairs, :prompt]
        completion = torch.zeros_like(ids)
        completion[:, prompt:] = 1
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}

    times = []
    for _ in range(steps):
        b = batch()
        t = time.perf_counter()
        sequence_forward(model, b, share_prefix="dense").stats.logps.sum().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"s_per_step": statistics.median(times[2:]), "steps": steps}


def _memory(length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_ray.forward import sequence_forward

    sys.path.insert(0, str(ROOT / "scripts"))
    import smollm2

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(smollm2.ensure(do_check=False), dtype=torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    half = length // 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size - 1, (2, length), generator=gen)
    ids[1, :half] = ids[0, :half]
    completion = torch.zeros_like(ids)
    completion[:, half:] = 1
    t = time.perf_counter()
    sequence_forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                             "completion_mask": completion}, share_prefix="dense")
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "forward_s": time.perf_counter() - t, "length": length}


def _cell(part: str, threshold: int | None, arg: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    r = subprocess.run([sys.executable, __file__, "--child", part, "--arg", str(arg)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{part} at threshold {threshold} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _label(threshold: int | None) -> str:
    return "glibc default (dynamic)" if threshold is None else f"fixed {threshold // MIB} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--parts", default="speed,memory")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "allocator.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--arg", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_speed(args.arg) if args.child == "speed" else _memory(args.arg)))
        return 0
    parts = args.parts.split(",")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "runs": []}
    for rnd in range(args.repeats):
        for part in parts:
            for threshold in SPEED_THRESHOLDS if part == "speed" else MEMORY_THRESHOLDS:
                row = {"part": part, "threshold": threshold, "round": rnd,
                       **_cell(part, threshold, args.steps if part == "speed" else args.length)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for part, key in (("speed", "s_per_step"), ("memory", "peak_mib")):
        if part not in parts:
            continue
        rows = [r for r in results["runs"] if r["part"] == part]
        base = statistics.median(r[key] for r in rows if r["threshold"] is None)
        print(f"\n| {part}: threshold | {key} (median of {args.repeats}) | × default |\n|---|---|---|")
        for threshold in SPEED_THRESHOLDS if part == "speed" else MEMORY_THRESHOLDS:
            value = statistics.median(r[key] for r in rows if r["threshold"] == threshold)
            print(f"| {_label(threshold)} | {value:.3f} | {value / base:.2f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
