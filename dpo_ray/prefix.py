"""Prefix sharing: one row per pair, [prompt, chosen, rejected], so the prompt is run once, not twice.

A DPO batch is (2B, T): rows [0, B) chosen and [B, 2B) rejected, each prompt + completion, right
padded (docs/CONTRACTS.md). Both rows of a pair start with the same prompt tokens, so the standard
forward runs every prompt twice. ``pack_pairs`` rewrites the batch as (B, S) rows

    [shared prefix (L) | rest of chosen | rest of rejected | pad]

with position ids that restart at L for the rejected part and a 4-D attention mask under which
rejected tokens see the prefix and themselves but never the chosen part. Every hidden state then
equals the one the standard layout computes, and ``score_index`` says where, in the packed
(B·S) positions, the state that scores each completion token of the standard layout sits (in the
order of ``completion_mask[:, 1:].nonzero()``), so the log-prob reduction is unchanged.

The prefix is the longest common token prefix of the two rows, cut at the first completion token
of either row: completion tokens are never shared, only the prompt (after tokenization a prompt can
end differently in the two rows when its last token merges with the completion's first).

Saving: the policy and the reference each run L fewer tokens per pair, and chosen and rejected are
padded together instead of each to the longest row. Attention is still dense over the packed row
(the mask hides, it does not skip), which is cheap next to the MLPs at the lengths DPO trains on.
Works with attention implementations that take a custom 4-D mask: ``sdpa`` (boolean) and
``eager`` (additive float). Flash-attention kernels take no such mask, and a custom mask would replace
a sliding window (Mistral, Gemma's local layers); ``supports`` says no there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MASK_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class PackedPairs:
    input_ids: Tensor  # (B, S)
    position_ids: Tensor  # (B, S)
    keep: Tensor | None  # (B, 1, S, S) bool: query may attend to key (None: pack_pairs(dense=False))
    score_index: Tensor  # (M,) flat index into (B·S) positions, one per standard completion token
    lengths: Tensor  # (B,) non-pad tokens of each packed row
    # (B, S) 0 shared prefix, 1 chosen, 2 rejected, 3 padding (dpo_ray.flex's mask)
    branch: Tensor | None = None

    @property
    def tokens(self) -> int:
        """Non-pad tokens in the packed rows (the standard layout has Σ attention_mask); a host sync."""
        return int(self.lengths.sum())


def attn_implementation(model: nn.Module) -> str | None:
    """The model's attention implementation (``sdpa`` once dpo_ray.flex routes it: SDPA runs every
    non-BlockMask mask there)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    return "sdpa" if impl == "dpo_ray_flex" else impl


