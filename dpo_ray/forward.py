"""One forward over [chosen; rejected] -> per-sequence statistics. Shared by policy and reference."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo_ray import prefix
from dpo_ray.logprobs import SeqStats, completion_logps, completion_logps_from_hidden
from dpo_ray.vision import PIXEL_KEYS

log = logging.getLogger(__name__)


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
    share_prefix: bool = False,
) -> ForwardOut:
    """Forward ``batch["input_ids"]`` (N, T) and score the completion tokens.

    ``lean`` projects only completion positions through the LM head, chunked and recomputed in
    backward, so the (N, T, V) logits never exist. It is skipped where the head's weight is not a
    plain tensor (ZeRO-3 partitions it; hooks gather it only inside ``head.forward``) and for MoE
    runs, which need the full forward's ``aux_loss``, and for vision batches (``pixel_values`` etc.), whose
    image features only the full model merges into the sequence.

    ``share_prefix`` runs each pair as one [prompt, chosen, rejected] row (``dpo_ray.prefix``); the
    caller decides (``PrefixSharing``); the statistics are those of the standard layout.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    completion_mask = batch["completion_mask"]
    pixels = {k: batch[k] for k in PIXEL_KEYS if k in batch}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if "pixel_values" in pixels and torch.is_floating_point(pixels["pixel_values"]):
        pixels["pixel_values"] = pixels["pixel_values"].to(dtype)  # bf16 models take bf16 pixels
    inputs, score_index = {"input_ids": input_ids, "attention_mask": attention_mask}, None
    if share_prefix and not pixels and not router_aux:
        packed = prefix.pack_pairs(input_ids, attention_mask, completion_mask)
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
                  "attention_mask": prefix.attention_mask_for(model, packed.keep, dtype)}
        score_index = packed.score_index
    decoder, head = _decoder_and_head(model) if lean and not router_aux and not pixels else (None, None)
    if decoder is not None and getattr(head.weight, "ds_id", None) is None:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        stats = completion_logps_from_hidden(hidden, head.weight, input_ids, completion_mask, lm_head_bias=head.bias,
                                             ld_alpha=ld_alpha, want_wpo=want_wpo, score_index=score_index)
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


class PrefixSharing:
    """Whether a model's pair forwards pack [prompt, chosen, rejected] (config ``prefix_sharing``).

    ``off``: never. ``on``: wherever the model's attention takes a custom 4-D mask (``prefix.supports``).
    ``auto`` (default): the same, and the first pair batch is also run both ways once, without grad,
    and sharing stays on only if the log-probs agree (a model whose attention ignores the custom mask
    would let rejected tokens see the chosen ones; the check catches that before any step uses it).
    Decided once per holder (the policy on each worker, each reference model).
    """

    def __init__(self, mode: str = "auto", who: str = "policy"):
        self.mode, self.who = mode, who
        self.enabled: bool | None = False if mode == "off" else None
        self.why = "prefix_sharing: off" if mode == "off" else ""  # the reason for the decision, once made

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], **fwd) -> bool:
        if self.enabled is None:
            self.enabled = self._decide(model, batch, **fwd)
        return self.enabled

    def _decide(self, model: nn.Module, batch: dict[str, Tensor], **fwd) -> bool:
        ok, why = prefix.supports(model)
        if ok and any(k in batch for k in PIXEL_KEYS):
            ok, why = False, "vision batches keep the standard layout"
        if not ok:
            self.why = why
            log.info("prefix_sharing off for the %s: %s", self.who, why)
            return False
        if self.mode == "on":
            self.why = "prefix_sharing: on"
            return True
        fwd = {k: v for k, v in fwd.items() if k in ("ld_alpha", "lean")}
        try:
            with eval_mode(model), torch.no_grad():  # dropout would make the two forwards differ
                plain = sequence_forward(model, batch, **fwd).stats
                packed = sequence_forward(model, batch, share_prefix=True, **fwd).stats
        except (TypeError, ValueError, RuntimeError) as e:  # the model rejects the packed inputs
            self.why = f"the packed forward failed ({type(e).__name__}: {e})"
            log.warning("prefix_sharing off for the %s: %s", self.who, self.why)
            return False
        diff = (plain.logps - packed.logps).abs()
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
        tol = (2e-2 if half else 1e-3) * plain.num_tokens.clamp(min=1)  # per sequence, grows with its tokens
        agree = bool((diff <= tol).all())
        worst = float(diff.max()) if diff.numel() else 0.0
        if agree:
            self.why = f"the first batch agrees with the standard layout: max |Δlogp| {worst:.2e}"
            log.debug("prefix_sharing on for the %s: %s", self.who, self.why)
        else:
            self.why = (f"packed and standard log-probs differ by up to {worst:.3g} on the first batch (does this "
                        "model's attention honour a custom 4-D mask?)")
            log.warning("prefix_sharing off for the %s: %s", self.who, self.why)
        return agree


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                    lean: bool = True, sharing: PrefixSharing | None = None) -> tuple[Tensor, Tensor]:
    """Frozen-model log-probs for the pairs: (ref_chosen, ref_rejected), each (B,) float32."""
    share = sharing(model, batch, ld_alpha=ld_alpha, lean=lean) if sharing is not None else False
    stats = sequence_forward(model, batch, ld_alpha=ld_alpha, lean=lean, share_prefix=share).stats
    logps = stats.logps.float()
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
