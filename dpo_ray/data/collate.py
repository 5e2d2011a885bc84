"""Tokenized rows -> padded torch batches (docs/CONTRACTS.md). Built in numpy, one torch.from_numpy each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _padded_len(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    t = max(lengths) if len(lengths) else 0
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    return t


def _pack(seqs: Sequence[Any], prompt_lens: Sequence[int], pad_id: int, pad_to_multiple_of: int | None):
    """Right-padded (N, T) ids, attention mask and completion mask (int64 numpy)."""
    lengths = [len(s) for s in seqs]
    t = _padded_len(lengths, pad_to_multiple_of)
    n = len(seqs)
    ids = np.full((n, t), pad_id, dtype=np.int64)
    attn = np.zeros((n, t), dtype=np.int64)
    comp = np.zeros((n, t), dtype=np.int64)
    for i, (s, length, p) in enumerate(zip(seqs, lengths, prompt_lens)):
        ids[i, :length] = s
        attn[i, :length] = 1
        comp[i, int(p):length] = 1
    return ids, attn, comp


def _pixels(batch: dict, repeat: int) -> dict[str, torch.Tensor]:
    """Vision rows: each pixel column K (flat per row, shape in K_shape) -> the rows' arrays concatenated in
    row order and repeated ``repeat`` times, so [chosen; rejected] rows see their images in the same order
    as their image tokens. Batches without any image get no pixel keys."""
    out = {}
    for key in batch:
        if not key.endswith("_shape") or key[: -len("_shape")] not in batch:
            continue
        name = key[: -len("_shape")]
        arrays = [np.asarray(flat).reshape([int(d) for d in shape])
                  for flat, shape in zip(batch[name], batch[key])]
        joined = np.concatenate(arrays) if arrays else np.zeros((0,))
        if joined.shape[0]:
            out[name] = torch.from_numpy(np.ascontiguousarray(np.concatenate([joined] * repeat)))
    return out


def _tensors(ids, attn, comp, batch: dict) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
           "completion_mask": torch.from_numpy(comp),
           "row_id": torch.from_numpy(np.array(batch["row_id"], dtype=np.int64))}
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        if k in batch:
            out[k] = torch.from_numpy(np.array(batch[k], dtype=np.float32))
    return out


# --- prefix sharing's packed width, computed here on the host
def packed_width(chosen: Sequence[Any], rejected: Sequence[Any], chosen_plen: Sequence[int],
                 rejected_plen: Sequence[int]) -> int:
    """The width ``prefix.pack_pairs`` gives these pairs (max over pairs of len(chosen) + len(rejected) - the
    shared prompt: the common token prefix cut at the first completion token of either row), from the token
    lists, so the packed forward needs no device-to-host read for its shapes."""
    width = 1
    for c, r, pc, pr in zip(chosen, rejected, chosen_plen, rejected_plen):
        c, r = np.asarray(c), np.asarray(r)
        n = min(len(c), len(r))
        differ = np.flatnonzero(c[:n] != r[:n])
        common = int(differ[0]) if len(differ) else n
        first_c = int(pc) if len(c) > int(pc) else len(c)  # no completion token: the whole row
        first_r = int(pr) if len(r) > int(pr) else len(r)
        width = max(width, len(c) + len(r) - min(common, first_c, first_r))
    return width


def collate_pairs(batch: dict[str, Any], pad_token_id: int, pad_to_multiple_of: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """Pairs -> input_ids/attention_mask/completion_mask (2B, T): rows [0, B) chosen, [B, 2B) rejected.

    ``batch`` holds the columns of a tokenized preference row (lists or numpy arrays); ``row_id`` (B,) and
    ``ref_*_logps`` (B,) float32 pass through. Vision rows' pixel columns become ``pixel_values`` etc. (the
    rows' images for [chosen; rejected], i.e. twice). ``packed_width`` (a Python int) is the width prefix
    sharing packs the pairs to (``packed_width``), so the forward reads no shape from the device.
    """
    seqs = list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"])
    plens = list(batch["chosen_prompt_len"]) + list(batch["rejected_prompt_len"])
    b = len(seqs) // 2
    width = packed_width(seqs[:b], seqs[b:], plens[:b], plens[b:])
    return {**_tensors(*_pack(seqs, plens, pad_token_id, pad_to_multiple_of), batch), **_pixels(batch, 2),
            "packed_width": width}


def collate_sft(batch: dict[str, Any], pad_token_id: int, pad_to_multiple_of: int | None = None
                ) -> dict[str, torch.Tensor]:
    """SFT rows -> input_ids/attention_mask/completion_mask (B, T) and row_id (B,)."""
    ids, attn, comp = _pack(list(batch["chosen_input_ids"]), list(batch["chosen_prompt_len"]), pad_token_id,
                            pad_to_multiple_of)
    return {**_tensors(ids, attn, comp, batch), **_pixels(batch, 1)}


def group_responses(batch: dict[str, Any]) -> tuple[list, list, list, list, list]:
    """Prompt-group columns -> (sequences, prompt lengths, group index, pair chosen, pair rejected), the pairs
    as indices into the flattened responses (all of group 0's responses, then group 1's, ...)."""
    seqs, plens, gidx, chosen, rejected = [], [], [], [], []
    for g, (flat, lens, pl, c, r) in enumerate(zip(batch["group_input_ids"], batch["group_lens"],
                                                    batch["group_prompt_len"], batch["pair_chosen"],
                                                    batch["pair_rejected"])):
        base, at = len(seqs), 0
        for n, p in zip(lens, pl):
            seqs.append(flat[at:at + int(n)])
            plens.append(int(p))
            gidx.append(g)
            at += int(n)
        chosen += [base + int(i) for i in c]
        rejected += [base + int(j) for j in r]
    return seqs, plens, gidx, chosen, rejected


def collate_groups(batch: dict[str, Any], pad_token_id: int, pad_to_multiple_of: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Prompt groups (docs/CONTRACTS.md) -> input_ids/attention_mask/completion_mask (R, T), one row per
    response (R = all the groups' responses, group by group), ``group_index`` (R,), the pairs ``pair_chosen``
    / ``pair_rejected`` (P,) as indices into the R responses, ``row_id`` (G,), and ``ref_logps`` (R,) float32
    when the rows carry precomputed per-response reference log-probs (``ref_group_logps``)."""
    seqs, plens, gidx, chosen, rejected = group_responses(batch)
    out = _tensors(*_pack(seqs, plens, pad_token_id, pad_to_multiple_of), batch)
    out["group_index"] = torch.tensor(gidx, dtype=torch.long)
    out["pair_chosen"] = torch.tensor(chosen, dtype=torch.long)
    out["pair_rejected"] = torch.tensor(rejected, dtype=torch.long)
    if "ref_group_logps" in batch:
        out["ref_logps"] = torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.float32)
                                                            for x in batch["ref_group_logps"]]))
    return out
