"""Prefix sharing ([prompt, chosen, rejected] in one row) gives the standard layout's statistics.

Real tiny Llama models (sdpa and eager attention), real collated batches; the standard layout is the
reference. Float32 throughout: the two layouts differ only in summation order (≤ 1e-5 here).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import bundled_tiny as tiny

from dpo_ray import prefix
from dpo_ray.config import DPOConfig
from dpo_ray.data import collate_pairs, load_processing_class, tokenize_rows
from dpo_ray.data.bundled import DATA_DIR
from dpo_ray.forward import reference_logps, sequence_forward
from dpo_ray.sharing import PrefixSharing
from dpo_ray.train.steps import dpo_step

CFG = DPOConfig()


@pytest.fixture(scope="module")
def tok():
    return load_processing_class(None)


def edge_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Four pairs that cover the packing's corner cases (rows as (ids, prompt length)):
    0: same prompt, completions of different lengths;
    1: the prompts' last tokens differ (a boundary merge in a real tokenizer): only the common part is shared;
    2: no prompt at all (nothing shared, the first token is unscored in both layouts);
    3: the completions start with the same tokens: sharing stops at the first completion token."""
    g = torch.Generator().manual_seed(3)

    def r(n):
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    p0, p1, p3 = r(5), r(4), r(6)
    same = r(2)
    chosen = [(p0 + r(4), 5), (p1 + r(3), 4), (r(6), 0), (p3 + same + r(3), 6)]
    rejected = [(p0 + r(7), 5), (p1[:3] + r(1) + r(5), 4), (r(3), 0), (p3 + same + r(1), 6)]
    cols = {"chosen_input_ids": [c for c, _ in chosen], "chosen_prompt_len": [p for _, p in chosen],
            "rejected_input_ids": [c for c, _ in rejected], "rejected_prompt_len": [p for _, p in rejected],
            "row_id": list(range(4))}
    return collate_pairs(cols, pad_token_id=0)


