"""Where a policy step's memory goes, stage by stage, in one process (a diagnostic for bench_long_context.py).

One pair of L tokens (the prompt half of it), the policy only (no optimizer, no reference), fp32, peak RSS
after: the first-batch prefix-sharing check, the forward, the backward. ``--tiny``: a tiny Llama instead of
SmolLM2, with ``--layout off|dense`` (the standard layout, or packed pairs under the dense 4-D mask).

    .venv/bin/python bench/probe_memory_stages.py --length 2048 --gc            # SmolLM2 (scripts/smollm2.py)
    .venv/bin/python bench/probe_memory_stages.py --tiny --length 4096 --layout dense
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def peak_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny Llama (8 layers, hidden 64) instead of SmolLM2")
    ap.add_argument("--layout", choices=["auto", "off", "dense"], default="auto",
                    help="auto: prefix sharing's own first-batch decision; off / dense: forced")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from dpo_ray.forward import sequence_forward
    from dpo_ray.sharing import PrefixSharing

    torch.set_num_threads(2)
    if args.tiny:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=8, num_attention_heads=8,
                                             num_key_value_heads=2, max_position_embeddings=4 * args.length))
    else:
        import smollm2

        model = AutoModelForCausalLM.from_pretrained(smollm2.ensure(do_check=False), dtype=torch.float32)
    model.train()
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    print(f"model loaded: {peak_mib()} MiB", flush=True)
    half, vocab = args.length // 2, model.config.vocab_size
    ids = torch.randint(3, vocab - 1, (2, args.length))
    ids[1, :half] = ids[0, :half]
    completion = torch.zeros(2, args.length, dtype=torch.long)
    completion[:, half:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    layout: bool | str = False if args.layout == "off" else "dense"
    if args.layout == "auto":
        sharing = PrefixSharing("auto", "policy", "auto")
        sharing(model, batch, lean=True)
        layout = sharing.layout
        print(f"after the prefix-sharing check ({layout or 'standard'}): {peak_mib()} MiB", flush=True)
    out = sequence_forward(model, batch, share_prefix=layout)
    print(f"after the forward: {peak_mib()} MiB", flush=True)
    out.stats.logps.sum().backward()
    print(f"after the backward: {peak_mib()} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
