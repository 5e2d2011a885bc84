"""The tokenizer (or a vision model's processor) a run uses: the model directory's own, the bundled one only
for the embedded default, never one in place of the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_ray.data import bundled
from dpo_ray.errors import ModelFilesError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(cfg_or_path: Any = None):
    """The model directory's tokenizer (AutoTokenizer); the bundled one only when there is no model directory
    at all (the embedded default). A model directory without tokenizer files is an error, never the bundled
    tokenizer in its place. Pad falls back to EOS."""
    from transformers import AutoTokenizer

    path = getattr(cfg_or_path, "model_name_or_path", cfg_or_path)
    if path is None:
        tok = AutoTokenizer.from_pretrained(str(bundled.TOKENIZER_DIR))
    elif not Path(path).is_dir():
        raise ModelFilesError(f"model_name_or_path={str(path)!r} is not a directory, so it has no tokenizer "
                              "to load; give the directory that save_pretrained wrote (dpo_ray downloads "
                              "nothing)")
    elif not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ModelFilesError(
            f"model_name_or_path={str(path)!r} has no tokenizer files (none of "
            f"{', '.join(TOKENIZER_FILES)}): model.save_pretrained(DIR) writes only the model; also run "
            "tokenizer.save_pretrained(DIR) for the tokenizer the model was trained with, or pass "
            "processing_class=tokenizer from Python. dpo_ray does not substitute its bundled 66-token "
            "tokenizer for a model of yours")
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer from {path or bundled.TOKENIZER_DIR} has neither a pad nor an "
                             "EOS token; set tokenizer.pad_token before training")
        tok.pad_token = tok.eos_token
    return tok


def load_processing_class(cfg_or_path: Any = None):
    """A vision model directory's AutoProcessor (image processor + tokenizer), else ``load_tokenizer``."""
    from dpo_ray.vision import has_processor, is_vision_model_dir, text_tokenizer

    path = getattr(cfg_or_path, "model_name_or_path", cfg_or_path)
    if not (is_vision_model_dir(path) and has_processor(path)):
        return load_tokenizer(cfg_or_path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    tok = text_tokenizer(processor)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return processor


def is_bundled_tokenizer(tokenizer) -> bool:
    from dpo_ray.vision import text_tokenizer

    path = getattr(text_tokenizer(tokenizer), "name_or_path", "") or ""
    return bool(path) and Path(path).resolve() == bundled.TOKENIZER_DIR.resolve()


def describe_tokenizer(tokenizer) -> str:
    """'the bundled tokenizer (66 tokens, ...)' / 'DIR (32000 tokens)', for the run's data summary."""
    from dpo_ray.vision import text_tokenizer

    tok = text_tokenizer(tokenizer)
    path = getattr(tok, "name_or_path", "") or type(tok).__name__
    if is_bundled_tokenizer(tokenizer):
        return f"the bundled tokenizer ({len(tok)} tokens, {path})"
    return f"{path} ({len(tok)} tokens)"
