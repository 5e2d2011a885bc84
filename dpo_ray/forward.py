"""One forward over [chosen; rejected] -> per-sequence statistics. Shared by policy and reference."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
    """Per-sequence statistics in the [chosen; rejected] layout of the batch's pairs: a pair batch's as they are,
    a prompt-group batch's per-response statistics gathered by (pair_chosen, pair_rejected)."""
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
        raise ValueError("ld_alpha (LD-DPO) splits each pair at its shorter completion, which a response shared by "
                         "several pairs of a prompt group does not have; unset ld_alpha for group data")
    if share_prefix and not pixels and not router_aux:
        # --- prefix sharing: dense 4-D mask, or FlexAttention's BlockMask (w20); a prompt group is one packed row,
        # always through the dense mask (pack_groups builds no branch map for the block-sparse path)
        flex_path = share_prefix == "flex" and not groups
        if groups:
            packed = prefix.pack_groups(input_ids, attention_mask, completion_mask, batch["group_index"])
        else:
            packed = prefix.pack_pairs(input_ids, attention_mask, completion_mask, dense=not flex_path,
                                       width_multiple=flex.BLOCK if flex_path and input_ids.is_cuda else 1,
                                       width=batch.get("packed_width"))  # from the collate: no host sync
        mask = flex.block_mask(packed.branch) if flex_path else prefix.attention_mask_for(model, packed.keep, dtype)
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
    """Whether a model's pair forwards pack [prompt, chosen, rejected] (config ``prefix_sharing``), and through
    which attention (config ``prefix_attention``: the ``kernel`` once decided).

    ``off``: never. ``on``: wherever the model's attention takes a custom 4-D mask (``prefix.supports``).
    ``auto`` (default): the same, and the first pair batch is also run both ways once, without grad,
    and sharing stays on only if the log-probs agree (a model whose attention ignores the custom mask
    would let rejected tokens see the chosen ones; the check catches that before any step uses it).
    On a GPU (or with ``timed``), ``auto`` also times that batch in each layout that agreed (the standard
    one, the dense 4-D mask, FlexAttention's block mask) and keeps the fastest: a dense mask keeps SDPA off
    its flash kernels, so packing can lose to the standard layout it replaces.

    Kernels (``prefix_attention``): ``dense`` the 4-D mask through the model's attention; ``flex`` the
    block-sparse path (``dpo_ray.flex``), falling back to dense with the reason where FlexAttention is
    missing or disagrees; ``auto`` (default) flex is a candidate on the GPU only (on the CPU its eager form is a
    reference implementation, not a fast one). Decided once per holder (the policy on each worker, each
    reference model).
    """

    def __init__(self, mode: str = "auto", who: str = "policy", kernel: str = "auto", timed: bool | None = None):
        self.mode, self.who, self.kernel_mode = mode, who, kernel
        self.enabled: bool | None = False if mode == "off" else None
        self.why = "prefix_sharing: off" if mode == "off" else ""  # the reason for the decision, once made
        self.kernel = "dense"  # the packed path's attention once enabled: "dense" or "flex"
        self.timed = timed  # None: time the layouts on CUDA only
        self.timings: dict[str, float] = {}  # seconds per forward of the first batch, by layout (when timed)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], **fwd) -> bool:
        if self.enabled is None:
            self.enabled = self._decide(model, batch, **fwd)
        return self.enabled

    @property
    def layout(self) -> bool | str:
        """What ``sequence_forward(share_prefix=...)`` takes for the decision: False or the kernel."""
        return self.kernel if self.enabled else False

    def _candidates(self, device: torch.device) -> list[str]:
        on_gpu = device.type == "cuda"
        if self.kernel_mode == "dense":
            return ["dense"]
        ok, why = flex.available()
        if ok and self.who == "policy":  # the policy's forward is differentiated
            ok, why = flex.backward_on(device)
        if not ok:
            self.why_flex = why
            return ["dense"]
        if self.kernel_mode == "flex":
            return ["flex", "dense"]  # flex first; dense if flex fails or disagrees
        return ["flex", "dense"] if on_gpu else ["dense"]

    def _decide(self, model: nn.Module, batch: dict[str, Tensor], **fwd) -> bool:
        ok, why = prefix.supports(model)
        if ok and any(k in batch for k in PIXEL_KEYS):
            ok, why = False, "vision batches keep the standard layout"
        if not ok:
            self.why = why
            log.info("prefix_sharing off for the %s: %s", self.who, why)
            return False
        on_gpu = batch["input_ids"].is_cuda
        self.why_flex = ""
        candidates = self._candidates(batch["input_ids"].device)
        if self.mode == "on" and self.kernel_mode != "flex":  # on trusts the attention implementation
            self.kernel, self.why = "dense", "prefix_sharing: on"
            return True
        fwd = {k: v for k, v in fwd.items() if k in ("ld_alpha", "lean")}
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
        notes, agreeing = [], []
        with eval_mode(model), torch.no_grad():  # dropout would make the forwards differ
            plain = sequence_forward(model, batch, **fwd).stats
            tol = (2e-2 if half else 1e-3) * plain.num_tokens.clamp(min=1)  # per sequence, grows with its tokens
            for kernel in candidates:
                try:
                    packed = sequence_forward(model, batch, share_prefix=kernel, **fwd).stats
                except Exception as e:  # noqa: BLE001 - the model or the kernel rejects packed inputs (flex: any
                    # compile/lowering error too): sharing falls back, the reason is kept
                    notes.append(f"the {kernel} packed forward failed ({type(e).__name__}: {str(e)[:200]})")
                    continue
                diff = (plain.logps - packed.logps).abs()
                worst = float(diff.max()) if diff.numel() else 0.0
                if bool((diff <= tol).all()):
                    agreeing.append((kernel, worst))
                    if self.mode == "on":
                        break  # on: the first kernel that runs and agrees, untimed
                else:
                    notes.append(f"{kernel}: packed and standard log-probs differ by up to {worst:.3g} on the first "
                                 "batch (does this model's attention honour a custom 4-D mask?)")
        if self.why_flex and self.kernel_mode == "flex":
            notes.append(self.why_flex)
        if not agreeing:
            self.why = "; ".join(notes) or "no packed layout agreed"
            log.warning("prefix_sharing off for the %s: %s", self.who, self.why)
            return False
        timed = on_gpu if self.timed is None else self.timed
        if self.mode == "on" or not timed:
            self.kernel, worst = agreeing[0]
            self.why = f"the first batch agrees with the standard layout: max |Δlogp| {worst:.2e}"
            if self.kernel != "dense":
                self.why += f" ({self.kernel} attention)"
            if notes:
                self.why += " (" + "; ".join(notes) + ")"
            log.debug("prefix_sharing on for the %s: %s", self.who, self.why)
            return True
        self.timings = self._time(model, batch, ["standard"] + [k for k, _ in agreeing], fwd)
        best = min(self.timings, key=self.timings.get)
        shown = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items())
        if best == "standard":
            self.why = f"the standard layout was fastest on the first batch ({shown})"
            log.info("prefix_sharing off for the %s: %s", self.who, self.why)
            return False
        self.kernel = best
        worst = dict(agreeing)[best]
        self.why = (f"the first batch agrees with the standard layout (max |Δlogp| {worst:.2e}) and {best} packing was "
                    f"fastest ({shown})")
        log.info("prefix_sharing on for the %s: %s", self.who, self.why)
        return True

    @staticmethod
    def _time(model: nn.Module, batch: dict[str, Tensor], layouts: list[str], fwd: dict, repeats: int = 2
              ) -> dict[str, float]:
        """The minimum over ``repeats`` no-grad forwards of ``batch`` per layout (each already ran once:
        compilation and allocator warm-up are outside the timing)."""
        cuda = batch["input_ids"].is_cuda
        out = {}
        with eval_mode(model), torch.no_grad():
            for layout in layouts:
                best = float("inf")
                for _ in range(repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    sequence_forward(model, batch, share_prefix=False if layout == "standard" else layout, **fwd)
                    if cuda:
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                out[layout] = best
        return out


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                    lean: bool = True, sharing: PrefixSharing | None = None) -> tuple[Tensor, Tensor]:
    """Frozen-model log-probs for the pairs: (ref_chosen, ref_rejected), each (B,) float32. A prompt-group
    batch: each response scored once, then gathered for its pairs, each (P,)."""
    share = sharing.layout if sharing is not None and sharing(model, batch, ld_alpha=ld_alpha, lean=lean) else False
    stats = sequence_forward(model, batch, ld_alpha=ld_alpha, lean=lean, share_prefix=share).stats
    logps = stats.logps.float()
    if is_group_batch(batch):
        return logps[batch["pair_chosen"]], logps[batch["pair_rejected"]]
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
