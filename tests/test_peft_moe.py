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

    cfg = lora_cfg(reference={"source": "ref_adapter"}, model_adapter_name="policy",
                   ref_adapter_name="reference", peft_adapter_path=str(tmp_path / "adapter"))
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
    cfg = lora_cfg(reference={"source": "ref_adapter"}, model_adapter_name="policy",
                   ref_adapter_name="reference")
    policy = wrap_peft(tiny_llama(), cfg)
    perturb_lora(policy, "policy")
    expected = reference_logps(tiny_llama(), batch())
    moved = reference_logps(policy, batch())
    assert not torch.allclose(moved[0], expected[0], atol=1e-3), (
        "perturbing the policy adapter changed nothing")
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


def _saved_for_backward(model, ids) -> int:
    """Bytes the forward keeps for the backward, each storage once and the parameters left out: what
    activation memory is made of."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("peft", [False, True])
def test_the_policy_trains_in_training_mode_so_checkpointing_and_dropout_apply(tmp_path, peft):
    """The policy comes from ``from_pretrained`` in eval mode, where transformers skips gradient checkpointing
    and dropout. ``prepare_policy`` (what each worker runs before DeepSpeed) puts it in training mode: with
    ``gradient_checkpointing`` the forward keeps a fraction of the activations, and ``disable_dropout: false``
    gives two different forwards."""
    from dpo_ray.models import ActivationCheckpointing, prepare_policy

    tiny_llama().save_pretrained(tmp_path / "m")
    ids = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    extra = {"use_peft": True, "lora_dropout": 0.0} if peft else {}
    saved = {}
    for gc in (False, True):
        cfg = DPOConfig(output_dir=str(tmp_path / "o"), gradient_checkpointing=gc, **extra)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert not model.training  # what a worker starts from
        if peft:
            model = wrap_peft(model, cfg)
        model = prepare_policy(model, cfg)
        assert model.training and all(m.training for m in model.modules())
        assert ActivationCheckpointing(model, cfg, elem_bytes=4)({"input_ids": ids}) is gc
        saved[gc] = _saved_for_backward(model, ids)
    assert saved[True] < 0.5 * saved[False], saved

    dropout_cfg = DPOConfig(output_dir=str(tmp_path / "o"), disable_dropout=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attention_dropout=0.5)
    model = prepare_policy(model, dropout_cfg)
    with torch.no_grad():
        a, b = (model(input_ids=ids, use_cache=False).logits for _ in range(2))
    assert not torch.equal(a, b)


def test_auto_checkpointing_recomputes_only_micro_batches_past_the_budget(tmp_path, monkeypatch):
    """``gradient_checkpointing: auto`` (the default) checkpoints a micro-batch whose estimated activations
    pass ``gradient_checkpointing_gib``, and leaves shorter ones alone; under ZeRO-3 it is on for every
    micro-batch. The estimate is within 15 % of what the forward really keeps. A micro-batch past the bound
    also fixes the allocator's threshold, whatever the setting (its effect: tests/test_allocator.py)."""
    import dpo_ray.models
    from dpo_ray.models import ActivationCheckpointing, activation_bytes_per_token, prepare_policy

    fixed = []  # this process's allocator stays as it is; the calls are what is checked here
    monkeypatch.setattr(dpo_ray.models, "return_freed_memory", lambda: fixed.append(1))

    model = tiny_llama()
    per_token = activation_bytes_per_token(model.config, 4)
    short, long = (torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))
                   for n in (16, 64))
    cfg = DPOConfig(output_dir=str(tmp_path), gradient_checkpointing_gib=per_token * 100 / 2**30)
    assert cfg.gradient_checkpointing == "auto"
    plain = _saved_for_backward(prepare_policy(tiny_llama(), cfg), long)
    assert 0.85 < per_token * long.numel() / plain < 1.15, (per_token * long.numel(), plain)

    model = prepare_policy(model, cfg)
    gc = ActivationCheckpointing(model, cfg, elem_bytes=4)
    assert gc.min_tokens == 100 and "on for micro-batches of 100+ tokens" in gc.describe()
    assert gc({"input_ids": long}) is True and fixed == [1]
    assert _saved_for_backward(model, long) < 0.5 * plain
    assert gc({"input_ids": short}) is False and fixed == [1]
    short_plain = _saved_for_backward(prepare_policy(tiny_llama(), cfg), short)
    assert _saved_for_backward(model, short) == short_plain
    assert gc.checkpointed == 1

    zero3 = DPOConfig(output_dir=str(tmp_path), deepspeed={"zero_stage": 3})
    assert ActivationCheckpointing(prepare_policy(tiny_llama(), zero3), zero3,
                                   elem_bytes=4)({"input_ids": short})
    off = DPOConfig(output_dir=str(tmp_path), gradient_checkpointing=False,
                    gradient_checkpointing_gib=per_token * 100 / 2**30)
    fixed.clear()
    assert (ActivationCheckpointing(prepare_policy(tiny_llama(), off), off, elem_bytes=4)({"input_ids": long})
            is False)
    assert fixed == [1]  # long rows without checkpointing: the allocator still returns what they free
    fixed.clear()
    on_gpu = ActivationCheckpointing(prepare_policy(tiny_llama(), cfg), cfg, elem_bytes=4,
                                     host_activations=False)
    assert on_gpu({"input_ids": long}) is True and fixed == []  # activations on a GPU: host allocator alone
