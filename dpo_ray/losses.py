"""The DPO loss family as pure per-pair functions (torch only: no Ray, no torch.distributed).

Notation (SPEC §3): for each pair, ``c = log π(y_w|x) - log π_ref(y_w|x)`` and
``r = log π(y_l|x) - log π_ref(y_l|x)`` (sums over completion tokens), ``d = c - r``, ``β = beta``,
``ε = label_smoothing``. Every loss returns a ``(B,)`` tensor of per-pair losses; the batch loss is
their mean, combined across ``loss_type`` by ``loss_weights``.

Losses register themselves by name; ``dpo_ray.config`` reads the valid names from ``LOSSES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # logprobs does not import losses; the type is only named here
    from dpo_ray.logprobs import SeqStats

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# exp() of a log-ratio can overflow float32 (88.7); cap its argument as TRL's cap_exp does.
_EXP_CAP = 50.0


@dataclass
class PairLogps:
    """Per-pair sequence statistics, each of shape (B,).

    ``*_logps`` are sums of completion-token log-probs (LD-DPO weighted when ``ld_alpha`` is set);
    ``ref_*`` are the reference model's (zeros for a reference-free run); ``*_lengths`` count the
    completion tokens; ``chosen_nll`` is the plain mean token NLL of the chosen completion (SFT/RPO);
    ``*_wpo_logw`` are WPO's length-normalised, distribution-adjusted log-probs (only with use_weighting).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_nll: Tensor | None = None
    chosen_wpo_logw: Tensor | None = None
    rejected_wpo_logw: Tensor | None = None

    @classmethod
    def from_stats(cls, stats: SeqStats, ref_chosen: Tensor | None = None,
                   ref_rejected: Tensor | None = None) -> PairLogps:
        """Split SeqStats of 2B sequences ([chosen; rejected], CONTRACTS.md) into pairs.

        ``ref_*`` are (B,) reference log-probs; None means reference-free (zeros).
        """
        n = stats.logps.shape[0]
        if n % 2:
            raise ValueError(f"expected [chosen; rejected] rows (an even count), got {n} sequences")
        b = n // 2

        def ref(x: Tensor | None) -> Tensor:
            return torch.zeros_like(stats.logps[:b]) if x is None else x.to(stats.logps.device, torch.float32)

        w = stats.wpo_logw
        return cls(stats.logps[:b], stats.logps[b:], ref(ref_chosen), ref(ref_rejected),
                   stats.num_tokens[:b], stats.num_tokens[b:], chosen_nll=stats.nll_mean[:b],
                   chosen_wpo_logw=None if w is None else w[:b],
                   rejected_wpo_logw=None if w is None else w[b:])

    @property
    def chosen_logratios(self) -> Tensor:  # c
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:  # r
        return self.rejected_logps - self.ref_rejected_logps


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[PairLogps, LossParams], Tensor]
    doc: str
    uses_margin: bool = False  # built on d = c - r, so an f-divergence may replace d
    needs_reference: bool = True
    pairwise: bool = True  # a preference loss on the pair: WPO's per-pair weight applies to it
    aliases: tuple[str, ...] = field(default_factory=tuple)


LOSSES: dict[str, LossSpec] = {}
LOSS_ALIASES: dict[str, str] = {}


def register_loss(name: str, *, uses_margin: bool = False, needs_reference: bool = True,
                  pairwise: bool = True, aliases: Sequence[str] = ()):
    def wrap(fn):
        LOSSES[name] = LossSpec(name, fn, (fn.__doc__ or "").strip().splitlines()[0], uses_margin,
                                needs_reference, pairwise, tuple(aliases))
        for alias in aliases:
            LOSS_ALIASES[alias] = name
        return fn

    return wrap


def canonical_loss_name(name: str) -> str:
    return LOSS_ALIASES.get(name, name)


def _capped_exp(x: Tensor) -> Tensor:
    return torch.exp(torch.clamp(x, max=_EXP_CAP))


def margin(p: PairLogps, cfg: LossParams) -> Tensor:
    """The preference margin d under the configured f-divergence (f-PO, arXiv 2309.16240).

    reverse_kl: c - r (plain DPO); forward_kl: e^{-r} - e^{-c}; js_divergence:
    (c - r) - (softplus(c) - softplus(r)); alpha_divergence: (e^{-αr} - e^{-αc}) / α.
    """
    c, r = p.chosen_logratios, p.rejected_logratios
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":
        return c - r
    if kind == "forward_kl":
        return _capped_exp(-r) - _capped_exp(-c)
    if kind == "js_divergence":
        return (c - r) - (F.softplus(c) - F.softplus(r))
    if kind == "alpha_divergence":
        a = cfg.f_alpha_divergence_coef
        return (_capped_exp(-a * r) - _capped_exp(-a * c)) / a
    raise ValueError(f"f_divergence_type={kind!r} is not one of {F_DIVERGENCES}")


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    # -(1-ε)·logσ(z) - ε·logσ(-z): cDPO (Mitchell 2023) when ε > 0
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_loss("sigmoid", uses_margin=True)
def sigmoid(p: PairLogps, cfg: LossParams) -> Tensor:
    """-(1-ε)·logσ(βd) - ε·logσ(-βd). DPO (arXiv 2305.18290, eq. 7); cDPO for ε > 0."""
    return _smoothed_sigmoid(cfg.beta * margin(p, cfg), cfg.label_smoothing)


