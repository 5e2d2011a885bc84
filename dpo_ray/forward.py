"""One forward over [chosen; rejected] -> per-sequence statistics. Shared by policy and reference."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dpo_ray import flex, prefix
from dpo_ray.logprobs import SeqStats, completion_logps, completion_logps_from_hidden, gather_sequences
from dpo_ray.vision import PIXEL_KEYS

log = logging.getLogger(__name__)


# Prompt-group batches (dpo_ray.data.collate.collate_groups) carry these besides the (R, T) response rows.
GROUP_KEYS = ("group_index", "pair_chosen", "pair_rejected")


def is_group_batch(batch) -> bool:
    return "pair_chosen" in batch


def num_pairs(batch) -> int:
    """Pairs in a collated batch: B of a (2B, T) pair batch, P of a prompt-group batch."""
    return int(batch["pair_chosen"].shape[0]) if is_group_batch(batch) else batch["input_ids"].shape[0] // 2


def pair_layout(stats: SeqStats, batch) -> SeqStats:
    """Per-sequence statistics in the [chosen; rejected] layout of the batch's pairs: a pair batch's as they
    are, a prompt-group batch's per-response statistics gathered by (pair_chosen, pair_rejected)."""
    if not is_group_batch(batch):
        return stats
    return gather_sequences(stats, torch.cat([batch["pair_chosen"], batch["pair_rejected"]]))


@dataclass
class ForwardOut:
    stats: SeqStats
    aux_loss: Tensor | None = None


def _decoder_and_head(model: nn.Module):
    """The decoder stack and the output projection when the model exposes them (Llama, Qwen, Mistral, ...)."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or not isinstance(head, nn.Linear):
        return None, None
    return decoder, head


def sequence_forward(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    ld_alpha: float | None = None,
    want_wpo: bool = False,
    lean: bool = True,
    router_aux: bool = False,
    share_prefix: bool | str = False,
) -> ForwardOut:
    """Forward ``batch["input_ids"]`` (N, T) and score the completion tokens.

    ``lean`` projects only completion positions through the LM head, chunked and recomputed in
    backward, so the (N, T, V) logits never exist. It is skipped where the head's weight is not a
    plain tensor (ZeRO-3 partitions it; hooks gather it only inside ``head.forward``) and for MoE
    runs, which need the full forward's ``aux_loss``, and for vision batches (``pixel_values`` etc.), whose
    image features only the full model merges into the sequence.

    ``share_prefix`` runs each pair as one [prompt, chosen, rejected] row (``dpo_ray.prefix``); the
    caller decides (``PrefixSharing``); the statistics are those of the standard layout. ``True`` or
    ``"dense"``: a 4-D mask through the model's own attention; ``"flex"``: the block-sparse FlexAttention
    path (``dpo_ray.flex``).
    A prompt-group batch (``group_index``: (R, T) response rows) gives per-response statistics (R,); with
    ``share_prefix`` each group runs as one [prompt | r1 | ... | rK] row (``prefix.pack_groups``).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    completion_mask = batch["completion_mask"]
    pixels = {k: batch[k] for k in PIXEL_KEYS if k in batch}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if "pixel_values" in pixels and torch.is_floating_point(pixels["pixel_values"]):
        pixels["pixel_values"] = pixels["pixel_values"].to(dtype)  # bf16 models take bf16 pixels
    inputs, score_index = {"input_ids": input_ids, "attention_mask": attention_mask}, None
    groups = "group_index" in batch
    if groups and ld_alpha is not None:
        raise ValueError("ld_alpha (LD-DPO) splits each pair at its shorter completion, which a response "
                         "shared by several pairs of a prompt group does not have; unset ld_alpha for group "
                         "data")
    if share_prefix and not pixels and not router_aux:
        # --- prefix sharing: dense 4-D mask, or FlexAttention's BlockMask; a prompt group is one packed row,
        # always through the dense mask (pack_groups builds no branch map for the block-sparse path)
        flex_path = share_prefix == "flex" and not groups
        if groups:
            packed = prefix.pack_groups(input_ids, attention_mask, completion_mask, batch["group_index"])
        else:
            packed = prefix.pack_pairs(input_ids, attention_mask, completion_mask, dense=not flex_path,
                                       width_multiple=flex.BLOCK if flex_path and input_ids.is_cuda else 1,
                                       width=batch.get("packed_width"))  # from the collate: no host sync
        mask = (flex.block_mask(packed.branch) if flex_path
                else prefix.attention_mask_for(model, packed.keep, dtype))
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "attention_mask": mask}
        score_index = packed.score_index
        if flex_path:
            flex.enable(model)
    return _forward(model, inputs, input_ids, completion_mask, pixels, score_index, ld_alpha=ld_alpha,
                    want_wpo=want_wpo, lean=lean, router_aux=router_aux)


def _forward(model, inputs, input_ids, completion_mask, pixels, score_index, *, ld_alpha, want_wpo, lean,
             router_aux) -> ForwardOut:
    decoder, head = _decoder_and_head(model) if lean and not router_aux and not pixels else (None, None)
    if decoder is not None and getattr(head.weight, "ds_id", None) is None:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        stats = completion_logps_from_hidden(hidden, head.weight, input_ids, completion_mask,
                                             lm_head_bias=head.bias, ld_alpha=ld_alpha, want_wpo=want_wpo,
                                             score_index=score_index)
        return ForwardOut(stats)
    kwargs = {"output_router_logits": True} if router_aux else {}
    out = model(**inputs, use_cache=False, **pixels, **kwargs)
    stats = completion_logps(out.logits, input_ids, completion_mask, ld_alpha=ld_alpha, want_wpo=want_wpo,
                             score_index=score_index)
    aux = getattr(out, "aux_loss", None) if router_aux else None
    return ForwardOut(stats, aux)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then the train/eval mode it had (no dropout in a scoring pass)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class SharingDecision(Protocol):
    """What ``reference_logps`` asks of its prefix-sharing decision (``dpo_ray.sharing.PrefixSharing``)."""

    layout: bool | str

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], **fwd) -> bool: ...


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                    lean: bool = True, sharing: SharingDecision | None = None) -> tuple[Tensor, Tensor]:
    """Frozen-model log-probs for the pairs: (ref_chosen, ref_rejected), each (B,) float32. A prompt-group
    batch: each response scored once, then gathered for its pairs, each (P,)."""
    share = (sharing.layout if sharing is not None and sharing(model, batch, ld_alpha=ld_alpha, lean=lean)
             else False)
    stats = sequence_forward(model, batch, ld_alpha=ld_alpha, lean=lean, share_prefix=share).stats
    logps = stats.logps.float()
    if is_group_batch(batch):
        return logps[batch["pair_chosen"]], logps[batch["pair_rejected"]]
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
