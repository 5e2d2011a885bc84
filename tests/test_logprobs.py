"""Per-sequence completion statistics against a naive float64 log_softmax + gather.

Tolerances: float32 logits match the float64 reference to 1e-5 relative (sums over ≤ 24 tokens);
bfloat16 logits are compared with the float64 reference on the *same* bf16 values, to 1e-4 relative:
the chunked path upcasts to float32 before log-softmax, so only float32 rounding remains (a bf16
log-softmax would be off by ~1e-2 per token).
"""

from __future__ import annotations

import pytest
import torch

from dpo_ray.logprobs import SeqStats, completion_logps, completion_logps_from_hidden

N, T, V, H = 4, 24, 97, 16  # 2 pairs: rows 0, 1 chosen; rows 2, 3 rejected


def make_batch(seed: int = 0, spans=((5, 20), (3, 9), (6, 24), (10, 13))):
    """Right-padded ids with completion_mask = 1 on [start, end) of each row (prompt before, pad after)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, (a, b) in enumerate(spans):
        mask[i, a:b] = 1
    return ids, mask, g


def naive(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token float64 quantities at the completion positions, and per-sequence sums/means."""
    lg = logits.detach().double()[:, :-1]  # (N, T-1, V): logits at t-1 score the token at t
    labels, m = ids[:, 1:], mask[:, 1:].double()
    logp_all = torch.log_softmax(lg, -1)
    tok = logp_all.gather(-1, labels[..., None]).squeeze(-1)  # (N, T-1)
    n = m.sum(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    wpo = tok - torch.logsumexp(2 * logp_all, -1)
    correct = (lg.argmax(-1) == labels).double()
    return {
        "tok": tok * m, "logps": (tok * m).sum(-1), "num_tokens": n, "nll_mean": -(tok * m).sum(-1) / n,
        "entropy": (ent * m).sum(-1) / n, "mean_logit": (lg.mean(-1) * m).sum(-1) / n,
        "wpo_logw": (wpo * m).sum(-1) / n, "num_correct": (correct * m).sum(-1),
    }


def check(stats: SeqStats, want: dict, rtol: float, atol: float = 1e-5):
    for key in ("logps", "num_tokens", "nll_mean", "entropy", "mean_logit", "num_correct"):
        got = getattr(stats, key)
        assert got.dtype == torch.float32 and got.shape == (N,), key
        torch.testing.assert_close(got.double(), want[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_matches_naive_float32(chunk_tokens):
    ids, mask, g = make_batch()
    logits = torch.randn(N, T, V, generator=g) * 3
    stats = completion_logps(logits, ids, mask, want_wpo=True, chunk_tokens=chunk_tokens)
    want = naive(logits, ids, mask)
    check(stats, want, rtol=1e-5)
    torch.testing.assert_close(stats.wpo_logw.double(), want["wpo_logw"], rtol=1e-5, atol=1e-5)
    assert stats.logps_shared is None and stats.logps_tail is None
    torch.testing.assert_close(stats.num_tokens, torch.tensor([15.0, 6.0, 18.0, 3.0]))


def test_matches_naive_bfloat16_with_float32_accumulation():
    ids, mask, g = make_batch(seed=1)
    logits = (torch.randn(N, T, V, generator=g) * 3).bfloat16()
    stats = completion_logps(logits, ids, mask, chunk_tokens=5)
    check(stats, naive(logits, ids, mask), rtol=1e-4, atol=1e-4)


def test_gradient_matches_naive():
    ids, mask, g = make_batch(seed=2)
    logits = torch.randn(N, T, V, generator=g, requires_grad=True)
    stats = completion_logps(logits, ids, mask, chunk_tokens=6)
    (stats.logps.sum() + 2 * stats.nll_mean.sum()).backward()
    ref = logits.detach().clone().requires_grad_()
    lp = torch.log_softmax(ref[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    (lp.sum() - 2 * (lp.sum(-1) / mask[:, 1:].sum(-1)).sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_extras_are_detached_and_logps_carry_grad():
    ids, mask, g = make_batch()
    logits = torch.randn(N, T, V, generator=g, requires_grad=True)
    s = completion_logps(logits, ids, mask, want_wpo=True)
    assert s.logps.requires_grad and s.nll_mean.requires_grad
    assert not (s.entropy.requires_grad or s.mean_logit.requires_grad or s.wpo_logw.requires_grad)
    assert completion_logps(logits, ids, mask).wpo_logw is None


def test_only_completion_tokens_after_position_zero_count():
    """A completion token at position 0 has no logits before it; padding and prompt never count."""
    ids, _, g = make_batch()
    mask = torch.zeros(N, T, dtype=torch.long)
    mask[0, :4] = 1  # position 0 cannot be scored: 3 tokens
    mask[2, 7] = 1
    logits = torch.randn(N, T, V, generator=g)
    s = completion_logps(logits, ids, mask)
    torch.testing.assert_close(s.num_tokens, torch.tensor([3.0, 0.0, 1.0, 0.0]))
    assert s.logps[1] == 0 and s.nll_mean[1] == 0 and s.entropy[1] == 0  # an empty row is zeros, not NaN
    torch.testing.assert_close(s.logps.double(), naive(logits, ids, mask)["logps"])


# ------------------------------------------------------------------ the hidden-state path

@pytest.mark.parametrize("bias", [False, True])
def test_hidden_path_equals_logits_path(bias):
    """Values and gradients (w.r.t. hidden states, head weight and bias) of both paths agree."""
    ids, mask, g = make_batch(seed=3)
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    params = [hidden, weight] + ([b] if bias else [])

    def grads(stats):
        return torch.autograd.grad(stats.logps.sum() + 0.5 * stats.nll_mean.sum(), params)

    kw = {"ld_alpha": 0.4, "want_wpo": True}
    full = completion_logps(torch.nn.functional.linear(hidden, weight, b), ids, mask, **kw)
    lean = completion_logps_from_hidden(hidden, weight, ids, mask, lm_head_bias=b, chunk_tokens=5, **kw)
    for key in ("logps", "num_tokens", "nll_mean", "mean_logit", "entropy", "logps_shared", "logps_tail",
                "wpo_logw", "num_correct"):
        torch.testing.assert_close(getattr(lean, key), getattr(full, key), rtol=1e-5, atol=1e-5, msg=key)
    for g_lean, g_full in zip(grads(lean), grads(full)):
        torch.testing.assert_close(g_lean, g_full, rtol=1e-5, atol=1e-5)


def _saved_tensors(fn) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_no_vocab_sized_float32_kept_for_backward():
    """The autograd graph keeps no float32 (·, V) tensor: chunks are recomputed in backward."""
    ids, mask, g = make_batch()
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    saved = _saved_tensors(lambda: completion_logps_from_hidden(hidden, weight, ids, mask, chunk_tokens=8))
    assert saved and all(t.shape[-1] != V for t in saved)  # not even the (chunk, V) logits
    logits = torch.randn(N, T, V, generator=g).bfloat16().requires_grad_()
    saved = _saved_tensors(lambda: completion_logps(logits, ids, mask, chunk_tokens=8))
    assert all(not (t.dtype == torch.float32 and t.shape[-1] == V) for t in saved)


def test_no_grad_mode():
    ids, mask, g = make_batch()
    hidden, weight = torch.randn(N, T, H, generator=g), torch.randn(V, H, generator=g)
    with torch.no_grad():
        s = completion_logps_from_hidden(hidden, weight, ids, mask, chunk_tokens=4)
    assert not s.logps.requires_grad
    torch.testing.assert_close(s.logps.double(), naive(hidden @ weight.T, ids, mask)["logps"], rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------ LD-DPO and WPO

def test_ld_dpo_splits_at_the_shorter_completion():
    """Completion lengths: chosen [15, 6], rejected [18, 3] -> shared lengths [15, 3] per pair.

    Row 0 (15 tokens, pair 0): all shared; row 2 (18): first 15 shared, 3 tail;
    row 1 (6, pair 1): first 3 shared, 3 tail; row 3 (3): all shared.
    """
    ids, mask, g = make_batch()
    logits = torch.randn(N, T, V, generator=g, requires_grad=True)
    alpha = 0.3
    s = completion_logps(logits, ids, mask, ld_alpha=alpha)
    tok = naive(logits, ids, mask)["tok"]  # (N, T-1), zeros off the completion
    starts = [4, 2, 5, 9]  # first completion index in the shifted (T-1) frame: spans' start - 1
    shared_len = [15, 3, 15, 3]
    shared = torch.stack([tok[i, starts[i]:starts[i] + shared_len[i]].sum() for i in range(N)])
    tail = tok.sum(-1) - shared
    torch.testing.assert_close(s.logps_shared.double(), shared, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.logps_tail.double(), tail, rtol=1e-5, atol=1e-5)
    assert s.logps_tail[0] == 0 and s.logps_tail[3] == 0
    torch.testing.assert_close(s.logps, s.logps_shared + alpha * s.logps_tail)
    # nll_mean stays the plain, unweighted token mean
    torch.testing.assert_close(s.nll_mean.double(), naive(logits, ids, mask)["nll_mean"], rtol=1e-5,
                               atol=1e-5)
    # α = 1 is plain DPO; α = 0 keeps only the shared prefix
    torch.testing.assert_close(completion_logps(logits, ids, mask, ld_alpha=1.0).logps,
                               completion_logps(logits, ids, mask).logps)
    torch.testing.assert_close(completion_logps(logits, ids, mask, ld_alpha=0.0).logps, s.logps_shared)


def test_ld_dpo_scales_tail_gradients_by_alpha():
    ids, mask, g = make_batch()
    logits = torch.randn(N, T, V, generator=g, requires_grad=True)
    (plain,) = torch.autograd.grad(completion_logps(logits, ids, mask).logps[2], logits)
    (ld,) = torch.autograd.grad(completion_logps(logits, ids, mask, ld_alpha=0.3).logps[2], logits)
    # row 2's completion tokens sit at positions 6..23, scored by logits 5..22; the tail is the last 3
    torch.testing.assert_close(ld[2, 5:20], plain[2, 5:20])
    torch.testing.assert_close(ld[2, 20:23], 0.3 * plain[2, 20:23])


def test_ld_dpo_needs_pairs():
    ids, mask, g = make_batch()
    with pytest.raises(ValueError, match="even"):
        completion_logps(torch.randn(N - 1, T, V, generator=g), ids[:-1], mask[:-1], ld_alpha=0.5)


def test_wpo_and_entropy_on_a_hand_example():
    """V = 2, one scored token with logits [0, log 3]: p = [¼, ¾], Σp² = 10/16.

    WPO, label 1: log ¾ - log(10/16) = log(6/5); label 0: log ¼ - log(10/16) = log(2/5).
    entropy = -(¼·log ¼ + ¾·log ¾) = 0.562335; mean logit = log(3)/2 = 0.549306.
    """
    logits = torch.zeros(1, 2, 2)
    logits[0, 0, 1] = torch.tensor(3.0).log()
    mask = torch.tensor([[0, 1]])
    for label, want in [(1, 6 / 5), (0, 2 / 5)]:
        s = completion_logps(logits, torch.tensor([[0, label]]), mask, want_wpo=True)
        torch.testing.assert_close(s.wpo_logw, torch.tensor([want]).log())
        torch.testing.assert_close(s.entropy, torch.tensor([0.562335]))
        torch.testing.assert_close(s.mean_logit, torch.tensor([0.549306]))
        assert s.num_correct.item() == float(label == 1)  # label 1 is the argmax


def test_num_correct_counts_argmax_hits_on_completion_tokens_only():
    """Row 0 scores 3 completion tokens (positions 2-4): logits at 1 and 3 put the max on the label, at 2
    on another token; the prompt position 0 hits too but is not a completion token. A tie counts for the
    first maximal index only (TRL's is_top1): the tie at position 3 of row 1 is won by token 0, not the label
    2."""
    v = 5
    ids = torch.tensor([[1, 2, 3, 4, 0], [0, 1, 2, 3, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    logits = torch.zeros(2, 5, v)
    # hits at positions 1 and 3 score tokens 3 and 0
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 3, 0] = 5.0
    logits[0, 2, 1] = 5.0  # position 2 scores token 4 but puts the max on 1: a miss
    logits[1, 2, 3] = 5.0  # hit (scores token 3)
    logits[1, 3, 0] = logits[1, 3, 2] = 5.0  # tie between 0 and 2; the label 2 loses it
    for fn in (completion_logps, lambda *a: completion_logps(*a, chunk_tokens=1)):
        s = fn(logits, ids, mask)
        torch.testing.assert_close(s.num_correct, torch.tensor([2.0, 1.0]))
        torch.testing.assert_close(s.num_tokens, torch.tensor([3.0, 2.0]))
        assert not s.num_correct.requires_grad
