"""The DPO loss family against hand-worked numbers and an independent float64 transcription of each
paper's formula (scalar ``math``, no torch), plus limits, gradient signs and the modifiers.

The worked batch used throughout (β = 0.5, ε = 0.1 where a loss uses it, τ = 0.05):

    pair            0      1      2
    c = π - π_ref   1.0   -1.0    0.5
    r = π - π_ref  -1.0    2.0    0.0
    d = c - r       2.0   -3.0    0.5      β·d = 1.0, -1.5, 0.25
    |y_w|, |y_l|    2, 4   4, 2   5, 5
    chosen NLL      5.0    3.0    1.6      (per-token mean; the sft token mean is 30/11)
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dpo_ray.logprobs import SeqStats
from dpo_ray.losses import (
    F_DIVERGENCES,
    LOSSES,
    METRIC_WEIGHT,
    LossParams,
    PairLogps,
    batch_metrics,
    canonical_loss_name,
    dpo_loss,
    moe_aux_loss,
    sequence_metrics,
    wpo_weights,
)

BETA, EPS, TAU = 0.5, 0.1, 0.05
C, R = [1.0, -1.0, 0.5], [-1.0, 2.0, 0.0]
CHOSEN_LEN, REJECTED_LEN = [2, 4, 5], [4, 2, 5]
CHOSEN_NLL = [5.0, 3.0, 1.6]


def make_pairs(c=C, r=R, chosen_len=CHOSEN_LEN, rejected_len=REJECTED_LEN, *, grad=False,
               ref_c=(-11.0, -11.0, -8.5), ref_r=(-13.0, -12.0, -9.0), **extra) -> PairLogps:
    """Pairs whose log-ratios are exactly c and r (policy = ref + ratio; all values exact in float32)."""
    ref_c, ref_r = torch.tensor(ref_c[: len(c)]), torch.tensor(ref_r[: len(r)])
    chosen = (ref_c + torch.tensor(c)).requires_grad_(grad)
    rejected = (ref_r + torch.tensor(r)).requires_grad_(grad)
    extra.setdefault("chosen_nll", torch.tensor(CHOSEN_NLL[: len(c)]))
    return PairLogps(chosen, rejected, ref_c, ref_r, torch.tensor(chosen_len, dtype=torch.float32),
                     torch.tensor(rejected_len, dtype=torch.float32), **extra)


# ------------------------------------------------------------------ an independent float64 reference

def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def pair_loss(name: str, c: float, r: float, c_len: int, r_len: int, nll: float, b: float, eps: float,
              tau: float) -> float:
    """One row of the loss table (docs/losses.md), in float64."""
    z = b * (c - r)
    d_bar = c / c_len - r / r_len  # length-averaged margin
    formulas = {
        "sigmoid": lambda: smoothed(z, eps),
        "hinge": lambda: max(0.0, 1 - z),
        "ipo": lambda: (d_bar - 1 / (2 * b)) ** 2,
        "exo_pair": lambda: sigmoid(z) * (log_sigmoid(z) - math.log(1 - eps))
        + sigmoid(-z) * (log_sigmoid(-z) - math.log(eps)),
        "nca_pair": lambda: -log_sigmoid(b * c) - 0.5 * log_sigmoid(-b * c) - 0.5 * log_sigmoid(-b * r),
        "robust": lambda: (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps),
        "bco_pair": lambda: -log_sigmoid(b * c) - log_sigmoid(-b * r),
        "sppo_hard": lambda: (c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2,
        "apo_zero": lambda: (1 - sigmoid(b * c)) + sigmoid(b * r),
        "apo_down": lambda: sigmoid(b * c) + (1 - sigmoid(z)),
        "discopop": lambda: (1 - sigmoid(z / tau)) * -log_sigmoid(z) + sigmoid(z / tau) * math.exp(-z),
        "sigmoid_norm": lambda: -log_sigmoid(b * d_bar),  # ε does not apply (TRL)
    }
    return formulas[name]()


def reference_losses(name: str, c, r, cl, rl, nll, b=BETA, eps=EPS, tau=TAU) -> list[float]:
    """Per-pair losses of a batch in float64 (aot, which also sorts reference gaps, has its own test)."""
    if name == "aot_unpaired":  # sort c and r separately across the batch
        return [smoothed(b * (ci - ri), eps) for ci, ri in zip(sorted(c), sorted(r))]
    if name == "sft":  # one token mean over all chosen tokens of the batch, the same for every pair
        return [sum(x * n for x, n in zip(nll, cl)) / sum(cl)] * len(c)
    return [pair_loss(name, *row, b, eps, tau) for row in zip(c, r, cl, rl, nll)]


PARAMS = LossParams(beta=BETA, label_smoothing=EPS, discopop_tau=TAU)


def per_pair(name: str, p: PairLogps, params: LossParams = PARAMS) -> torch.Tensor:
    return LOSSES[canonical_loss_name(name)].fn(p, params)


# ------------------------------------------------------------------ values

# (loss, worked per-pair values on the batch above, from the formula by hand)
WORKED = {
    # -(1-ε)logσ(βd) - ε·logσ(-βd); pair 0: 0.9·log(1+e^-1) + 0.1·log(1+e) = 0.9·0.31326 + 0.1·1.31326
    "sigmoid": [0.41326169, 1.55141328, 0.60093942],
    # relu(1 - βd): 1 - 1, 1 + 1.5, 1 - 0.25
    "hinge": [0.0, 2.5, 0.75],
    # (c/|y_w| - r/|y_l| - 1/(2β))²: (0.5 + 0.25 - 1)², (-0.25 - 1 - 1)², (0.1 - 0 - 1)²
    "ipo": [0.0625, 5.0625, 0.81],
    # (c - 1)² + (r + 1)²: 0 + 0, 4 + 9, 0.25 + 1
    "sppo_hard": [0.0, 13.0, 1.25],
    # (1-w)(-logσ(m)) + w·e^{-m}, w = σ(m/τ); m = 1 gives w ≈ 1 - 2e-9, so ≈ e^{-1} = 0.36788
    "discopop": [0.36787944, 1.70141328, 0.77744306],
    # -logσ(βc) - logσ(-βr): pair 0: log(1+e^-0.5) + log(1+e^-0.5) = 2·0.47408
    "bco_pair": [0.94815397, 2.28733867, 1.26908660],
    # σ(βc) + 1 - σ(βd): pair 2: σ(0.25) + 1 - σ(0.25) = 1
    "apo_down": [0.89140075, 1.19511514, 1.0],
}


@pytest.mark.parametrize("name", sorted(WORKED))
def test_worked_values(name):
    got = per_pair(name, make_pairs())
    torch.testing.assert_close(got, torch.tensor(WORKED[name]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"aot"}))
def test_every_loss_matches_float64_formula(name):
    """Every registered loss (aot has its own test) equals the loss table's formula (docs/losses.md) written
    out in float64."""
    got = per_pair(name, make_pairs())
    want = reference_losses(name, C, R, CHOSEN_LEN, REJECTED_LEN, CHOSEN_NLL)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_every_loss_matches_formula_on_random_pairs():
    """Same check on 16 random pairs and several β, ε (guards against a formula fitting only the worked
    batch)."""
    gen = random.Random(0)
    for b, eps in [(0.1, 0.001), (1.0, 0.3), (2.5, 0.0)]:
        c = [gen.uniform(-8, 8) for _ in range(16)]
        r = [gen.uniform(-8, 8) for _ in range(16)]
        cl = [gen.randint(1, 50) for _ in range(16)]
        rl = [gen.randint(1, 50) for _ in range(16)]
        nll = [gen.uniform(0, 5) for _ in range(16)]
        p = PairLogps(torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                      torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64),
                      torch.tensor(cl, dtype=torch.float64), torch.tensor(rl, dtype=torch.float64),
                      chosen_nll=torch.tensor(nll, dtype=torch.float64))
        params = LossParams(beta=b, label_smoothing=eps, discopop_tau=TAU)
        for name in sorted(set(LOSSES) - {"aot"}):
            if name == "exo_pair" and eps == 0:
                continue  # log ε: a config error (test_config)
            want = reference_losses(name, c, r, cl, rl, nll, b=b, eps=eps)
            torch.testing.assert_close(per_pair(name, p, params), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-9, atol=1e-9, msg=f"{name} at beta={b} eps={eps}")


def test_label_smoothing_is_cdpo_on_sigmoid():
    """ε = 0: plain DPO; ε = 1: DPO with labels flipped; ε = ½: symmetric in d (no preference)."""
    p, flipped = make_pairs(), make_pairs(c=R, r=C, chosen_len=REJECTED_LEN, rejected_len=CHOSEN_LEN)
    plain = per_pair("sigmoid", p, LossParams(beta=BETA))
    torch.testing.assert_close(plain, torch.tensor([0.31326169, 1.70141328, 0.57593942]))
    torch.testing.assert_close(per_pair("sigmoid", p, LossParams(beta=BETA, label_smoothing=1.0)),
                               per_pair("sigmoid", flipped, LossParams(beta=BETA)))
    half = LossParams(beta=BETA, label_smoothing=0.5)
    torch.testing.assert_close(per_pair("sigmoid", p, half), per_pair("sigmoid", flipped, half))


def test_robust_is_unbiased_under_label_noise():
    """Robust DPO's defining property: E over a flip with probability ε of robust(±d) = -logσ(βd)."""
    p, flipped = make_pairs(), make_pairs(c=R, r=C, chosen_len=REJECTED_LEN, rejected_len=CHOSEN_LEN)
    for eps in (0.0, 0.1, 0.3, 0.49):
        params = LossParams(beta=BETA, label_smoothing=eps)
        expected = (1 - eps) * per_pair("robust", p, params) + eps * per_pair("robust", flipped, params)
        torch.testing.assert_close(expected, per_pair("sigmoid", p, LossParams(beta=BETA)), rtol=1e-4,
                                   atol=1e-5)


