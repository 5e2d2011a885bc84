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