@register_loss("hinge", uses_margin=True)
def hinge(p: PairLogps, cfg: LossParams) -> Tensor:
    """relu(1 - βd). SLiC / RSO (arXiv 2309.06657)."""
    return torch.relu(1 - cfg.beta * margin(p, cfg))


def _length_averaged_margin(p: PairLogps) -> Tensor:
    chosen = (p.chosen_logps - p.ref_chosen_logps) / p.chosen_lengths.clamp(min=1)
    rejected = (p.rejected_logps - p.ref_rejected_logps) / p.rejected_lengths.clamp(min=1)
    return chosen - rejected


@register_loss("ipo")
def ipo(p: PairLogps, cfg: LossParams) -> Tensor:
    """(d̄ - 1/(2β))², d̄ from length-averaged log-ratios. IPO (arXiv 2310.12036, eq. 17)."""
    return (_length_averaged_margin(p) - 1 / (2 * cfg.beta)) ** 2


@register_loss("exo_pair", uses_margin=True)
def exo_pair(p: PairLogps, cfg: LossParams) -> Tensor:
    """σ(βd)(logσ(βd) - log(1-ε)) + σ(-βd)(logσ(-βd) - log ε). EXO (arXiv 2402.00856); needs ε > 0."""
    z, eps = cfg.beta * margin(p, cfg), cfg.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@register_loss("nca_pair")
def nca_pair(p: PairLogps, cfg: LossParams) -> Tensor:
    """-logσ(βc) - ½logσ(-βc) - ½logσ(-βr). NCA (arXiv 2402.05369)."""
    c, r = cfg.beta * p.chosen_logratios, cfg.beta * p.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


@register_loss("robust", uses_margin=True)
def robust(p: PairLogps, cfg: LossParams) -> Tensor:
    """(-(1-ε)·logσ(βd) + ε·logσ(-βd)) / (1-2ε). Robust DPO (arXiv 2403.00409, eq. 8); 0 ≤ ε < ½."""
    z, eps = cfg.beta * margin(p, cfg), cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register_loss("bco_pair")
def bco_pair(p: PairLogps, cfg: LossParams) -> Tensor:
    """-logσ(βc) - logσ(-βr). BCO on pairs (arXiv 2404.04656)."""
    return -F.logsigmoid(cfg.beta * p.chosen_logratios) - F.logsigmoid(-cfg.beta * p.rejected_logratios)


@register_loss("sppo_hard")
def sppo_hard(p: PairLogps, cfg: LossParams) -> Tensor:
    """(c - 1/(2β))² + (r + 1/(2β))². SPPO with hard labels (arXiv 2405.00675)."""
    half = 1 / (2 * cfg.beta)
    return (p.chosen_logratios - half) ** 2 + (p.rejected_logratios + half) ** 2


@register_loss("aot")
def aot(p: PairLogps, cfg: LossParams) -> Tensor:
    """Smoothed sigmoid of sorted policy log-ratio gaps minus sorted reference gaps. AOT (arXiv 2406.05882).

    Quantiles come from sorting across the batch, so per-pair losses are not tied to their pair.
    """
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    reference = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return _smoothed_sigmoid(cfg.beta * (policy - reference), cfg.label_smoothing)


@register_loss("aot_unpaired", aliases=("aot_pair",))
def aot_unpaired(p: PairLogps, cfg: LossParams) -> Tensor:
    """Smoothed sigmoid of sorted c minus sorted r (unpaired AOT, arXiv 2406.05882; seed name aot_pair)."""
    c = torch.sort(p.chosen_logratios, dim=0).values
    r = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_sigmoid(cfg.beta * (c - r), cfg.label_smoothing)


@register_loss("apo_zero")
def apo_zero(p: PairLogps, cfg: LossParams) -> Tensor:
    """(1 - σ(βc)) + σ(βr). Anchored preference optimisation, zero anchor (arXiv 2408.06266)."""
    return (1 - torch.sigmoid(cfg.beta * p.chosen_logratios)) + torch.sigmoid(cfg.beta * p.rejected_logratios)


@register_loss("apo_down")
def apo_down(p: PairLogps, cfg: LossParams) -> Tensor:
    """σ(βc) + (1 - σ(β(c - r))). APO-down (arXiv 2408.06266)."""
    c, r = p.chosen_logratios, p.rejected_logratios
    return torch.sigmoid(cfg.beta * c) + (1 - torch.sigmoid(cfg.beta * (c - r)))