# ------------------------------------------------------------------ limits

def test_zero_margin():
    """At c = r = 0: sigmoid/robust/cDPO = log 2, hinge = 1, discopop = ½·log 2 + ½, apo_zero = 1,
    exo = ½(log ½ - log(1-ε)) + ½(log ½ - log ε), bco = 2·log 2, sppo = 2·(1/(2β))²."""
    z = make_pairs(c=[0.0], r=[0.0], chosen_len=[3], rejected_len=[3])
    ln2 = math.log(2)
    expected = {
        "sigmoid": ln2, "robust": ln2, "hinge": 1.0, "discopop": 0.5 * ln2 + 0.5, "apo_zero": 1.0,
        "apo_down": 1.0, "bco_pair": 2 * ln2, "nca_pair": 2 * ln2, "sigmoid_norm": ln2, "ipo": 1.0,
        "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - EPS)) + 0.5 * (math.log(0.5) - math.log(EPS)),
        "sppo_hard": 2.0,
    }
    for name, want in expected.items():
        assert per_pair(name, z).item() == pytest.approx(want, rel=1e-6), name


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"sft"}))
def test_large_margins_stay_finite(name):
    """|d| = 10⁴ in float32: no inf/NaN in values or gradients (exp() of log-ratios is capped)."""
    for div in F_DIVERGENCES if LOSSES[name].takes_f_divergence else ("reverse_kl",):
        p = make_pairs(c=[5e3, -5e3, 3e3], r=[-5e3, 5e3, 1e3], grad=True)
        params = LossParams(beta=BETA, label_smoothing=EPS, f_divergence_type=div)
        loss = per_pair(name, p, params)
        loss.sum().backward()
        assert torch.isfinite(loss).all(), (name, div, loss)
        assert torch.isfinite(p.chosen_logps.grad).all() and torch.isfinite(p.rejected_logps.grad).all()


