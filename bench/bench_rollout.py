"""Sampling throughput of ``dpo-ray iterate``'s rollout pool against one process, side by side in one run.

The same prompts (the bundled task's, ``--prompts`` of them), ``--samples`` answers each,
``--max_new_tokens``, temperature 1, the same seeds, the same model (``--model``, default the bundled tiny
Llama with random weights, so every answer runs to ``max_new_tokens`` and the work is the same in every
configuration):

- ``single``: ``HFGenerateEngine`` in this process, torch threads = the machine's cores;
- ``pool 1×C``: one rollout actor with all the cores;
- ``pool N×1``: N actors (one per core) with one thread each.

Alternated ``--repeats`` times; responses/s (median) and the ratio to ``single``; the answers of every
configuration are checked equal (the seeds make them so).

    .venv/bin/python bench/bench_rollout.py [--prompts 256 --samples 4 --max_new_tokens 16 --repeats 2]

Writes bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, versions, write_result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray
    import torch

    from dpo_ray import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.data.bundled import TRAIN_FILE
    from dpo_ray.iterate.engine import HFGenerateEngine, Prompt, SamplingParams
    from dpo_ray.iterate.loop import PromptEncoder, prompts_of, read_rows
    from dpo_ray.iterate.pools import RolloutPool
    from dpo_ray.models import load_causal_lm

    cores = os.cpu_count() or 1
    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix="bench_rollout_")
        cfg = DPOConfig(output_dir=model)
        tok = load_tokenizer(cfg)
        torch.manual_seed(0)
        load_causal_lm(None, cfg, tok).save_pretrained(model)
        tok.save_pretrained(model)
    tok = load_tokenizer(model)
    enc = PromptEncoder(tok)
    texts = prompts_of(read_rows(str(TRAIN_FILE)), "bundled")[:args.prompts]
    prompts = [Prompt(enc(p), 1000 + i) for i, p in enumerate(texts)]
    params = SamplingParams(args.samples, 1.0, 1.0, args.max_new_tokens)
    n = len(prompts) * args.samples

    ray.init(address="local", num_cpus=max(8, 2 * cores), include_dashboard=False, log_to_driver=False)
    from transformers import AutoModelForCausalLM

    def single():
        torch.set_num_threads(cores)
        engine = HFGenerateEngine(AutoModelForCausalLM.from_pretrained(model), tok)
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        return out, time.perf_counter() - t0

    def pool(actors: int, cpus: float):
        def run():
            p = RolloutPool(model, actors, cpus, 0, max_restarts=0)
            ray.get([a.node.remote() for a in p.actors])  # loaded: time the sampling, not the start
            t0 = time.perf_counter()
            out = p.sample(prompts, params)
            p.shutdown()
            return out, time.perf_counter() - t0
        return run

    configs = {"single": single, f"pool 1×{cores}": pool(1, cores), f"pool {cores}×1": pool(cores, 1)}
    rates: dict[str, list[float]] = {k: [] for k in configs}
    answers = {}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            out, secs = fn()
            rates[name].append(n / secs)
            answers.setdefault(name, out)
            print(f"{name}: {n / secs:.1f} responses/s", flush=True)
    ray.shutdown()
    same = all(a == answers["single"] for a in answers.values())
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows = [[k, round(med[k], 1), round(med[k] / med["single"], 2), ", ".join(f"{x:.1f}" for x in rates[k])]
            for k in configs]
    print(table(["configuration", "responses/s (median)", "× single", "per repeat"], rows))
    print(f"answers equal across configurations: {same}")
    write_result("rollout", {"machine": machine(), "versions": versions(), "args": vars(args), "responses": n,
                             "rates": rates, "median": med, "answers_equal": same})
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
