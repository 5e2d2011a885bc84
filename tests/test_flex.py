"""Prefix sharing's block-sparse path (dpo_ray.flex): FlexAttention's BlockMask instead of a dense 4-D mask.

CPU, eager FlexAttention (its reference implementation): the packed flex forward must give the standard
layout's log-probs (gradients need a GPU: torch 2.13 has no CPU backward for it, so the policy falls back to
dense there, tested here; tests/test_gpu.py compares flex gradients on the GPU); ``prefix_attention`` selects
it; ``auto`` times the layouts when asked and records why it chose; where FlexAttention cannot run, the
selection falls back to dense with the reason."""

from __future__ import annotations

import pytest
import torch
from helpers import random_pairs, tiny_llama

from dpo_ray import flex, prefix
from dpo_ray.config import DPOConfig
from dpo_ray.forward import sequence_forward
from dpo_ray.sharing import PrefixSharing

VOCAB = 64
pytestmark = pytest.mark.skipif(not flex.available()[0], reason=flex.available()[1] or "flex available")


def pairs(b: int = 3, t: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_pairs(VOCAB, b, t, seed)


def model(**kw):
    return tiny_llama(VOCAB, 0, **kw).train()  # no dropout in the tiny Llama: train mode is deterministic


@pytest.mark.parametrize("lean", [True, False])
def test_flex_logps_equal_the_standard_layout(lean):
    """Forward (the reference's use): packed flex log-probs = standard layout = dense packed. Gradients
    through flex need a GPU (torch 2.13 has no CPU backward): tests/test_gpu.py checks them there."""
    batch = pairs()
    m = model().eval()
    with torch.no_grad():
        out = {layout: sequence_forward(m, batch, share_prefix=layout, lean=lean).stats.logps
               for layout in (False, "dense", "flex")}
    for layout in ("dense", "flex"):
        torch.testing.assert_close(out[layout], out[False], atol=1e-5, rtol=1e-5)


def test_flex_without_a_cpu_backward_keeps_the_policy_on_dense():
    """The policy's forward is differentiated: on the CPU, where FlexAttention has no backward, asking for
    flex falls back to the dense mask and says why; the reference (no gradient) may use flex on the CPU."""
    batch = pairs()
    pol = PrefixSharing("auto", "policy", "flex")
    assert pol(model(), batch) is True and pol.kernel == "dense"
    assert "no backward on the CPU" in pol.why
    ref = PrefixSharing("auto", "reference", "flex")
    assert ref(model(), batch) is True and ref.kernel == "flex" and ref.layout == "flex"
    # the dense fallback trains: its gradients are the standard layout's
    grads = {}
    for layout in (False, pol.layout):
        m = model()
        sequence_forward(m, batch, share_prefix=layout).stats.logps.sum().backward()
        grads[layout] = {k: p.grad for k, p in m.named_parameters()}
    for k, g in grads[False].items():
        torch.testing.assert_close(grads["dense"][k], g, atol=1e-5, rtol=1e-4)


def test_flex_switch_leaves_the_standard_and_dense_paths_unchanged():
    """After the first flex forward the model's attention is routed through dpo_ray_flex for good: the
    standard layout (2-D padding mask) and the dense packed path must still give the same numbers (SDPA
    underneath)."""
    m = model().eval()
    batch = pairs(seed=3)
    with torch.no_grad():
        before = sequence_forward(m, batch).stats.logps
        dense_before = sequence_forward(m, batch, share_prefix="dense").stats.logps
        sequence_forward(m, batch, share_prefix="flex")
        assert m.config._attn_implementation == flex.NAME and prefix.attn_implementation(m) == "sdpa"
        torch.testing.assert_close(sequence_forward(m, batch).stats.logps, before, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sequence_forward(m, batch, share_prefix="dense").stats.logps, dense_before,
                                   atol=1e-6, rtol=1e-6)
    assert prefix.supports(m)[0]


def test_block_mask_equals_the_dense_mask():
    batch = pairs(b=4, t=30, seed=5)
    packed = prefix.pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    bm = flex.block_mask(packed.branch)
    dense = bm.to_dense()  # (B, 1, nq, nk) block-level: every block holding a visible pair must be kept
    assert dense.shape[0] == 4
    b, s = packed.branch.shape
    q = torch.arange(s)
    for i in range(b):
        vis = bm.mask_mod(torch.tensor(i), torch.tensor(0), q[:, None], q[None, :])
        assert torch.equal(vis, packed.keep[i, 0]), f"pair {i}"


def test_prefix_attention_selects_the_kernel_and_auto_times_when_asked():
    batch = pairs(seed=1)
    cfg = DPOConfig(prefix_attention="flex")
    s = PrefixSharing("auto", "reference", cfg.prefix_attention)
    assert s(model(), batch) is True and s.kernel == "flex" and s.layout == "flex"
    s = PrefixSharing("auto", "reference", "dense")
    assert s(model(), batch) is True and s.kernel == "dense"
    # auto on the CPU: flex is no candidate (its eager form is a reference, not fast), no timing by default
    s = PrefixSharing("auto", "reference", "auto")
    assert s(model(), batch) is True and s.kernel == "dense" and not s.timings
    # timed (what a GPU does by default): every agreeing layout timed, the fastest kept, the reason says so
    s = PrefixSharing("auto", "reference", "flex", timed=True)
    s(model(), batch)
    assert set(s.timings) == {"standard", "flex", "dense"} and all(v > 0 for v in s.timings.values())
    assert ("fastest" in s.why) and (s.layout in (False, "flex", "dense"))


def test_flex_unavailable_falls_back_to_dense_with_the_reason(monkeypatch):
    monkeypatch.setattr(flex, "available", lambda: (False, "FlexAttention unavailable (test)"))
    s = PrefixSharing("auto", "reference", "flex")
    assert s(model(), pairs()) is True and s.kernel == "dense"
    assert "FlexAttention unavailable (test)" in s.why


def test_flex_failure_falls_back_to_dense(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(flex, "_flex", lambda q: broken)
    s = PrefixSharing("auto", "reference", "flex")
    assert s(model(), pairs()) is True and s.kernel == "dense"
    assert "flex packed forward failed (RuntimeError: no kernel for this device)" in s.why


# -------------------------------------------------------------- packed width from the collate (no host sync)

def test_collate_packed_width_equals_pack_pairs():
    """The width the collate computes from the token lists is the one pack_pairs would read from the device,
    on pairs with shared, partly shared, merged-token and empty-completion prompts; given it, pack_pairs
    returns the same packing without reading the device."""
    import random

    from dpo_ray.data.collate import collate_pairs

    rng = random.Random(0)
    for trial in range(40):
        b = rng.randint(1, 5)
        cols = {"chosen_input_ids": [], "rejected_input_ids": [], "chosen_prompt_len": [],
                "rejected_prompt_len": [], "row_id": list(range(b))}
        for _ in range(b):
            p = rng.randint(1, 6)
            prompt = [rng.randint(3, 9) for _ in range(p)]
            c = prompt + [rng.randint(3, 9) for _ in range(rng.randint(0, 6))]
            r = prompt + [rng.randint(3, 9) for _ in range(rng.randint(0, 6))]
            pr = p - (1 if trial % 3 == 0 and p > 1 else 0)  # a prompt whose last token merged differently
            if trial % 3 == 0 and len(r) > pr:
                r[pr] = 2
            cols["chosen_input_ids"].append(c)
            cols["rejected_input_ids"].append(r)
            cols["chosen_prompt_len"].append(p)
            cols["rejected_prompt_len"].append(pr)
        batch = collate_pairs(cols, pad_token_id=0, pad_to_multiple_of=8 if trial % 2 else None)
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        synced = prefix.pack_pairs(*args)
        assert batch["packed_width"] == synced.input_ids.shape[1], trial
        given = prefix.pack_pairs(*args, width=batch["packed_width"])
        for field in ("input_ids", "position_ids", "keep", "score_index", "lengths"):
            assert torch.equal(getattr(given, field), getattr(synced, field)), (trial, field)