def test_large_margin_asymptotes():
    """βd → +∞: sigmoid → 0, hinge = 0, exo → -log(1-ε); βd → -∞: sigmoid ≈ β|d| (linear), exo → -log ε."""
    big = make_pairs(c=[500.0], r=[-500.0], chosen_len=[1], rejected_len=[1])
    small = make_pairs(c=[-500.0], r=[500.0], chosen_len=[1], rejected_len=[1])
    plain = LossParams(beta=BETA)
    assert per_pair("sigmoid", big, plain).item() == pytest.approx(0.0, abs=1e-30)
    assert per_pair("hinge", big).item() == 0.0
    assert per_pair("sigmoid", small, plain).item() == pytest.approx(500.0, rel=1e-6)
    assert per_pair("exo_pair", big).item() == pytest.approx(-math.log(1 - EPS), rel=1e-5)
    assert per_pair("exo_pair", small).item() == pytest.approx(-math.log(EPS), rel=1e-5)


def test_epsilon_edges():
    """exo at ε = 1e-3 (the paper's value) is finite; robust at ε → ½ is finite, at ε = 0 equals sigmoid."""
    p = make_pairs()
    assert torch.isfinite(per_pair("exo_pair", p, LossParams(beta=BETA, label_smoothing=1e-3))).all()
    assert torch.isfinite(per_pair("robust", p, LossParams(beta=BETA, label_smoothing=0.499))).all()
    torch.testing.assert_close(per_pair("robust", p, LossParams(beta=BETA)),
                               per_pair("sigmoid", p, LossParams(beta=BETA)))


