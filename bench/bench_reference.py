"""Does the reference actor pool hide the reference forward behind the policy step?

One run measures, on the tiny Llama (``dpo_ray.models.load_causal_lm(None, ...)``), per training step
of 2B sequences:
  policy      forward + backward + AdamW (reference log-probs given)
  reference   the reference forward alone, in-process
  sequential  reference forward, then the policy step, in one process (what LocalReference does)
  pipelined   the policy step fed by the actor pool with prefetch depth 2 (reference.source: actor)
in interleaved rounds (the best round's median per row, so a burst of other load does not decide),
and prints pipelined / max(policy, reference) (goal <= 1.15) and sequential / pipelined.

The policy process and the reference actor get one intra-op thread each, so on a 2-core CPU they run
side by side; the "alone" rows use the same one thread.

    python bench/bench_reference.py [--pairs 8] [--seq_len 128] [--steps 12] [--rounds 3] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from dpo_ray.config import DPOConfig  # noqa: E402
from dpo_ray.forward import reference_logps  # noqa: E402
from dpo_ray.models import load_causal_lm, prepare_policy, shippable  # noqa: E402
from dpo_ray.reference import prefetched  # noqa: E402
from dpo_ray.reference.client import ActorPoolReference  # noqa: E402
from dpo_ray.reference.pool import ReferencePool  # noqa: E402
from dpo_ray.train.steps import dpo_step  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "reference.json"


class VocabOnlyTokenizer:
    """Stand-in when dpo_ray.data.load_tokenizer is not available: what tiny_llama_config reads."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 1000


def tokenizer():
    try:
        from dpo_ray.data import load_tokenizer
    except ImportError:
        return VocabOnlyTokenizer()
    return load_tokenizer(DPOConfig())


def make_batches(n: int, pairs: int, seq_len: int, vocab: int,
                 seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Full-length pairs: prompt = first quarter, completion = the rest (the worst case per token)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(3, vocab, (2 * pairs, seq_len), generator=g)
        ids[pairs:, : seq_len // 4] = ids[:pairs, : seq_len // 4]
        completion = torch.zeros_like(ids)
        completion[:, seq_len // 4:] = 1
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
                    "row_id": torch.arange(k * pairs, (k + 1) * pairs)})
    return out


def per_step(fn: Callable[[], None], steps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (2B sequences)")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median is reported")
    ap.add_argument("--depth", type=int, default=2, help="reference.prefetch_depth")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    torch.set_num_threads(1)
    tok = tokenizer()
    cfg = DPOConfig(learning_rate=1e-5, per_device_train_batch_size=args.pairs,
                    reference={"num_actors": 1, "num_cpus": 1, "prefetch_depth": args.depth})
    policy = prepare_policy(load_causal_lm(None, cfg, tok), cfg).train()
    reference = load_causal_lm(None, cfg, tok).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    vocab = policy.config.vocab_size
    batches = make_batches(args.steps + 2, args.pairs, args.seq_len, vocab)
    zeros = torch.zeros(args.pairs)

    def policy_step(batch, ref_c, ref_r) -> None:
        loss, _ = dpo_step(policy, cfg, batch, ref_c, ref_r)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cyc = {"i": 0}

    def next_batch():
        cyc["i"] = (cyc["i"] + 1) % len(batches)
        return batches[cyc["i"]]

    def sequential() -> None:
        b = next_batch()
        policy_step(b, *reference_logps(reference, b))

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # never joins another
    try:
        pool = ReferencePool.create(cfg, ray.put(shippable(reference)), tok, ready_timeout_s=300)
        client = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=300)

        def pipelined() -> float:
            n_warm = 2
            stream = prefetched((batches[i % len(batches)] for i in range(n_warm + args.steps)), client,
                                args.depth)
            times, t0 = [], time.perf_counter()
            for i, (batch, ref_c, ref_r) in enumerate(stream):
                policy_step(batch, ref_c, ref_r)
                now = time.perf_counter()
                if i >= n_warm:
                    times.append(now - t0)
                t0 = now
            return statistics.median(times)

        # Rounds interleave the four configurations; the best round's median filters out bursts of
        # other load on a shared machine (Ray's own daemons run throughout, for every row alike).
        rounds: dict[str, list[float]] = {"policy": [], "reference": [], "sequential": [], "pipelined": []}
        for _ in range(args.rounds):
            rounds["policy"].append(per_step(lambda: policy_step(next_batch(), zeros, zeros), args.steps))
            rounds["reference"].append(per_step(lambda: reference_logps(reference, next_batch()), args.steps))
            rounds["sequential"].append(per_step(sequential, args.steps))
            rounds["pipelined"].append(pipelined())
        pool.shutdown()
    finally:
        ray.shutdown()
    t_policy, t_ref, t_seq, t_pipe = (min(rounds[k])
                                      for k in ("policy", "reference", "sequential", "pipelined"))

    ratio_pipe = t_pipe / max(t_policy, t_ref)
    ratio_seq = t_seq / t_pipe
    rows = [("policy step (fwd+bwd+AdamW)", t_policy), ("reference forward", t_ref),
            ("sequential (ref then policy)", t_seq), (f"pipelined (actor pool, depth {args.depth})", t_pipe)]
    print(f"\ntiny Llama, {args.pairs} pairs × {args.seq_len} tokens ({2 * args.pairs} sequences), "
          f"best of {args.rounds} rounds of the median of {args.steps} steps, 1 thread per process, "
          f"{os.cpu_count()}-core CPU")
    print(f"{'configuration':<36} {'s/step':>8}")
    for name, t in rows:
        print(f"{name:<36} {t:8.3f}")
    print(f"pipelined / max(policy, reference) = {ratio_pipe:.3f}  (goal <= 1.15)")
    print(f"sequential / pipelined             = {ratio_seq:.3f}")
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}",
        "torch": torch.__version__, "ray": ray.__version__, "pairs": args.pairs, "seq_len": args.seq_len,
        "steps": args.steps, "rounds": rounds, "prefetch_depth": args.depth,
        "params": sum(p.numel() for p in policy.parameters()),
        "seconds_per_step": {"policy": t_policy, "reference": t_ref, "sequential": t_seq,
                             "pipelined": t_pipe},
        "pipelined_over_max": ratio_pipe, "sequential_over_pipelined": ratio_seq,
        "goal_pipelined_over_max": 1.15,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
