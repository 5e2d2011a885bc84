"""Scorers: (prompt, response) -> a float, higher is better. Three kinds, named by ``iterate.scorer``:

- ``rule``: the bundled task's rule (``data.bundled.follows_rule``): 1.0 when the response follows it, else
  0.0;
- ``module:function``: a Python callable importable where the scorer actor runs (a verifier, unit tests, a
  heuristic), called once per response with the prompt as the dataset gives it (a string, or a message list)
  and the response text;
- a directory: a reward model (``AutoModelForSequenceClassification``); the score is its first logit on the
  prompt followed by the response (through the chat template for message-list prompts).

``check_scores`` turns what a scorer returns into a clear error before anything trains on it: a scorer that
raised (named, with the prompt it raised on), one that returned something that is not a finite number, or the
wrong count.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpo_ray.errors import DataError


class ScorerError(DataError):
    """The scorer failed or returned something no pair can be built from."""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return " / ".join(str(m.get("content", "")) for m in prompt)[:120]
    return str(prompt)[:120]


def per_response(fn: Callable[[Any, str], Any],
                 spec: str) -> Callable[[Sequence[Any], Sequence[str]], list[Any]]:
    """A batch scorer from ``fn(prompt, response)``; an exception names the response it raised on."""

    def each(prompts: Sequence[Any], responses: Sequence[str]) -> list[Any]:
        out = []
        for p, r in zip(prompts, responses):
            try:
                out.append(fn(p, r))
            except Exception as e:  # noqa: BLE001 - user code: one clear error naming the response
                raise ScorerError(f"iterate.scorer={spec!r} raised {type(e).__name__}: {e} on the response "
                                  f"{str(r)[:80]!r} to the prompt {_prompt_text(p)!r}; "
                                  "fix the scorer") from None
        return out

    return each


def load_scorer(spec: str) -> Callable[[Sequence[Any], Sequence[str]], list[float]]:
    """The batch scorer ``(prompts, responses) -> scores`` that ``spec`` names (see the module doc)."""
    if spec == "rule":
        from dpo_ray.data.bundled import follows_rule

        return lambda prompts, responses: [float(follows_rule(p, r)) for p, r in zip(prompts, responses)]
    if Path(spec).is_dir():
        return RewardModelScorer(spec)
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ScorerError(f"iterate.scorer={spec!r}: cannot import {name!r} from {module!r} ({e}); the "
                              "module must be importable where the scorer actors run (on PYTHONPATH, or "
                              "shipped with ray.runtime_env py_modules / working_dir)") from None
        if not callable(fn):
            raise ScorerError(f"iterate.scorer={spec!r} is a {type(fn).__name__}, not a function")
        return per_response(fn, spec)
    raise ScorerError(f"iterate.scorer={spec!r} is none of: rule, module:function, a reward model directory")


class RewardModelScorer:
    """A sequence-classification reward model: the first logit of prompt + response."""

    def __init__(self, path: str, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size, self.torch = batch_size, torch

    def _text(self, prompt: Any, response: str) -> str:
        if isinstance(prompt, list):
            return self.tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                tokenize=False)
        return prompt + response

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out


def check_scores(spec: str, prompts: Sequence[Any], responses: Sequence[str], scores: Any) -> list[float]:
    """``scores`` as floats, one per response, every one finite; else ``ScorerError`` naming the first bad
    one."""
    if not isinstance(scores, (list, tuple)) or len(scores) != len(responses):
        got = f"{len(scores)} value(s)" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise ScorerError(f"iterate.scorer={spec!r} returned {got} for {len(responses)} response(s)")
    out = []
    for i, s in enumerate(scores):
        try:
            value = math.nan if isinstance(s, (bool, str)) else float(s)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ScorerError(
                f"iterate.scorer={spec!r} returned {s!r} for the response {responses[i][:80]!r} to the "
                f"prompt {_prompt_text(prompts[i])!r}: every score must be a finite number (a NaN or a "
                "non-number cannot rank responses); fix the scorer")
        out.append(value)
    return out


class ScorerHost:
    """What a scorer actor holds: the scorer, loaded once."""

    def __init__(self, spec: str, threads: int = 1, fn: Callable[[Any, str], Any] | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.fn = per_response(fn, spec) if fn is not None else load_scorer(spec)

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        try:
            raw = self.fn(prompts, responses)
        except ScorerError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of user code becomes one clear error
            first = _prompt_text(prompts[0]) if prompts else ""
            raise ScorerError(f"iterate.scorer={self.spec!r} raised {type(e).__name__}: {e} (scoring "
                              f"{len(responses)} response(s), the first to the prompt {first!r}); fix the "
                              "scorer"
                              ) from None
        return check_scores(self.spec, prompts, responses,
                            list(raw) if not isinstance(raw, (list, tuple)) else raw)

    def ping(self) -> bool:
        return True

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
