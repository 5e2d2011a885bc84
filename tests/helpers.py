"""Builders the tests share (import as ``from helpers import ...``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def tiny_llama(vocab_size: int = 64, seed: int = 0, **overrides):
    """A 2-layer Llama of hidden size 32 with random weights seeded by ``seed``, in eval mode; ``overrides``
    go to LlamaConfig (e.g. pad/eos ids, tie_word_embeddings, num_hidden_layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": 64, **overrides})
    return LlamaForCausalLM(config).eval()


def random_pairs(vocab: int, b: int, t: int, seed: int, prompt_len: tuple[int, int] = (2, 7),
                 min_completion: int = 1) -> dict:
    """A collated pair batch by hand (docs/CONTRACTS.md): (2B, T) right-padded [chosen; rejected], each pair
    sharing a random prompt of ``prompt_len`` [lo, hi) tokens, completions of at least ``min_completion``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((2 * b, t), dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i in range(b):
        p = int(torch.randint(*prompt_len, (1,), generator=g))
        prompt = torch.randint(3, vocab, (p,), generator=g)
        for row in (i, i + b):
            n = int(torch.randint(p + min_completion, t + 1, (1,), generator=g))
            ids[row, :p] = prompt
            ids[row, p:n] = torch.randint(3, vocab, (n - p,), generator=g)
            attn[row, :n] = 1
            comp[row, p:n] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def bundled_tiny(tok, impl: str = "sdpa"):
    """dpo_ray's default tiny Llama (the bundled tokenizer's vocabulary, seed of a default DPOConfig) with the
    given attention implementation."""
    from dpo_ray.config import DPOConfig
    from dpo_ray.models import load_causal_lm

    model = load_causal_lm(None, DPOConfig(), tok)
    model.config._attn_implementation = impl
    return model
