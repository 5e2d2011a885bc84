"""Peak memory of one SDPA call under prefix sharing's mask against a causal one, a fresh process per cell (a
diagnostic for bench_long_context.py): SmolLM2's attention shape (9 query heads, 3 key/value heads, head dim
64), fp32, one thread; the mask is a lower triangle of the packed row's length S. Modes:

- ``causal``: ``is_causal=True``, GQA in the kernel, forward + backward;
- ``mask``: the boolean mask, GQA in the kernel, forward + backward;
- ``repeat-bool`` / ``repeat-float``: as transformers calls SDPA with a mask (key/value repeated to 9 heads,
  no ``enable_gqa``), the boolean or an additive float mask, forward only.

    for S in 6144 12288; do for m in causal mask; do
        .venv/bin/python bench/probe_sdpa_mask.py $S $m; done; done
    for m in repeat-bool repeat-float; do .venv/bin/python bench/probe_sdpa_mask.py 6144 $m; done

Prints the peak RSS over the inputs, MiB.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.nn.functional as F


def main() -> int:
    s, mode = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    kv_heads = 9 if mode.startswith("repeat") else 3
    q = torch.randn(1, 9, s, 64, requires_grad=True)
    k = torch.randn(1, kv_heads, s, 64, requires_grad=True)
    v = torch.randn(1, kv_heads, s, 64, requires_grad=True)
    tril = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif mode == "mask":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=tril, enable_gqa=True)
    else:
        mask = tril if mode == "repeat-bool" else torch.zeros(1, 1, s, s).masked_fill(~tril, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not mode.startswith("repeat"):
        out.sum().backward()
    print(s, mode, "peak over the inputs MiB",
          round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
