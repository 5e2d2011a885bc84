"""Block-sparse attention for packed pairs (prefix sharing) through FlexAttention.

``prefix.pack_pairs`` describes a packed row by its branches (0 shared prompt, 1 chosen, 2 rejected, 3
padding). The dense path hands the model a (B, 1, S, S) boolean mask; SDPA then cannot use its flash
kernels and computes every masked block. Here the same rule becomes a FlexAttention ``BlockMask``: blocks
of 128×128 that the rule hides entirely (the causal upper triangle, rejected queries against chosen keys,
padding) are skipped, the partly visible ones are masked inside a fused kernel, and no S×S tensor is
handed to the attention.

The first flex forward switches the model's attention (``enable(model)``): its configuration's
``_attn_implementation`` names ``NAME``, a function registered in transformers' ``AttentionInterface``
that runs ``flex_attention`` for a ``BlockMask`` (compiled on CUDA, where the eager form would materialise
the scores; eager on the CPU, where it is the reference the tests compare with) and SDPA for any other
mask, so the standard layout and the dense packed path run as before. Transformers passes a 4-D
``BlockMask`` handed in as ``attention_mask`` through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NAME = "dpo_ray_flex"
BLOCK = 128  # FlexAttention's default block size; packed widths are rounded up to it on the GPU

_registered = False
_compiled = None


def available() -> tuple[bool, str]:
    """(can the packed forward use FlexAttention here, why not)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        from transformers import AttentionInterface  # noqa: F401
    except ImportError as e:
        return False, f"FlexAttention unavailable (torch {torch.__version__}: {e})"
    return True, ""


def backward_on(device: torch.device) -> tuple[bool, str]:
    """(does FlexAttention differentiate on this device, why not): torch 2.13 has no CPU backward."""
    if device.type == "cpu":
        return False, (f"FlexAttention has no backward on the CPU (torch {torch.__version__}): the policy's "
                       "packed pairs keep the dense mask")
    return True, ""


def _flex(query: Tensor):
    from torch.nn.attention.flex_attention import flex_attention

    if not query.is_cuda:
        return _eager
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention)  # shapes vary per batch: torch.compile's automatic dynamic
    return _compiled


def _eager(*args, **kwargs):
    """FlexAttention's eager form (the CPU: the reference the tests compare with), without its
    once-per-process advice to compile it."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*torch.compile\\(flex_attention\\).*")
        return flex_attention(*args, **kwargs)


def flex_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                           scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: (B, H, S, D) in, (B, S, H, D) out. A BlockMask (a packed
    forward) runs FlexAttention; any other mask (the standard layout, the dense packed path, a recomputation
    under gradient checkpointing of either) runs SDPA as before."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError(f"{NAME} has no attention dropout (attention_dropout {dropout}); use "
                         "prefix_attention: dense")
    gqa = query.shape[1] != key.shape[1]
    out = _flex(query)(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """The masks transformers builds for the standard layout: SDPA's (what the non-BlockMask path runs)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(NAME, flex_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)
        _registered = True


def enable(model: nn.Module) -> None:
    """Route ``model``'s attention through ``NAME`` from now on (idempotent): BlockMask inputs take
    FlexAttention, everything else SDPA (an ``eager`` model's arithmetic, through SDPA's kernels). Set
    for good rather than around one forward, so a gradient-checkpointing recomputation in backward still finds
    it."""
    register()
    if model.config._attn_implementation != NAME:
        model.config._attn_implementation = NAME  # not saved with the model (transformers drops it)


def block_mask(branch: Tensor):
    """The BlockMask of packed rows with these branches (B, S): a query sees causally earlier keys of the
    shared prefix and of its own branch; padding sees only itself (no all-masked row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = branch.shape

    def rule(bi, h, q, k):
        bq, bk = branch[bi, q], branch[bi, k]
        return ((q >= k) & (bq < 3) & (bk < 3) & ((bk == 0) | (bk == bq))) | (q == k)

    return create_block_mask(rule, B=b, H=None, Q_LEN=s, KV_LEN=s, device=branch.device)