# ------------------------------------------------------------------ gradients

# Test point with |βd| ≥ 0.5 (DiscoPOP is non-monotone near d = 0), small c and r (so IPO, SPPO and NCA
# are below their targets), ε = 0.1 (EXO pushes d up while βd < log((1-ε)/ε) = 2.2).
GRAD_C, GRAD_R = [0.4, -0.6, 0.3], [-0.8, 0.5, -0.9]
PUSHES_CHOSEN_UP = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                    "aot", "aot_unpaired", "apo_zero", "discopop", "sigmoid_norm"}
# apo_down by design may push the chosen log-prob down (σ(βc) term); it still pushes the rejected one down.
PUSHES_REJECTED_DOWN = PUSHES_CHOSEN_UP | {"apo_down"}


@pytest.mark.parametrize("name", sorted(PUSHES_REJECTED_DOWN))
def test_gradient_signs(name):
    """Descent raises the chosen log-probs (∂L/∂π_w < 0) and lowers the rejected ones (∂L/∂π_l > 0)."""
    p = make_pairs(c=GRAD_C, r=GRAD_R, grad=True)
    per_pair(name, p).sum().backward()
    if name in PUSHES_CHOSEN_UP:
        assert (p.chosen_logps.grad < 0).all(), (name, p.chosen_logps.grad)
    assert (p.rejected_logps.grad > 0).all(), (name, p.rejected_logps.grad)


def test_registered_losses_all_have_a_gradient_test():
    assert PUSHES_REJECTED_DOWN | {"sft"} == set(LOSSES)


def test_sft_is_one_token_mean_over_the_batch_and_needs_the_nll():
    """(2·5.0 + 4·3.0 + 5·1.6) / 11 = 30/11 for every pair (a mean of per-sequence means would give 3.2)."""
    torch.testing.assert_close(per_pair("sft", make_pairs()), torch.full((3,), 30 / 11))
    p = make_pairs(chosen_nll=torch.tensor(CHOSEN_NLL, requires_grad=True))
    per_pair("sft", p).mean().backward()  # each token of the batch weighs 1/11: d/d nll_i = n_i / 11
    torch.testing.assert_close(p.chosen_nll.grad, torch.tensor(CHOSEN_LEN) / 11)
    with pytest.raises(ValueError, match="chosen_nll"):
        per_pair("sft", make_pairs(chosen_nll=None))


# ------------------------------------------------------------------ AOT sorting semantics

