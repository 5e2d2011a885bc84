"""The DPO loss family as pure per-pair functions (torch only: no Ray, no torch.distributed).

Notation (docs/losses.md): for each pair, ``c = log π(y_w|x) - log π_ref(y_w|x)`` and
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

# exp() of a log-ratio can overflow float32 (88.7); cap its argument. 40, not 50: IPO squares the score, and
# e^40 squared (5e34) still fits float32. Realistic log-ratios never reach it, so TRL's numbers are unchanged.
_EXP_CAP = 40.0

# Metric weights for the cross-worker reduction (dpo_ray.train.metrics): the entry METRIC_WEIGHT + name holds
# how many tokens (or pairs) the metric ``name`` of this micro-batch averages over.
METRIC_WEIGHT = "weight::"


@dataclass
class PairLogps:
    """Per-pair sequence statistics, each of shape (B,).

    ``*_logps`` are sums of completion-token log-probs (LD-DPO weighted when ``ld_alpha`` is set);
    ``ref_*`` are the reference model's (zeros for a reference-free run); ``*_lengths`` count the
    scored completion tokens; ``chosen_nll`` is the plain mean token NLL of each chosen completion (SFT/RPO
    reduce it to one token mean over the batch);
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
    f_alpha_divergence_coef: float = 0.5  # TRL 1.x's α (α = 1: reverse KL; a pre-1.0 α is 1 - α here)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[PairLogps, LossParams], Tensor]
    doc: str
    # built on the chosen/rejected scores, so f_divergence_type may replace the log-ratios (TRL 1.x's set)
    takes_f_divergence: bool = False
    needs_reference: bool = True
    aliases: tuple[str, ...] = field(default_factory=tuple)


LOSSES: dict[str, LossSpec] = {}
LOSS_ALIASES: dict[str, str] = {}


def register_loss(name: str, *, takes_f_divergence: bool = False, needs_reference: bool = True,
                  aliases: Sequence[str] = ()):
    def wrap(fn):
        LOSSES[name] = LossSpec(name, fn, (fn.__doc__ or "").strip().splitlines()[0], takes_f_divergence,
                                needs_reference, tuple(aliases))
        for alias in aliases:
            LOSS_ALIASES[alias] = name
        return fn

    return wrap


def canonical_loss_name(name: str) -> str:
    return LOSS_ALIASES.get(name, name)


def _capped_exp(x: Tensor) -> Tensor:
    return torch.exp(torch.clamp(x, max=_EXP_CAP))


def f_score(u: Tensor, cfg: LossParams) -> Tensor:
    """f'(t) at t = e^u for a log-ratio u, under the configured f-divergence
    (f-DPO, arXiv 2309.16240, as TRL 1.x).

    Each f' is shifted so that f'(1) = 0: reverse_kl u; forward_kl 1 - e^{-u}; js_divergence log 2 + logσ(u);
    alpha_divergence (e^{(α-1)u} - 1)/(α-1), α = f_alpha_divergence_coef, α = 1 being reverse KL (its limit).
    The shift cancels in d = score(c) - score(r) but not in IPO's and sigmoid_norm's length averages.
    """
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - _capped_exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        a = cfg.f_alpha_divergence_coef - 1.0
        if abs(a) < 1e-6:  # the α → 1 limit is log t (TRL's cut-off)
            return u
        return torch.expm1(torch.clamp(a * u, max=_EXP_CAP)) / a
    raise ValueError(f"f_divergence_type={kind!r} is not one of {F_DIVERGENCES}")