def _sliding(config) -> bool:
    """Does any layer attend through a sliding window (which a single custom mask would override)?"""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def supports(model: nn.Module) -> tuple[bool, str]:
    """(can this model take a packed pair batch, why not)."""
    impl = attn_implementation(model)
    if impl not in MASK_IMPLEMENTATIONS:
        return False, (f"attn_implementation {impl!r} takes no custom 4-D mask (needs one of "
                       f"{MASK_IMPLEMENTATIONS})")
    if _sliding(model.config):
        return False, "sliding-window attention: a custom 4-D mask would replace the window"
    base = _unwrapped(model)
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return False, (f"{type(base).__name__}.forward takes no position_ids (positions from the mask, e.g. "
                       "ALiBi)")
    return True, ""


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper: ``PeftModel.forward`` takes ``**kwargs`` and passes
    ``position_ids`` through to it, so the base model's signature is the one that decides."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def pack_pairs(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, pad_id: int = 0,
               dense: bool = True, width_multiple: int = 1, width: int | None = None) -> PackedPairs:
    """(2B, T) right-padded [chosen; rejected] -> one packed row per pair (see the module doc).

    ``dense=False`` leaves ``keep`` as None (the block-sparse path builds its mask from ``branch``);
    ``width_multiple`` rounds the packed width up (FlexAttention's block size: fewer distinct shapes).
    ``width``: the packed width computed on the host (``data.collate.packed_width``): no device read."""
    n, t = input_ids.shape
    if n % 2 or n == 0:
        raise ValueError(f"prefix sharing needs [chosen; rejected] rows (an even, non-zero count), got {n}")
    b, dev = n // 2, input_ids.device
    attn = attention_mask.bool()
    comp = completion_mask.bool() & attn
    lens = attn.sum(-1)  # (2B,)
    first = torch.where(comp.any(-1), comp.float().argmax(-1), lens)  # first completion column
    same = (input_ids[:b] == input_ids[b:]) & attn[:b] & attn[b:]
    common = same.long().cumprod(-1).sum(-1)
    shared = torch.minimum(common, torch.minimum(first[:b], first[b:]))  # (B,)
    len_c, len_r = lens[:b], lens[b:]
    total = len_c + len_r - shared  # (B,)
    s = width if width is not None else max(int(total.max()), 1)  # without width: a host sync for the shapes
    s = -(-s // width_multiple) * width_multiple

    p = torch.arange(s, device=dev)[None, :]  # (1, S)
    in_c = p < len_c[:, None]
    in_r = ~in_c & (p < total[:, None])
    col_c = p.clamp(max=t - 1).expand(b, s)
    col_r = (p - len_c[:, None] + shared[:, None]).clamp(0, t - 1)
    ids = torch.where(in_c, input_ids[:b].gather(1, col_c),
                      torch.where(in_r, input_ids[b:].gather(1, col_r), torch.full_like(col_r, pad_id)))
    pos = torch.where(in_c, p, torch.where(in_r, col_r, torch.zeros_like(col_r)))

    # branch: 0 shared prefix, 1 chosen, 2 rejected, 3 padding
    branch = torch.where(p < shared[:, None], 0, torch.where(in_c, 1, torch.where(in_r, 2, 3)))
    keep = None
    if dense:
        # Built in place: one (B, S, S) boolean and no S×S temporaries (an expression of broadcast comparisons
        # held about four of them at once: at 8k tokens per pair, S ≈ 12k, that was ~0.6 GB per pair on top)
        q, k = branch[:, :, None], branch[:, None, :]
        keep = k == q  # (B, S, S): same branch ...
        keep |= k == 0  # ... or the shared prefix
        keep &= q < 3  # no padding on either side ((B, S, 1) and (B, 1, S): broadcast into keep)
        keep &= k < 3
        keep.tril_()  # causal
        keep.diagonal(dim1=1, dim2=2).fill_(True)  # pad rows see themselves
        keep = keep[:, None]

    # where each scored position of the standard layout lives in the packed rows
    rows, cols = comp[:, 1:].nonzero(as_tuple=True)  # state at col scores the token at col + 1
    pair = rows % b
    is_r = rows >= b
    at = torch.where(is_r & (cols >= shared[pair]), len_c[pair] + cols - shared[pair], cols)
    score_index = pair * s + at
    return PackedPairs(ids, pos, keep, score_index, total, branch)


def pack_groups(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, group_index: Tensor,
                pad_id: int = 0) -> PackedPairs:
    """(R, T) right-padded responses of G prompt groups -> one packed row per group:

        [shared prefix (L) | rest of response 1 | ... | rest of response K | pad]

    ``group_index`` (R,): each response's group, non-decreasing, every group 0..G-1 present (the collate
    order, docs/CONTRACTS.md). Each rest restarts its position ids at L, and under the mask a response's
    tokens see the prefix and themselves only, so every hidden state is the one its own (R, T) row computes.
    The prefix is the longest token prefix all of a group's responses share, cut at the first completion token
    of any. ``score_index`` maps the completion tokens of the (R, T) layout
    (``completion_mask[:, 1:].nonzero()`` order) into the packed (G·S) positions, as ``pack_pairs`` does for
    the pair layout (a pair is a group of 2).
    """
    r, t = input_ids.shape
    if r == 0:
        raise ValueError("pack_groups needs at least one response")
    dev = input_ids.device
    gi = group_index.to(dev).long()
    g = int(gi[-1]) + 1
    attn = attention_mask.bool()
    comp = completion_mask.bool() & attn
    lens = attn.sum(-1)  # (R,)
    first_comp = torch.where(comp.any(-1), comp.float().argmax(-1), lens)
    rows = torch.arange(r, device=dev)
    # first response
    head = torch.full((g,), r, dtype=torch.long, device=dev).scatter_reduce(0, gi, rows, "amin")
    lead = head[gi]  # (R,) each response's group's first response
    same = (input_ids == input_ids[lead]) & attn & attn[lead]
    common = same.long().cumprod(-1).sum(-1)
    cut = torch.minimum(common, first_comp)  # (R,)
    shared = torch.full((g,), t, dtype=torch.long, device=dev).scatter_reduce(0, gi, cut, "amin")  # (G,)
    sh = shared[gi]  # (R,)
    rest = lens - sh  # (R,) tokens each response adds after the prefix
    ends = torch.cumsum(rest, 0)
    group_start = torch.zeros(g, dtype=torch.long, device=dev).scatter_reduce(0, gi, ends - rest, "amin",
                                                                               include_self=False)
    offset = sh + (ends - rest) - group_start[gi]  # (R,) packed column where each response's rest starts
    total = shared + torch.zeros(g, dtype=torch.long, device=dev).index_add(0, gi, rest)  # (G,)
    s = max(int(total.max()), 1)  # the one host sync: the packed width sets the shapes
    local = rows - head[gi]  # index of the response within its group

    col = torch.arange(t, device=dev)[None, :]  # (1, T)
    in_prefix = col < sh[:, None]
    put = attn & (~in_prefix | (rows == lead)[:, None])  # prefix tokens come from the group's first response
    src_r, src_c = put.nonzero(as_tuple=True)
    dest_c = torch.where(src_c < sh[src_r], src_c, offset[src_r] + src_c - sh[src_r])
    dest = gi[src_r] * s + dest_c
    ids = torch.full((g * s,), pad_id, dtype=input_ids.dtype, device=dev)
    ids[dest] = input_ids[src_r, src_c]
    pos = torch.zeros(g * s, dtype=torch.long, device=dev)
    pos[dest] = src_c
    # branch: 0 shared prefix, k + 1 response k's rest, -1 padding
    branch = torch.full((g * s,), -1, dtype=torch.long, device=dev)
    branch[dest] = torch.where(src_c < sh[src_r], 0, local[src_r] + 1)
    ids, pos, branch = ids.view(g, s), pos.view(g, s), branch.view(g, s)

    p = torch.arange(s, device=dev)
    q, k = branch[:, :, None], branch[:, None, :]
    causal = p[None, :, None] >= p[None, None, :]
    keep = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    keep = keep | torch.eye(s, dtype=torch.bool, device=dev)  # pad rows see themselves: no all-masked softmax

    sr, sc = comp[:, 1:].nonzero(as_tuple=True)  # the state at sc scores the token at sc + 1
    at = torch.where(sc < sh[sr], sc, offset[sr] + sc - sh[sr])
    return PackedPairs(ids, pos, keep[:, None], gi[sr] * s + at, total)


def attention_mask_for(model: nn.Module, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The 4-D mask in the form the model's attention takes: bool for sdpa, additive float for eager."""
    if attn_implementation(model) == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min)
    return keep
