"""Prefix sharing's decision for one model: whether its pair forwards pack [prompt, chosen, rejected], checked
on the first batch, and through which attention kernel (timed on a GPU). Used by the policy on each worker and
by every reference holder; the packing itself is ``dpo_ray.prefix`` and the forward ``dpo_ray.forward``."""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from dpo_ray import flex, prefix
from dpo_ray.forward import eval_mode, sequence_forward
from dpo_ray.vision import PIXEL_KEYS

log = logging.getLogger(__name__)


class PrefixSharing:
    """Whether a model's pair forwards pack [prompt, chosen, rejected] (config ``prefix_sharing``), and
    through which attention (config ``prefix_attention``: the ``kernel`` once decided).

    ``off``: never. ``on``: wherever the model's attention takes a custom 4-D mask (``prefix.supports``).
    ``auto`` (default): the same, and the first pair batch is also run both ways once, without grad,
    and sharing stays on only if the log-probs agree (a model whose attention ignores the custom mask
    would let rejected tokens see the chosen ones; the check catches that before any step uses it).
    On a GPU (or with ``timed``), ``auto`` also times that batch in each layout that agreed (the standard
    one, the dense 4-D mask, FlexAttention's block mask) and keeps the fastest: a dense mask keeps SDPA off
    its flash kernels, so packing can lose to the standard layout it replaces.

    Kernels (``prefix_attention``): ``dense`` the 4-D mask through the model's attention; ``flex`` the
    block-sparse path (``dpo_ray.flex``), falling back to dense with the reason where FlexAttention is
    missing or disagrees; ``auto`` (default) flex is a candidate on the GPU only (on the CPU its eager form is
    a reference implementation, not a fast one). Decided once per holder (the policy on each worker, each
    reference model).
    """

    def __init__(self, mode: str = "auto", who: str = "policy", kernel: str = "auto",
                 timed: bool | None = None):
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
            # per sequence, grows with its tokens
            tol = (2e-2 if half else 1e-3) * plain.num_tokens.clamp(min=1)
            for kernel in candidates:
                try:
                    packed = sequence_forward(model, batch, share_prefix=kernel, **fwd).stats
                except Exception as e:  # noqa: BLE001 - the model or the kernel rejects packed inputs
                    # (flex: any compile/lowering error too): sharing falls back, the reason is kept
                    notes.append(f"the {kernel} packed forward failed ({type(e).__name__}: {str(e)[:200]})")
                    continue
                diff = (plain.logps - packed.logps).abs()
                worst = float(diff.max()) if diff.numel() else 0.0
                if bool((diff <= tol).all()):
                    agreeing.append((kernel, worst))
                    if self.mode == "on":
                        break  # on: the first kernel that runs and agrees, untimed
                else:
                    notes.append(f"{kernel}: packed and standard log-probs differ by up to {worst:.3g} on "
                                 "the first batch (does this model's attention honour a custom 4-D mask?)")
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
        self.why = (f"the first batch agrees with the standard layout (max |Δlogp| {worst:.2e}) and {best} "
                    f"packing was fastest ({shown})")
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
                    sequence_forward(model, batch, share_prefix=False if layout == "standard" else layout,
                                     **fwd)
                    if cuda:
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                out[layout] = best
        return out