def test_aot_sorts_policy_and_reference_gaps_separately():
    """AOT: sigmoid loss on sort(π_w - π_l) - sort(ref_w - ref_l), each sorted across the batch.

    policy gaps [-10-(-14), -12-(-10), -8-(-9)] = [4, -2, 1] → sorted [-2, 1, 4];
    reference gaps [-11-(-13), -11-(-12), -8.5-(-9)] = [2, 1, 0.5] → sorted [0.5, 1, 2];
    differences [-2.5, 0, 2] (unsorted pairing would give [2, -3, 0.5]).
    """
    got = per_pair("aot", make_pairs())
    want = [smoothed(BETA * x, EPS) for x in (-2.5, 0.0, 2.0)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_aot_equals_sigmoid_when_orders_agree():
    """When the policy and reference gaps rank the pairs the same way, sorting pairs them as they are."""
    p = make_pairs(c=[1.0, 2.0, 3.0], r=[0.0, 0.0, 0.0], ref_c=(0.0, 1.0, 2.0), ref_r=(0.0, 0.0, 0.0))
    torch.testing.assert_close(per_pair("aot", p).sort().values, per_pair("sigmoid", p).sort().values)


def test_aot_unpaired_ignores_which_rejected_goes_with_which_chosen():
    """aot_unpaired sorts c and r on their own, so shuffling the rejected side leaves the loss unchanged
    (the worked batch: sort(c) = [-1, 0.5, 1], sort(r) = [-1, 0, 2], differences [0, 0.5, -1])."""
    p = make_pairs()
    want = [smoothed(BETA * x, EPS) for x in (0.0, 0.5, -1.0)]
    torch.testing.assert_close(per_pair("aot_unpaired", p).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    shuffled = make_pairs(r=[R[2], R[0], R[1]], ref_r=(-9.0, -13.0, -12.0))
    torch.testing.assert_close(per_pair("aot_unpaired", shuffled), per_pair("aot_unpaired", p))
    assert canonical_loss_name("aot_pair") == "aot_unpaired"
    assert not torch.allclose(per_pair("aot_unpaired", p), per_pair("aot", p))


# ------------------------------------------------------------------ combining and modifiers

def test_multi_loss_is_the_weighted_sum():
    p = make_pairs()
    got = dpo_loss(p, PARAMS, ["sigmoid", "hinge", "ipo"], [1.0, 0.5, 2.0])
    want = per_pair("sigmoid", p) + 0.5 * per_pair("hinge", p) + 2.0 * per_pair("ipo", p)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dpo_loss(p, PARAMS, ["sigmoid", "bco_pair"]),
                               per_pair("sigmoid", p) + per_pair("bco_pair", p))
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(p, PARAMS, ["sigmoid", "hinge"], [1.0])


@pytest.mark.parametrize("use_weighting", [False, True])
def test_rpo_alpha_equals_sigmoid_plus_weighted_sft(use_weighting):
    """rpo_alpha = 0.7 ≡ loss_type [sigmoid, sft], loss_weights [1, 0.7], with or without WPO."""
    p = make_pairs(chosen_wpo_logw=torch.tensor([-0.2, -0.5, -1.0]),
                   rejected_wpo_logw=torch.tensor([-0.3, -0.1, -2.0]))
    rpo = dpo_loss(p, PARAMS, ["sigmoid"], use_weighting=use_weighting, rpo_alpha=0.7)
    both = dpo_loss(p, PARAMS, ["sigmoid", "sft"], [1.0, 0.7], use_weighting=use_weighting)
    torch.testing.assert_close(rpo, both)
    weight = wpo_weights(p) if use_weighting else 1.0  # WPO weighs the sft term too (TRL)
    torch.testing.assert_close(rpo, weight * (per_pair("sigmoid", p) + 0.7 * 30 / 11))


def test_wpo_weight_value_and_no_gradient():
    """weight = exp(w_c + w_r), not clamped (TRL 1.x, the WPO paper): pair 0 exp(-0.5) = 0.60653,
    pair 1 exp(-0.6) = 0.54881, pair 2 exp(+0.5) = 1.64872. The weight is a constant for autograd."""
    wc = torch.tensor([-0.2, -0.5, 0.3], requires_grad=True)
    wr = torch.tensor([-0.3, -0.1, 0.2], requires_grad=True)
    p = make_pairs(grad=True, chosen_wpo_logw=wc, rejected_wpo_logw=wr)
    torch.testing.assert_close(wpo_weights(p), torch.tensor([0.60653066, 0.54881164, 1.64872127]))
    loss = dpo_loss(p, PARAMS, ["sigmoid"], use_weighting=True)
    torch.testing.assert_close(loss, wpo_weights(p) * per_pair("sigmoid", p))
    loss.sum().backward()
    assert wc.grad is None and wr.grad is None
    assert p.chosen_logps.grad is not None
    with pytest.raises(ValueError, match="use_weighting"):
        dpo_loss(make_pairs(), PARAMS, ["sigmoid"], use_weighting=True)


def f_prime(kind: str, u: float, alpha: float) -> float:
    """f-DPO (arXiv 2309.16240) scores f'(u), u = π/π_ref = e^{log-ratio}, shifted so that f'(1) = 0 (TRL
    1.x): reverse KL log u; forward KL 1 - 1/u; JS log(2u/(1+u)); α-divergence (u^(α-1) - 1)/(α-1)."""
    return {
        "reverse_kl": lambda: math.log(u),
        "forward_kl": lambda: 1 - 1 / u,
        "js_divergence": lambda: math.log(2 * u / (1 + u)),
        "alpha_divergence": lambda: (u ** (alpha - 1) - 1) / (alpha - 1),
    }[kind]()


def f_margin(kind: str, c: float, r: float, alpha: float) -> float:
    return f_prime(kind, math.exp(c), alpha) - f_prime(kind, math.exp(r), alpha)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.7])
