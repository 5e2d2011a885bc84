"""PEFT reference options, QLoRA guard, and the MoE auxiliary loss, in-process on tiny models."""

from __future__ import annotations

import helpers
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from dpo_ray.adapters import wrap_peft
from dpo_ray.config import DPOConfig
from dpo_ray.forward import reference_logps, sequence_forward
from dpo_ray.models import load_causal_lm
from dpo_ray.reference.peft_ref import AdapterReference
from dpo_ray.train.steps import dpo_step

VOCAB = 64


def tiny_llama(seed: int = 0):
    return helpers.tiny_llama(VOCAB, seed)


def batch(b: int = 3, t: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2 * b, t), generator=g)
    attn = torch.ones_like(ids)
    attn[0, -3:] = 0
    comp = torch.zeros_like(ids)
    comp[:, 5:] = 1
    comp[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def perturb_lora(model, name: str = "default", scale: float = 0.5) -> None:
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key and f".{name}." in key:
                p.add_(scale * torch.randn_like(p))


def lora_cfg(**kw) -> DPOConfig:
    return DPOConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                     lora_target_modules=["q_proj", "v_proj"], **kw)


def test_lora_trains_only_adapter_weights():
    model = wrap_peft(tiny_llama(), lora_cfg())
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)


def test_adapter_off_reference_is_the_base_model():
    base = tiny_llama()
    expected = reference_logps(base, batch())
    policy = wrap_peft(tiny_llama(), lora_cfg(reference={"source": "adapter_off"}))
    perturb_lora(policy)  # the policy now differs from the base...
    ref = AdapterReference(policy, lora_cfg(reference={"source": "adapter_off"}), torch.device("cpu"))
    got = ref.result(None, batch())
    for a, b in zip(got, expected):  # ...but the reference does not
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    moved = reference_logps(policy, batch())
    assert not torch.allclose(moved[0], expected[0])
    assert all(p.requires_grad for k, p in policy.named_parameters() if "lora_" in k)


def test_ref_adapter_from_existing_adapter_dir(tmp_path):
    """Option 3: the adapter loaded twice; the reference copy stays at the adapter's starting weights."""
    start = wrap_peft(tiny_llama(), lora_cfg())
    perturb_lora(start)
    start.save_pretrained(tmp_path / "adapter")
    expected = reference_logps(start, batch())

    cfg = lora_cfg(reference={"source": "ref_adapter"}, model_adapter_name="policy", ref_adapter_name="reference",
                   peft_adapter_path=str(tmp_path / "adapter"))
    policy = wrap_peft(tiny_llama(), cfg)
    perturb_lora(policy, "policy")  # training moves the policy adapter only
    ref = AdapterReference(policy, cfg, torch.device("cpu"))
    got = ref.result(None, batch())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert policy.active_adapter == "policy"
    assert all(not p.requires_grad for k, p in policy.named_parameters() if ".reference." in k)
    assert any(p.requires_grad for k, p in policy.named_parameters() if ".policy." in k)


def test_ref_adapter_without_start_dir_equals_base_at_step0():
    """With no adapter to start from, the reference adapter is a fresh (identity) one: the base model, even
    after the policy's own adapter has moved (perturbed here: at step 0 every LoRA B is zero, so a reference
    that wrongly used the policy's adapter would pass unperturbed)."""
    cfg = lora_cfg(reference={"source": "ref_adapter"}, model_adapter_name="policy", ref_adapter_name="reference")
    policy = wrap_peft(tiny_llama(), cfg)
    perturb_lora(policy, "policy")
    expected = reference_logps(tiny_llama(), batch())
    moved = reference_logps(policy, batch())
    assert not torch.allclose(moved[0], expected[0], atol=1e-3), "perturbing the policy adapter changed nothing"
    got = AdapterReference(policy, cfg, torch.device("cpu")).result(None, batch())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_separate_reference_model_from_adapter_dir(tmp_path):
    """Option 1: a second model instance with the adapter (merged) gives the adapter model's log-probs."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = wrap_peft(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora_cfg())
    perturb_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = reference_logps(model, batch())
    ref = load_causal_lm(str(tmp_path / "adapter"), DPOConfig(), None).eval()
    got = reference_logps(ref, batch())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_qlora_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    cfg = DPOConfig(use_peft=True, load_in_4bit=True)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        from dpo_ray.models import from_pretrained_kwargs

        from_pretrained_kwargs(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_on_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    cfg = lora_cfg(load_in_4bit=True, reference={"source": "adapter_off"})
    model = wrap_peft(load_causal_lm(str(tmp_path / "base"), cfg, None), cfg)
    b = {k: v.cuda() for k, v in batch().items()}
    ref = AdapterReference(model, cfg, torch.device("cuda"))
    loss, _ = dpo_step(model, cfg, b, *ref.result(None, b))
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------- MoE

def tiny_mixtral():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg)


def test_moe_aux_loss_is_added_with_its_coefficient(tmp_path):
    tiny_mixtral().save_pretrained(tmp_path / "moe")
    coef = 0.25
    cfg = DPOConfig(output_router_logits=True, router_aux_loss_coef=coef, reference={"source": "none"})
    model = load_causal_lm(str(tmp_path / "moe"), cfg, None)
    b = batch()
    zeros = torch.zeros(3)
    loss, metrics = dpo_step(model, cfg, b, zeros, zeros)
    assert "aux_loss" in metrics and metrics["aux_loss"] > 0
    plain_cfg = DPOConfig(reference={"source": "none"})
    plain, _ = dpo_step(model, plain_cfg, b, zeros, zeros)
    torch.testing.assert_close(loss, plain + coef * metrics["aux_loss"], atol=1e-5, rtol=1e-5)
    out = sequence_forward(model, b, router_aux=True)
    assert out.aux_loss is not None


def test_moe_flag_on_dense_model_is_a_clear_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_causal_lm(str(tmp_path / "dense"), DPOConfig(output_router_logits=True), None)
