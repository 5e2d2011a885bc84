"""One forward over [chosen; rejected] -> per-sequence statistics. Shared by policy and reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo_ray.logprobs import SeqStats, completion_logps, completion_logps_from_hidden
from dpo_ray.vision import PIXEL_KEYS


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
) -> ForwardOut:
    """Forward ``batch["input_ids"]`` (N, T) and score the completion tokens.

    ``lean`` projects only completion positions through the LM head, chunked and recomputed in
    backward, so the (N, T, V) logits never exist. It is skipped where the head's weight is not a
    plain tensor (ZeRO-3 partitions it; hooks gather it only inside ``head.forward``) and for MoE
    runs, which need the full forward's ``aux_loss``, and for vision batches (``pixel_values`` etc.), whose
    image features only the full model merges into the sequence.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    completion_mask = batch["completion_mask"]
    pixels = {k: batch[k] for k in PIXEL_KEYS if k in batch}
    if "pixel_values" in pixels and torch.is_floating_point(pixels["pixel_values"]):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None:  # bf16 models take bf16 pixels
            pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
    decoder, head = _decoder_and_head(model) if lean and not router_aux and not pixels else (None, None)
    if decoder is not None and getattr(head.weight, "ds_id", None) is None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        stats = completion_logps_from_hidden(hidden, head.weight, input_ids, completion_mask,
                                             lm_head_bias=head.bias, ld_alpha=ld_alpha, want_wpo=want_wpo)
        return ForwardOut(stats)
    kwargs = {"output_router_logits": True} if router_aux else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **pixels, **kwargs)
    stats = completion_logps(out.logits, input_ids, completion_mask, ld_alpha=ld_alpha, want_wpo=want_wpo)
    aux = getattr(out, "aux_loss", None) if router_aux else None
    return ForwardOut(stats, aux)


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                    lean: bool = True) -> tuple[Tensor, Tensor]:
    """Frozen-model log-probs for the pairs: (ref_chosen, ref_rejected), each (B,) float32."""
    stats = sequence_forward(model, batch, ld_alpha=ld_alpha, lean=lean).stats
    logps = stats.logps.float()
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