@pytest.mark.parametrize("kind", F_DIVERGENCES)
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "discopop", "exo_pair", "robust"])
def test_f_divergences_replace_the_margin(kind, name, alpha):
    """Each f-divergence's margin from f' directly, fed to the margin losses."""
    params = LossParams(beta=BETA, label_smoothing=EPS, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    got = per_pair(name, make_pairs(), params)
    margins = [f_margin(kind, c, r, alpha) for c, r in zip(C, R)]
    # feed the f-margin through the plain loss by building pairs with c = d_f, r = 0
    want = per_pair(name, make_pairs(c=margins, r=[0.0] * 3), LossParams(beta=BETA, label_smoothing=EPS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.7])
@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_f_divergences_length_average_the_scores_in_ipo_and_sigmoid_norm(kind, alpha):
    """IPO and sigmoid_norm divide each side's score f'(e^u) by its length (TRL's order), so the shift
    f'(1) = 0 matters: d̄ = f'(e^c)/|y_w| - f'(e^r)/|y_l|. Pair 0 under forward KL:
    (1 - e^{-1})/2 - (1 - e)/4 = 0.31606 + 0.42957 = 0.74563."""
    params = LossParams(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    d_bar = [f_prime(kind, math.exp(c), alpha) / cl - f_prime(kind, math.exp(r), alpha) / rl
             for c, r, cl, rl in zip(C, R, CHOSEN_LEN, REJECTED_LEN)]
    want_ipo = [(x - 1 / (2 * BETA)) ** 2 for x in d_bar]
    want_norm = [-log_sigmoid(BETA * x) for x in d_bar]
    p = make_pairs()
    torch.testing.assert_close(per_pair("ipo", p, params).double(),
                               torch.tensor(want_ipo, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_pair("sigmoid_norm", p, params).double(),
                               torch.tensor(want_norm, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    if kind == "forward_kl":
        assert d_bar[0] == pytest.approx(0.74563, abs=1e-5)


def test_f_divergence_special_cases():
    """α-divergence at α = 1 is reverse KL (plain DPO; TRL's limit), tends to it as α → 1, and at α = 0
    is forward KL. A pre-1.0 α (score (1 - e^{-αu})/α) is the TRL 1.x α' = 1 - α."""
    p = make_pairs()
    plain = per_pair("sigmoid", p, LossParams(beta=BETA))
    fwd = per_pair("sigmoid", p, LossParams(beta=BETA, f_divergence_type="forward_kl"))

    def alpha_div(a):
        return per_pair("sigmoid", p, LossParams(beta=BETA, f_divergence_type="alpha_divergence",
                                                 f_alpha_divergence_coef=a))

    torch.testing.assert_close(alpha_div(1.0), plain)
    torch.testing.assert_close(alpha_div(1.0 - 1e-3), plain, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(alpha_div(0.0), fwd)
    old_alpha = 0.3
    old_margin = [(math.exp(-old_alpha * r) - math.exp(-old_alpha * c)) / old_alpha for c, r in zip(C, R)]
    old = per_pair("sigmoid", make_pairs(c=old_margin, r=[0.0] * 3), LossParams(beta=BETA))
    torch.testing.assert_close(alpha_div(1 - old_alpha), old, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="f_divergence_type"):
        per_pair("sigmoid", p, LossParams(f_divergence_type="hellinger"))


def test_sft_ignores_the_f_divergence():
    params = LossParams(beta=BETA, f_divergence_type="js_divergence")
    torch.testing.assert_close(per_pair("sft", make_pairs(), params), per_pair("sft", make_pairs()))


def test_moe_aux_loss():
    loss = torch.tensor(1.5)
    assert moe_aux_loss(loss, None, 0.01) is loss
    assert moe_aux_loss(loss, torch.tensor(2.0), 0.01).item() == pytest.approx(1.52)


# ------------------------------------------------------------------ metrics

def test_metric_names_are_the_averaged_metrics_a_step_logs():
    """config.METRIC_NAMES (what metric_for_best_model may name) is exactly what a DPO step logs as a mean:
    batch_metrics' averaged entries (those with a reduction weight), plus the step's loss and the MoE aux_loss
    (train/steps.py); num_tokens is a sum and num_pairs a count, so neither may rank checkpoints."""
    from dpo_ray.config import METRIC_NAMES

    stats = SeqStats(logps=torch.tensor([-10.0, -12.0]), num_tokens=torch.tensor([2.0, 4.0]),
                     nll_mean=torch.tensor([5.0, 3.0]), mean_logit=torch.tensor([1.0, 4.0]),
                     entropy=torch.tensor([0.5, 1.0]), num_correct=torch.tensor([1.0, 3.0]))
    m = batch_metrics(PairLogps.from_stats(stats, torch.tensor([-11.0]), torch.tensor([-13.0])), stats, BETA)
    averaged = {k.removeprefix(METRIC_WEIGHT) for k in m if k.startswith(METRIC_WEIGHT)}
    assert averaged | {"loss", "aux_loss"} == set(METRIC_NAMES)
    assert set(sequence_metrics(stats)) - {METRIC_WEIGHT + k for k in METRIC_NAMES} <= set(METRIC_NAMES)


def test_pairs_from_stats_and_batch_metrics():
    """2 pairs; rewards are β·c = 0.5·[1, -1] and β·r = 0.5·[-1, 2]; logits/* are token-weighted."""
    stats = SeqStats(
        logps=torch.tensor([-10.0, -12.0, -14.0, -10.0]),
        num_tokens=torch.tensor([2.0, 4.0, 4.0, 2.0]),
        nll_mean=torch.tensor([5.0, 3.0, 3.5, 5.0]),
        mean_logit=torch.tensor([1.0, 4.0, -2.0, 1.0]),
        entropy=torch.tensor([0.5, 1.0, 2.0, 3.0]),
        num_correct=torch.tensor([1.0, 3.0, 2.0, 0.0]),
        wpo_logw=torch.tensor([-0.1, -0.2, -0.3, -0.4]),
    )
    p = PairLogps.from_stats(stats, torch.tensor([-11.0, -11.0]), torch.tensor([-13.0, -12.0]))
    torch.testing.assert_close(p.chosen_logratios, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(p.rejected_logratios, torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(p.rejected_wpo_logw, torch.tensor([-0.3, -0.4]))
    torch.testing.assert_close(p.chosen_nll, torch.tensor([5.0, 3.0]))
    m = batch_metrics(p, stats, BETA)
    expected = {
        "rewards/chosen": 0.0, "rewards/rejected": 0.25, "rewards/accuracies": 0.5, "rewards/margins": -0.25,
        "logps/chosen": -11.0, "logps/rejected": -12.0,
        "logits/chosen": (2 * 1.0 + 4 * 4.0) / 6, "logits/rejected": (4 * -2.0 + 2 * 1.0) / 6,
        "entropy": (2 * 0.5 + 4 * 1.0 + 4 * 2.0 + 2 * 3.0) / 12, "num_tokens": 12.0,
        "mean_token_accuracy": (1 + 3) / 6,  # chosen completions only, token-weighted
    }
    # each averaged metric carries its weight for the cross-worker reduction: pairs or tokens
    weights = {k: 2.0 for k in expected if k.startswith(("rewards/", "logps/"))}
    weights.update({"logits/chosen": 6.0, "logits/rejected": 6.0, "entropy": 12.0,
                    "mean_token_accuracy": 6.0})
    expected.update({METRIC_WEIGHT + k: w for k, w in weights.items()})
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].dim() == 0 and not m[k].requires_grad, k
        assert m[k].item() == pytest.approx(v), k
    seq = sequence_metrics(stats)  # the SFT stage's: over every sequence
    assert seq["mean_token_accuracy"].item() == pytest.approx(6 / 12)
    assert seq["entropy"].item() == pytest.approx(expected["entropy"])
    assert seq[METRIC_WEIGHT + "mean_token_accuracy"].item() == 12.0
    mask = torch.ones(4, 7)
    assert batch_metrics(p, stats, BETA, attention_mask=mask)["num_tokens"].item() == 28.0
    free = PairLogps.from_stats(stats)  # reference-free: zeros
    torch.testing.assert_close(free.ref_chosen_logps, torch.zeros(2))
