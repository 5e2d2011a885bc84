"""Logits (or last hidden states) and labels -> per-sequence completion log-probs, memory-lean.

Torch only: no Ray, no torch.distributed. Conventions (docs/CONTRACTS.md): ``input_ids`` and
``completion_mask`` are (N, T), right-padded; the token at position t is scored by the logits at t-1,
so a completion token at position 0 cannot be scored and is ignored. For a DPO batch N = 2B: rows
[0, B) are chosen and [B, 2B) rejected completions of the same pairs.

Memory: only completion positions are scored, a chunk of positions at a time. A chunk is upcast to
float32 on its own, and under ``torch.utils.checkpoint`` when it carries grad, so neither a float32
(N, T, V) log-softmax nor (for the hidden-state path) an (N, T, V) logits tensor ever exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class SeqStats:
    """Per-sequence statistics, each (N,) float32.

    logps: Σ completion-token log-probs (``shared + ld_alpha·tail`` with LD-DPO); carries grad.
    num_tokens: completion tokens scored. nll_mean: plain (not LD-weighted) mean token NLL; grad.
    mean_logit: mean over vocab and completion tokens of the logits; detached.
    entropy: mean over completion tokens of the next-token entropy; detached.
    num_correct: completion tokens whose label is the argmax of their logits (mean_token_accuracy); detached.
    logps_shared / logps_tail: LD-DPO's split at the shorter completion's length (only with ld_alpha).
    wpo_logw: WPO's length-normalised, distribution-adjusted log-prob (only when asked); detached.
    """

    logps: Tensor
    num_tokens: Tensor
    nll_mean: Tensor
    mean_logit: Tensor
    entropy: Tensor
    num_correct: Tensor | None = None
    logps_shared: Tensor | None = None
    logps_tail: Tensor | None = None
    wpo_logw: Tensor | None = None


# ----------------------------------------------------------------------------- per-chunk math

def _chunk_stats(logits: Tensor, labels: Tensor, want_wpo: bool) -> tuple[Tensor, ...]:
    """(c, V) any float dtype, (c,) -> per-token float32 (c,) each: label log-prob (grad), and
    detached entropy, mean logit, whether the label is the argmax (1.0/0.0; the first maximum on ties,
    as TRL's is_top1) and WPO-adjusted log-prob (None unless want_wpo)."""
    # log-softmax in float32: bf16 log-probs drift by ~1e-2 summed over 2k tokens
    lg = logits.float()
    lse = torch.logsumexp(lg, dim=-1)  # (c,)
    label_logp = lg.gather(-1, labels[:, None]).squeeze(-1) - lse
    with torch.no_grad():
        lg, lse = lg.detach(), lse.detach()
        entropy = lse - (torch.softmax(lg, dim=-1) * lg).sum(-1)  # -Σ p·log p = lse - Σ p·logit
        mean_logit = lg.mean(-1)
        correct = (lg.argmax(-1) == labels).float()
        wpo = None
        if want_wpo:
            # WPO (arXiv 2406.11827; TRL use_weighting): log p(y_t) - log Σ_v p(v)², with
            # log Σ_v p(v)² = logsumexp_v(2·log_softmax) = logsumexp(2·logits) - 2·lse.
            wpo = label_logp.detach() - (torch.logsumexp(2 * lg, dim=-1) - 2 * lse)
    return label_logp, entropy, mean_logit, correct, wpo


def _score_positions(
    logits_at: Callable[..., Tensor],
    sources: tuple[Tensor, ...],
    positions: Tensor,
    labels: Tensor,
    chunk: int,
    want_wpo: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Score M flat positions, ``chunk`` at a time.

    ``logits_at(idx, *sources)`` returns the (c, V) logits of positions ``idx`` (c,). Returns the
    label log-probs (M,) with grad, and detached entropy (M,), mean logit (M,), argmax-is-label (M,),
    WPO (M,) or None.
    """
    def run(idx: Tensor, lab: Tensor, *src: Tensor) -> tuple[Tensor, ...]:
        return _chunk_stats(logits_at(idx, *src), lab, want_wpo)

    needs_grad = torch.is_grad_enabled() and any(s.requires_grad for s in sources)
    parts = []
    for start in range(0, positions.numel(), chunk):
        args = (positions[start:start + chunk], labels[start:start + chunk], *sources)
        # under checkpoint the (c, V) chunk and its float32 copy are recomputed in backward, not kept
        parts.append(checkpoint(run, *args, use_reentrant=False) if needs_grad else run(*args))
    if not parts:  # no completion tokens at all
        empty = sources[0].new_zeros(0, dtype=torch.float32)
        return empty, empty, empty, empty, (empty if want_wpo else None)
    logps, ents, means, correct, wpos = zip(*parts)
    return (torch.cat(logps), torch.cat(ents), torch.cat(means), torch.cat(correct),
            torch.cat(wpos) if want_wpo else None)


# ----------------------------------------------------------------------------- per-sequence reduction

def _scatter(values: Tensor, mask: Tensor) -> Tensor:
    """(M,) values at the True places of mask (N, T') -> (N, T') float32, zeros elsewhere (keeps grad)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=values.device).masked_scatter(mask, values)


def _ld_shared_mask(mask: Tensor) -> Tensor:
    """LD-DPO (arXiv 2409.06411): (2B, T') completion mask -> the tokens within the shared length.

    Per pair, the shared length is min(chosen, rejected) completion length; a completion token is
    shared when fewer than that many completion tokens precede it in its own sequence.
    """
    n = mask.shape[0]
    if n % 2:
        raise ValueError(f"ld_alpha needs [chosen; rejected] rows (an even count), got {n} sequences")
    lengths = mask.sum(-1)  # (2B,)
    shared = torch.minimum(lengths[: n // 2], lengths[n // 2:]).repeat(2)  # (2B,)
    rank = mask.long().cumsum(-1) - 1  # index of each completion token within its completion
    return mask & (rank < shared[:, None])


def _reduce(
    token_logps: Tensor,
    entropy: Tensor,
    mean_logit: Tensor,
    correct: Tensor,
    wpo: Tensor | None,
    mask: Tensor,
    ld_alpha: float | None,
) -> SeqStats:
    """Flat per-token values (M,) at the True places of mask (N, T') -> SeqStats."""
    n_tok = mask.sum(-1).float()  # (N,)
    denom = n_tok.clamp(min=1)
    tok = _scatter(token_logps, mask)  # (N, T')
    plain = tok.sum(-1)
    stats = SeqStats(
        logps=plain,
        num_tokens=n_tok,
        nll_mean=-plain / denom,
        mean_logit=_scatter(mean_logit, mask).sum(-1) / denom,
        entropy=_scatter(entropy, mask).sum(-1) / denom,
        num_correct=_scatter(correct, mask).sum(-1),
        wpo_logw=_scatter(wpo, mask).sum(-1) / denom if wpo is not None else None,
    )
    if ld_alpha is not None:
        shared_mask = _ld_shared_mask(mask)
        stats.logps_shared = (tok * shared_mask).sum(-1)
        stats.logps_tail = (tok * (mask & ~shared_mask)).sum(-1)
        stats.logps = stats.logps_shared + ld_alpha * stats.logps_tail
    return stats


def _shifted(input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(N, T) -> labels (N, T-1) and completion mask (N, T-1) bool, aligned with logits[:, :-1]."""
    return input_ids[:, 1:], completion_mask[:, 1:].bool()


# ----------------------------------------------------------------------------- public entry points

def completion_logps(
    logits: Tensor,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    ld_alpha: float | None = None,
    want_wpo: bool = False,
    chunk_tokens: int = 4096,
    score_index: Tensor | None = None,
) -> SeqStats:
    """Per-sequence completion statistics from full logits.

    logits (N, T, V) any float dtype; input_ids, completion_mask (N, T). Completion positions are
    scored ``chunk_tokens`` at a time, each chunk upcast to float32 on its own.
    ``score_index``: the logits come from another layout (``dpo_ray.prefix.pack_pairs``): (M,) flat
    indices into ``logits.reshape(-1, V)``, one per completion token of ``input_ids`` in row-major order.
    """
    v = logits.shape[-1]
    labels, mask = _shifted(input_ids, completion_mask)  # (N, T-1)
    if score_index is None:
        rows, cols = mask.nonzero(as_tuple=True)  # (M,)
        score_index = rows * logits.shape[1] + cols  # flat index of the scoring logits (position t-1)
    flat = logits.reshape(-1, v)
    per_token = _score_positions(lambda idx, lg: lg[idx], (flat,), score_index, labels[mask], chunk_tokens,
                                 want_wpo)
    return _reduce(*per_token, mask, ld_alpha)


def completion_logps_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    ld_alpha: float | None = None,
    want_wpo: bool = False,
    chunk_tokens: int = 1024,
    score_index: Tensor | None = None,
) -> SeqStats:
    """The memory-lean path: same result as ``completion_logps(hidden @ W.T + b, ...)``.

    hidden (N, T, H); lm_head_weight (V, H); lm_head_bias (V,) or None. Only completion positions
    are projected, ``chunk_tokens`` at a time under checkpoint, so no (N, T, V) logits exist and no
    (chunk, V) logits are kept for backward. ``score_index`` as in ``completion_logps``.
    """
    labels, mask = _shifted(input_ids, completion_mask)
    if score_index is None:
        flat = hidden[:, :-1][mask]  # (M, H): the states that score the completion tokens
    else:
        flat = hidden.reshape(-1, hidden.shape[-1])[score_index]
    sources = (flat, lm_head_weight) if lm_head_bias is None else (flat, lm_head_weight, lm_head_bias)
    positions = torch.arange(flat.shape[0], device=flat.device)
    per_token = _score_positions(lambda idx, x, *head: F.linear(x[idx], *head), sources, positions,
                                 labels[mask], chunk_tokens, want_wpo)
    return _reduce(*per_token, mask, ld_alpha)


def gather_sequences(stats: SeqStats, index: Tensor) -> SeqStats:
    """The statistics of sequences ``index`` (M,), in that order (a sequence may repeat): prompt groups turn
    per-response statistics into the [chosen; rejected] pair layout this way, every field gathered alike (and
    the gradient of a response used by several pairs accumulates over them)."""
    def pick(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[index.to(x.device)]

    return SeqStats(*(pick(getattr(stats, f)) for f in ("logps", "num_tokens", "nll_mean", "mean_logit",
                                                        "entropy", "num_correct", "logps_shared",
                                                        "logps_tail", "wpo_logw")))