def bundled_batch(tok, n: int = 16) -> dict[str, torch.Tensor]:
    with open(DATA_DIR / "train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return collate_pairs(tokenize_rows(rows, tok, CFG), tok.pad_token_id)


def assert_same_stats(a, b, atol=1e-5):
    for name in ("logps", "num_tokens", "nll_mean", "entropy", "mean_logit", "logps_shared", "logps_tail",
                 "wpo_logw"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        torch.testing.assert_close(x.detach(), y.detach(), atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("lean", [True, False])
def test_packed_statistics_equal_the_standard_layout(tok, impl, lean):
    model = tiny(tok, impl).eval()
    for batch in (edge_batch(len(tok)), bundled_batch(tok)):
        kw = {"lean": lean, "ld_alpha": 0.5, "want_wpo": True}
        assert_same_stats(sequence_forward(model, batch, **kw).stats,
                          sequence_forward(model, batch, share_prefix=True, **kw).stats)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gpt_neox"])
def test_other_architectures_agree(arch):
    """Absolute positions (GPT-2), attention biases and grouped KV heads (Qwen2), partial rotary (NeoX)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {"gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 1, "eos_token_id": 2},
             "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "use_sliding_window": False},
             "gpt_neox": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2}}[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=64, **small)).eval()
    batch = edge_batch(64)
    assert prefix.supports(model) == (True, "")
    assert_same_stats(sequence_forward(model, batch).stats,
                      sequence_forward(model, batch, share_prefix=True).stats)


def test_alibi_models_keep_the_standard_layout():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    ok, why = prefix.supports(bloom)
    assert not ok and "position_ids" in why


@pytest.mark.parametrize("kind", ["conversational", "keep_end"])
def test_chat_template_and_left_truncation_agree(tok, kind):
    """Conversational rows (the chat template renders the prompt) and keep_end truncation (the prompt is
    cut from the left by a different amount in each row, so the rows may share no prefix at all)."""
    if kind == "conversational":
        cfg, path = CFG, DATA_DIR / "conversational" / "train.jsonl"
    else:
        cfg, path = DPOConfig(max_length=12, truncation_mode="keep_end"), DATA_DIR / "train.jsonl"
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(16), f)]
    batch = collate_pairs(tokenize_rows(rows, tok, cfg), tok.pad_token_id)
    model = tiny(tok).eval()
    assert_same_stats(sequence_forward(model, batch).stats,
                      sequence_forward(model, batch, share_prefix=True).stats)


def test_packed_gradients_equal_the_standard_layout(tok):
    model = tiny(tok)
    batch = edge_batch(len(tok))
    grads = []
    for share in (False, True):
        model.zero_grad()
        sequence_forward(model, batch, share_prefix=share).stats.logps.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-4, rtol=1e-4)


def test_packing_shares_only_the_common_prompt(tok):
    batch = edge_batch(len(tok))
    packed = prefix.pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    lens = batch["attention_mask"].sum(-1)
    # shared prefixes: 5, 3 (last prompt token differs), 0 (no prompt), 6 (stops at the completion)
    assert packed.tokens == int(lens.sum()) - (5 + 3 + 0 + 6)
    assert packed.input_ids.shape == (4, int((lens[:4] + lens[4:] - torch.tensor([5, 3, 0, 6])).max()))
    # pair 0: the rejected part restarts its positions after the prompt and never sees the chosen part
    len_c = int(lens[0])
    assert packed.position_ids[0, len_c].item() == 5
    assert not packed.keep[0, 0, len_c, 5:len_c].any() and packed.keep[0, 0, len_c, :5].all()
    # one scoring position per completion token of the standard layout
    assert packed.score_index.numel() == int(batch["completion_mask"][:, 1:].sum())


def test_bundled_data_runs_about_a_third_fewer_tokens(tok):
    batch = bundled_batch(tok, 64)
    packed = prefix.pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    standard = int(batch["attention_mask"].sum())
    assert packed.tokens < 0.8 * standard  # prompts are about half of each bundled sequence
    assert packed.input_ids.numel() < batch["input_ids"].numel()


def test_training_steps_match_with_and_without_sharing(tok):
    """A few AdamW steps of the full DPO loss (sigmoid + RPO NLL) follow the same loss curve."""
    cfg = DPOConfig(rpo_alpha=1.0, learning_rate=1e-3)
    batches = [bundled_batch(tok, 64)]
    curves = []
    for share in (False, True):
        model = tiny(tok)
        ref = tiny(tok).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
        losses = []
        for _ in range(4):
            for batch in batches:
                ref_c, ref_r = reference_logps(ref, batch)
                loss, _ = dpo_step(model, cfg, batch, ref_c, ref_r, share_prefix=share)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        curves.append(losses)
    assert curves[0][0] != curves[0][-1]  # it trained
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), atol=1e-5, rtol=1e-5)


def test_auto_turns_on_where_the_mask_is_honoured(tok):
    model = tiny(tok)
    sharing = PrefixSharing("auto")
    assert sharing(model, bundled_batch(tok)) is True
    assert model.training  # the check ran in eval mode and put the mode back
    assert sharing.why.startswith("the first batch agrees")


def test_auto_stays_off_for_attention_without_custom_masks(tok):
    model = tiny(tok)
    model.config._attn_implementation = "flash_attention_2"  # decided from the config, no kernel is run
    sharing = PrefixSharing("auto")
    assert sharing(model, bundled_batch(tok)) is False
    assert "flash_attention_2" in sharing.why
    assert PrefixSharing("on")(model, bundled_batch(tok)) is False
    assert PrefixSharing("off")(tiny(tok), bundled_batch(tok)) is False


def test_sliding_window_models_keep_the_standard_layout():
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2}
    windowed = AutoModelForCausalLM.from_config(MistralConfig(sliding_window=16, **small))
    assert (prefix.supports(windowed)
            == (False, "sliding-window attention: a custom 4-D mask would replace the window"))
    full = AutoModelForCausalLM.from_config(Qwen2Config(use_sliding_window=False, **small))
    assert prefix.supports(full) == (True, "")


def test_auto_check_catches_a_model_that_ignores_the_mask(tok, monkeypatch, caplog):
    """A model whose attention ignored the custom mask would let rejected tokens see the chosen ones:
    emulated by handing it a plain causal mask over the packed row; the first-batch check says no."""
    def plain_causal(model, keep, dtype):
        s = keep.shape[-1]
        return torch.ones(s, s, dtype=torch.bool).tril().expand_as(keep)

    monkeypatch.setattr(prefix, "attention_mask_for", plain_causal)
    with caplog.at_level("WARNING"):
        assert PrefixSharing("auto")(tiny(tok), bundled_batch(tok)) is False
    assert "custom 4-D mask" in caplog.text
    # on trusts the attention implementation
    assert PrefixSharing("on")(tiny(tok), bundled_batch(tok)) is True


def test_config_accepts_booleans():
    assert DPOConfig(prefix_sharing=True).prefix_sharing == "on"
    assert DPOConfig(prefix_sharing=False).prefix_sharing == "off"
    assert DPOConfig().prefix_sharing == "auto"


def test_lora_policies_keep_sharing_and_match_the_standard_layout(tok):
    """A PEFT wrapper's forward takes **kwargs and passes position_ids through: sharing stays on for LoRA,
    decided on the base model, and the packed log-probs and LoRA gradients equal the standard layout's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    assert prefix.supports(model) == (True, "")
    sharing = PrefixSharing("auto")
    assert sharing(model, bundled_batch(tok)) is True, sharing.why
    batch = edge_batch(len(tok))
    stats, grads = [], []
    for share in (False, True):
        model.zero_grad()
        out = sequence_forward(model, batch, share_prefix=share).stats
        out.logps.sum().backward()
        stats.append(out)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert_same_stats(*stats)
    assert grads[0]
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-4, rtol=1e-4)
