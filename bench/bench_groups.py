"""Prompt groups (one packed forward per prompt) against the same pairs expanded, in dpo_ray and in TRL.

For each K (responses per prompt) and pair rule (``all``: every pair, K(K-1)/2 per group; ``best_vs_rest``:
K-1 per group) the same group rows are trained three ways, one epoch each, same model, same pairs in the same
micro-batches, same hyper-parameters (sigmoid loss, beta, AdamW lr), the reference run every step:

    groups          dpo_ray on the group rows: each group one [prompt | r1 | ... | rK] row, each response's
                    log-probs computed once and gathered for its pairs (policy and reference)
    pairs           dpo_ray on the expanded pair rows (its default: each pair one [prompt | chosen | rejected]
                    row, prefix sharing)
    trl             TRL's DPOTrainer on the expanded pair rows ([chosen; rejected] rows, padded)

A step is: reference forward + policy forward/backward + AdamW over one micro-batch of G groups (= G × pairs
per group pairs). Data: random digit strings in the bundled tokenizer's vocabulary, prompt ≈ response ≈
``--length`` tokens, scores distinct so every group gives the same number of pairs. Model: a Llama built from
a config (``--hidden``, ``--layers``), saved once so dpo_ray and TRL load the same weights; fp32, sdpa, CPU.

Tokens per epoch: the non-pad positions each way runs through the model per forward (policy and reference
each run them once per step): groups count the packed rows, pairs the packed pair rows, trl the [chosen;
rejected] rows (TRL pads them to the longest; the padded counts are in the JSON). Pairs per CPU-second:
pairs per epoch / the process's CPU time over it (``time.process_time``, all its threads: on a shared, loaded
box the stable measure of the compute each way costs), and pairs/s over wall time; the first ``--warmup``
steps left out of both. The systems alternate within each setting, ``--rounds`` epochs each, medians.

    python bench/bench_groups.py [--groups 12] [--batch 2] [--length 64] [--hidden 256] [--layers 4]
        [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: CPU time counts work, not spinning

from common import machine, median, table, versions, write_result  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "dpo_ray_bench_groups"  # the saved model, TRL's output_dir
# K = 2: the rules agree
SETTINGS = [(2, "all"), (4, "all"), (4, "best_vs_rest"), (8, "all"), (8, "best_vs_rest")]


def make_rows(n: int, k: int, length: int, seed: int) -> list[dict]:
    """``n`` groups of ``k`` responses: prompt and every response about ``length`` digit tokens, distinct
    scores."""
    rng = random.Random(seed)

    def digits(m: int) -> str:
        return " ".join(str(rng.randrange(10)) for _ in range(m))

    rows = []
    for _ in range(n):
        # the bundled tokenizer: one token per digit and its space
        m = max(4, int(rng.gauss(length, length / 8)))
        rows.append({"prompt": f"sort: {digits(m)} =",
                     "completions": [" " + digits(max(2, int(rng.gauss(length, length / 8))))
                                     for _ in range(k)],
                     "scores": rng.sample(range(100), k)})
    return rows


def save_model(path: Path, tok, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def dpo_ray_epoch(path: Path, batches: list[dict], cfg, warmup: int) -> dict:
    """One epoch of dpo_ray's DPO step (the worker's functions, no Ray) over ``batches``."""
    import torch

    from dpo_ray.forward import num_pairs, reference_logps
    from dpo_ray.sharing import PrefixSharing
    from dpo_ray.train.steps import dpo_step

    policy, ref = load(path).train(), load(path).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    sharing = PrefixSharing("on", "reference")
    stamps, cpu, losses = [time.perf_counter()], [time.process_time()], []
    for x in batches:
        ref_c, ref_r = reference_logps(ref, x, sharing=sharing)
        loss, _ = dpo_step(policy, cfg, x, ref_c, ref_r, share_prefix=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    pairs = sum(num_pairs(x) for x in batches[warmup:])
    return {"pairs_s": pairs / (stamps[-1] - stamps[warmup]), "pairs_cpu_s": pairs / (cpu[-1] - cpu[warmup]),
            "epoch_s": stamps[-1] - stamps[0], "losses": losses}


def trl_epoch(path: Path, pair_rows: list[dict], batch: int, cfg, warmup: int, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, *a, **k):
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, *a, **k):
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())

    timer = Timer()
    args = DPOConfig(output_dir=str(workdir), per_device_train_batch_size=batch, num_train_epochs=1,
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], bf16=False,
                     fp16=False, gradient_checkpointing=False, use_cpu=True, disable_tqdm=True,
                     dataloader_drop_last=True, train_sampling_strategy="sequential", warmup_steps=0,
                     learning_rate=cfg.learning_rate, beta=cfg.beta, loss_type=["sigmoid"], max_length=None,
                     lr_scheduler_type="constant", max_grad_norm=0.0)
    trainer = DPOTrainer(model=load(path), ref_model=load(path), args=args,
                         train_dataset=Dataset.from_list(pair_rows),
                         processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer])
    torch.manual_seed(0)
    trainer.train()
    s = timer.stamps
    steps = len(s) - 1
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    c = timer.cpu
    return {"pairs_s": batch * (steps - warmup) / (s[-1] - s[warmup]),
            "pairs_cpu_s": batch * (steps - warmup) / (c[-1] - c[warmup]), "epoch_s": s[-1] - s[0],
            "losses": losses, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=12, help="prompt groups per epoch")
    ap.add_argument("--batch", type=int, default=2, help="groups per micro-batch (pairs: their pairs)")
    ap.add_argument("--length", type=int, default=64, help="mean tokens of the prompt and of each response")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of pairs/s")
    ap.add_argument("--rounds", type=int, default=2, help="epochs per system and setting (median pairs/s)")
    ap.add_argument("--systems", default="groups,pairs,trl")
    ap.add_argument("--settings", default=",".join(f"{k}:{r}" for k, r in SETTINGS), help="K:rule,...")
    ap.add_argument("--name", default="groups")
    args = ap.parse_args()

    import torch

    from dpo_ray import prefix
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import collate_pairs, load_tokenizer, tokenize_rows
    from dpo_ray.data.collate import collate_groups
    from dpo_ray.data.groups import expand_to_pairs

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(None)
    path = save_model(WORK / f"h{args.hidden}_l{args.layers}", tok, args.hidden, args.layers)
    systems = args.systems.split(",")
    results = {}
    for setting in args.settings.split(","):
        k, rule = setting.split(":")
        k = int(k)
        cfg = DPOConfig(max_length=None, learning_rate=1e-4, beta=0.1, group_pairs=rule)
        rows = make_rows(args.groups, k, args.length, seed=k)
        cols = tokenize_rows(rows, tok, cfg)
        per_group = len(cols["pair_chosen"][0])
        pair_rows = expand_to_pairs(rows, rule)
        pcols = tokenize_rows(pair_rows, tok, cfg)
        g, pb = args.batch, args.batch * per_group
        n = args.groups - args.groups % g
        gb = [collate_groups({c: v[i:i + g] for c, v in cols.items()}, tok.pad_token_id)
              for i in range(0, n, g)]
        pp = [collate_pairs({c: v[i:i + pb] for c, v in pcols.items()}, tok.pad_token_id)
              for i in range(0, n * per_group, pb)]
        packed_g = [prefix.pack_groups(x["input_ids"], x["attention_mask"], x["completion_mask"],
                                       x["group_index"])
                    for x in gb]
        packed_p = [prefix.pack_pairs(x["input_ids"], x["attention_mask"], x["completion_mask"]) for x in pp]
        tokens = {"groups": sum(p.tokens for p in packed_g), "pairs": sum(p.tokens for p in packed_p),
                  "trl": sum(int(x["attention_mask"].sum()) for x in pp)}
        padded = {"groups": sum(p.input_ids.numel() for p in packed_g),
                  "pairs": sum(p.input_ids.numel() for p in packed_p),
                  "trl": sum(x["input_ids"].numel() for x in pp)}
        res = {"k": k, "rule": rule, "pairs_per_group": per_group, "num_pairs": n * per_group,
               "steps": len(gb), "tokens": tokens, "padded_tokens": padded}
        for r in range(args.rounds):  # the systems alternate; medians over the rounds
            for system in systems:
                t0 = time.perf_counter()
                if system == "trl":
                    out = trl_epoch(path, pair_rows[:n * per_group], pb, cfg, args.warmup,
                                    WORK / "trl_out")
                else:
                    out = dpo_ray_epoch(path, gb if system == "groups" else pp, cfg, args.warmup)
                res.setdefault(system, {"runs": []})["runs"].append(out)
                print(f"[{r}] K={k} {rule}: {system} {out['pairs_s']:.1f} pairs/s, {out['pairs_cpu_s']:.1f} "
                      f"pairs/cpu-s ({time.perf_counter() - t0:.1f}s)", flush=True)
        if "groups" in systems:  # the same pairs and weights: the loss curves must agree
            base = res["groups"]["runs"][0]["losses"]
            res["max_abs_loss_diff"] = {s: max(abs(a - b) for a, b in zip(base, res[s]["runs"][0]["losses"]))
                                        for s in systems if s != "groups"}
            print(f"K={k} {rule}: max |Δloss| against groups {res['max_abs_loss_diff']}", flush=True)
        for system in systems:
            for key in ("pairs_s", "pairs_cpu_s"):
                res[system][key] = median([o[key] for o in res[system]["runs"]])
        results[f"{k}:{rule}"] = res

    rows_out = []
    for r in results.values():
        t = r["tokens"]
        line = [r["k"], r["rule"], r["pairs_per_group"], t["trl"], t["pairs"], t["groups"],
                t["trl"] / t["groups"], t["pairs"] / t["groups"]]
        for key in ("pairs_cpu_s", "pairs_s"):
            for s in ("groups", "pairs", "trl"):
                line.append(r[s][key] if s in r else "-")
        line += [r["groups"]["pairs_cpu_s"] / r["pairs"]["pairs_cpu_s"] if "pairs" in r and "groups" in r
                 else "-",
                 r["groups"]["pairs_cpu_s"] / r["trl"]["pairs_cpu_s"] if "trl" in r and "groups" in r
                 else "-"]
        rows_out.append(line)
    print(f"\n{args.groups} groups per epoch, medians of {args.rounds} alternating rounds, {args.batch} "
          f"groups per micro-batch, prompt ≈ response ≈ {args.length} tokens, Llama hidden {args.hidden} × "
          f"{args.layers} layers (fp32, sdpa), {args.threads} thread(s); step = reference forward + policy "
          "forward/backward + AdamW")
    print(table(["K", "rule", "pairs/group", "tokens trl", "tokens pairs", "tokens groups", "trl ÷ groups",
                 "pairs ÷ groups", "pairs/cpu-s groups", "pairs/cpu-s pairs", "pairs/cpu-s trl",
                 "pairs/s groups", "pairs/s pairs", "pairs/s trl", "groups × pairs (cpu)",
                 "groups × trl (cpu)"], rows_out))
    path_out = write_result(args.name, {"machine": machine(), "versions": versions(), "args": vars(args),
                                        "results": results})
    print(f"wrote {path_out}")


if __name__ == "__main__":
    main()