@register_loss("discopop", uses_margin=True)
def discopop(p: PairLogps, cfg: LossParams) -> Tensor:
    """(1-w)·(-logσ(m)) + w·exp(-m), m = βd, w = σ(m/τ). DiscoPOP (arXiv 2406.08414)."""
    m = cfg.beta * margin(p, cfg)
    w = torch.sigmoid(m / cfg.discopop_tau)
    return (1 - w) * -F.logsigmoid(m) + w * _capped_exp(-m)


@register_loss("sft", needs_reference=False, pairwise=False)
def sft(p: PairLogps, cfg: LossParams) -> Tensor:
    """Mean NLL of the chosen completion tokens (supervised term; RPO when combined with sigmoid)."""
    if p.chosen_nll is None:
        raise ValueError("loss_type 'sft' needs chosen_nll in PairLogps")
    return p.chosen_nll


@register_loss("sigmoid_norm")
def sigmoid_norm(p: PairLogps, cfg: LossParams) -> Tensor:
    """-(1-ε)·logσ(βd̄) - ε·logσ(-βd̄) on length-averaged log-ratios d̄."""
    return _smoothed_sigmoid(cfg.beta * _length_averaged_margin(p), cfg.label_smoothing)


def wpo_weights(p: PairLogps) -> Tensor:
    """WPO (arXiv 2406.11827): min(1, exp(w_c + w_r)), detached; w_* are the length-normalised,
    distribution-adjusted sequence log-probs from ``logprobs``."""
    if p.chosen_wpo_logw is None or p.rejected_wpo_logw is None:
        raise ValueError("use_weighting needs chosen_wpo_logw / rejected_wpo_logw in PairLogps")
    return torch.clamp(torch.exp(p.chosen_wpo_logw + p.rejected_wpo_logw), max=1.0).detach()


def dpo_loss(
    p: PairLogps,
    params: LossParams,
    loss_type: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    use_weighting: bool = False,
    rpo_alpha: float | None = None,
) -> Tensor:
    """Per-pair combined loss, shape (B,): Σ_k w_k·loss_k.

    ``use_weighting`` multiplies the preference losses (not sft) by the detached WPO weight.
    ``rpo_alpha`` appends ("sft", rpo_alpha) to the terms (RPO, arXiv 2404.19733), so it is the same
    as ``loss_type=[..., "sft"]`` with weight rpo_alpha, under WPO too.
    """
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_type)
    if len(weights) != len(loss_type):
        raise ValueError(f"loss_weights has {len(weights)} value(s) but loss_type has {len(loss_type)}")
    terms = list(zip(loss_type, weights))
    if rpo_alpha:
        terms.append(("sft", rpo_alpha))
    wpo = wpo_weights(p) if use_weighting else None
    total = torch.zeros_like(p.chosen_logps)
    for name, w in terms:
        spec = LOSSES[canonical_loss_name(name)]
        per_pair = spec.fn(p, params)
        if wpo is not None and spec.pairwise:
            per_pair = per_pair * wpo
        total = total + w * per_pair
    return total


def moe_aux_loss(loss: Tensor, aux_loss: Tensor | None, router_aux_loss_coef: float) -> Tensor:
    """loss + router_aux_loss_coef·aux (the MoE router load-balancing loss); ``loss`` when aux is None."""
    return loss if aux_loss is None else loss + router_aux_loss_coef * aux_loss.to(loss.dtype)


def pair_metrics(p: PairLogps, beta: float) -> dict[str, Tensor]:
    """SPEC §4 reward metrics for one batch, as detached 0-d tensors (no host sync)."""
    with torch.no_grad():
        chosen_rewards = beta * p.chosen_logratios
        rejected_rewards = beta * p.rejected_logratios
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": p.chosen_logps.mean(),
            "logps/rejected": p.rejected_logps.mean(),
        }


def batch_metrics(p: PairLogps, stats: SeqStats, beta: float,
                  attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Every per-batch SPEC §4 metric the math knows, as detached 0-d tensors (no .item()).

    ``logits/*`` and ``entropy`` are token-weighted means over the completion tokens (as TRL logs
    them). ``num_tokens`` (a sum, like TRL's) counts the input tokens when ``attention_mask`` (2B, T)
    is given, else the completion tokens.
    """
    out = pair_metrics(p, beta)
    b = p.chosen_logps.shape[0]
    with torch.no_grad():
        n = stats.num_tokens.detach()

        def token_mean(x: Tensor, rows: slice) -> Tensor:
            return (x.detach()[rows] * n[rows]).sum() / n[rows].sum().clamp(min=1)

        out["logits/chosen"] = token_mean(stats.mean_logit, slice(0, b))
        out["logits/rejected"] = token_mean(stats.mean_logit, slice(b, 2 * b))
        out["entropy"] = token_mean(stats.entropy, slice(0, 2 * b))
        out["num_tokens"] = (attention_mask.sum() if attention_mask is not None else n.sum()).float()
    return out