def margin(p: PairLogps, cfg: LossParams) -> Tensor:
    """The preference margin d = score(c) - score(r); plain DPO's c - r under reverse_kl."""
    return f_score(p.chosen_logratios, cfg) - f_score(p.rejected_logratios, cfg)


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    # -(1-ε)·logσ(z) - ε·logσ(-z): cDPO (Mitchell 2023) when ε > 0
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_loss("sigmoid", takes_f_divergence=True)
def sigmoid(p: PairLogps, cfg: LossParams) -> Tensor:
    """-(1-ε)·logσ(βd) - ε·logσ(-βd). DPO (arXiv 2305.18290, eq. 7); cDPO for ε > 0."""
    return _smoothed_sigmoid(cfg.beta * margin(p, cfg), cfg.label_smoothing)


@register_loss("hinge", takes_f_divergence=True)
def hinge(p: PairLogps, cfg: LossParams) -> Tensor:
    """relu(1 - βd). SLiC / RSO (arXiv 2309.06657)."""
    return torch.relu(1 - cfg.beta * margin(p, cfg))


def _length_averaged_margin(p: PairLogps, cfg: LossParams) -> Tensor:
    # the f-divergence scores first, then each side divided by its completion length (TRL's order)
    chosen = f_score(p.chosen_logratios, cfg) / p.chosen_lengths.clamp(min=1)
    rejected = f_score(p.rejected_logratios, cfg) / p.rejected_lengths.clamp(min=1)
    return chosen - rejected


@register_loss("ipo", takes_f_divergence=True)
def ipo(p: PairLogps, cfg: LossParams) -> Tensor:
    """(d̄ - 1/(2β))², d̄ from length-averaged log-ratios (scores). IPO (arXiv 2310.12036, eq. 17)."""
    return (_length_averaged_margin(p, cfg) - 1 / (2 * cfg.beta)) ** 2


@register_loss("exo_pair", takes_f_divergence=True)
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


@register_loss("robust", takes_f_divergence=True)
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


@register_loss("discopop", takes_f_divergence=True)
def discopop(p: PairLogps, cfg: LossParams) -> Tensor:
    """(1-w)·(-logσ(m)) + w·exp(-m), m = βd, w = σ(m/τ). DiscoPOP (arXiv 2406.08414)."""
    m = cfg.beta * margin(p, cfg)
    w = torch.sigmoid(m / cfg.discopop_tau)
    return (1 - w) * -F.logsigmoid(m) + w * _capped_exp(-m)


@register_loss("sft", needs_reference=False, takes_f_divergence=True)
def sft(p: PairLogps, cfg: LossParams) -> Tensor:
    """NLL of the chosen completions as one token mean over the micro-batch, the same for every pair (as TRL).

    Σ_i n_i·nll_i / Σ_i n_i over pairs i with n_i chosen tokens: long completions weigh more than in a mean of
    per-sequence means. The mean over pairs is that token mean. f_divergence_type does not change it.
    """
    if p.chosen_nll is None:
        raise ValueError("loss_type 'sft' needs chosen_nll in PairLogps")
    n = p.chosen_lengths
    token_mean = (p.chosen_nll * n).sum() / n.sum().clamp(min=1)
    return token_mean.expand_as(p.chosen_nll)


@register_loss("sigmoid_norm", takes_f_divergence=True)
def sigmoid_norm(p: PairLogps, cfg: LossParams) -> Tensor:
    """-logσ(βd̄) on length-averaged log-ratios (scores) d̄; ε does not apply (as TRL)."""
    return -F.logsigmoid(cfg.beta * _length_averaged_margin(p, cfg))


def wpo_weights(p: PairLogps) -> Tensor:
    """WPO (arXiv 2406.11827, eq. 2): exp(w_c + w_r), detached and not clamped (as TRL 1.x and the paper);
    w_* are the length-normalised, distribution-adjusted sequence log-probs from ``logprobs``."""
    if p.chosen_wpo_logw is None or p.rejected_wpo_logw is None:
        raise ValueError("use_weighting needs chosen_wpo_logw / rejected_wpo_logw in PairLogps")
    return torch.exp(p.chosen_wpo_logw + p.rejected_wpo_logw).detach()


