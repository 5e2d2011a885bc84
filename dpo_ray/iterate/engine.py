"""Generation behind a small interface: what a rollout actor asks of its engine.

``GenerationEngine`` is two calls: ``generate`` (K responses for each prompt, as text) and ``load_weights``
(the policy after a round of training). ``HFGenerateEngine`` runs transformers' ``generate`` with the KV
cache, one prompt at a time with its own seed, so a response depends on (prompt, seed) only, never on which
actor drew it or what else was in its batch: a re-sampled prompt gets the same responses.

A vLLM engine plugs in behind the same two calls (docs/iterative.md): ``generate`` maps to ``LLM.generate``
with ``SamplingParams(n=K, temperature, top_p, max_tokens, seed)`` on prompt token ids, and ``load_weights``
to ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(state_dict.items())`` (or a
collective RPC of it under tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What to draw per prompt: ``n`` responses; ``temperature`` 0 is greedy (``n`` must then be 1)."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Prompt:
    """One prompt as the engine needs it: its token ids (the training rows' own prompt tokens) and its
    seed."""

    ids: list[int]
    seed: int


class GenerationEngine(Protocol):
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        """``params.n`` response texts per prompt, in prompt order."""

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the policy's weights (same architecture)."""


class HFGenerateEngine:
    """transformers' ``generate`` on one model (CPU or one GPU), prompt by prompt, each under its own seed."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        sample = params.temperature > 0
        if not sample and params.n != 1:
            raise ValueError("temperature 0 (greedy) gives one response per prompt; ask for n=1")
        out = []
        for p in prompts:
            ids = torch.tensor([p.ids], device=self.device)
            gen: dict[str, Any] = {"do_sample": sample, "max_new_tokens": params.max_new_tokens,
                                   "num_return_sequences": params.n, "pad_token_id": self.pad,
                                   "eos_token_id": self.eos, "use_cache": True}
            if sample:
                gen.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:
                gen.update(temperature=None, top_p=None, top_k=None)
            torch.manual_seed(p.seed)
            seqs = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
            head = self.tokenizer.decode(p.ids, skip_special_tokens=True)
            out.append([self._text(p.ids, head, row[len(p.ids):].tolist()) for row in seqs])
        return out

    def _text(self, prompt_ids: list[int], head: str, new: list[int]) -> str:
        """The response as text exactly as it continues the prompt's text ``head`` (a leading space kept), up
        to EOS."""
        if self.eos is not None and self.eos in new:
            new = new[:new.index(self.eos)]
        tok = self.tokenizer
        full = tok.decode(prompt_ids + new, skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tok.decode(new, skip_special_tokens=True)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        have = self.model.state_dict()
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = [k for k in have if k not in state_dict and not (tied and k.endswith("lm_head.weight"))]
        unexpected = [k for k in state_dict if k not in have]
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(have[k].shape)}" for k, v in state_dict.items()
                  if k in have and v.shape != have[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"the new weights do not fit the rollout model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
        self.model.load_state_dict(dict(state_dict), strict=False)
        if tied and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