def dpo_loss(
    p: PairLogps,
    params: LossParams,
    loss_type: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    use_weighting: bool = False,
    rpo_alpha: float | None = None,
) -> Tensor:
    """Per-pair combined loss, shape (B,): Σ_k w_k·loss_k.

    ``use_weighting`` multiplies every term, sft included, by the detached WPO weight (as TRL 1.x; TRL 0.x
    weighted the RPO term too). ``rpo_alpha`` appends ("sft", rpo_alpha) to the terms (RPO, arXiv
    2404.19733), so it is the same as ``loss_type=[..., "sft"]`` with weight rpo_alpha, under WPO too.
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
        if wpo is not None:
            per_pair = per_pair * wpo
        total = total + w * per_pair
    return total


def moe_aux_loss(loss: Tensor, aux_loss: Tensor | None, router_aux_loss_coef: float) -> Tensor:
    """loss + router_aux_loss_coef·aux (the MoE router load-balancing loss); ``loss`` when aux is None."""
    return loss if aux_loss is None else loss + router_aux_loss_coef * aux_loss.to(loss.dtype)


def pair_metrics(p: PairLogps, beta: float) -> dict[str, Tensor]:
    """The reward metrics (docs/training.md, "Metrics") for one batch, as detached 0-d tensors (no host
    sync)."""
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


def _token_weighted(out: dict[str, Tensor], name: str, per_seq: Tensor, n: Tensor) -> None:
    """out[name] = Σ per_seq·n / Σ n (0 without tokens, as TRL), and its weight Σ n for the worker
    reduction."""
    total = n.sum()
    out[name] = (per_seq.detach() * n).sum() / total.clamp(min=1)
    out[METRIC_WEIGHT + name] = total


def _token_accuracy(out: dict[str, Tensor], stats: SeqStats, rows: slice) -> None:
    """mean_token_accuracy: the fraction of the rows' completion tokens whose argmax is the label."""
    if stats.num_correct is None:
        return
    n = stats.num_tokens.detach()[rows]
    _token_weighted(out, "mean_token_accuracy", stats.num_correct[rows] / n.clamp(min=1), n)


def sequence_metrics(stats: SeqStats) -> dict[str, Tensor]:
    """Token-weighted ``entropy`` and ``mean_token_accuracy`` over every sequence (the SFT stage's metrics,
    as TRL's SFTTrainer logs them), detached 0-d tensors with their ``METRIC_WEIGHT`` entries."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        _token_weighted(out, "entropy", stats.entropy, stats.num_tokens.detach())
        _token_accuracy(out, stats, slice(None))
    return out


def batch_metrics(p: PairLogps, stats: SeqStats, beta: float,
                  attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Every per-batch metric the math knows, as detached 0-d tensors (no .item()).

    ``logits/*``, ``entropy`` and ``mean_token_accuracy`` (chosen completions only) are token-weighted means
    over the completion tokens, as TRL logs them; ``rewards/*`` and ``logps/*`` are means over pairs. Each
    carries its weight (tokens or pairs) under ``METRIC_WEIGHT + name``, so the reduction across workers
    weights them as TRL's gather does. ``num_tokens`` (a sum, like TRL's) counts the input tokens when
    ``attention_mask`` (2B, T) is given, else the completion tokens.
    """
    out = pair_metrics(p, beta)
    b = p.chosen_logps.shape[0]
    with torch.no_grad():
        pairs = torch.tensor(float(b), device=p.chosen_logps.device)
        out.update({METRIC_WEIGHT + k: pairs for k in list(out)})
        n = stats.num_tokens.detach()
        _token_weighted(out, "logits/chosen", stats.mean_logit[:b], n[:b])
        _token_weighted(out, "logits/rejected", stats.mean_logit[b:], n[b:])
        _token_weighted(out, "entropy", stats.entropy, n)
        _token_accuracy(out, stats, slice(0, b))
        out["num_tokens"] = (attention_mask.sum() if attention_mask is not None else n.sum()).float()
    return out
