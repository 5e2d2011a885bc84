"""Vision-language models: what is a processor, which inputs carry pixels (docs/data.md).

Rows carry an ``images`` column; an ``AutoProcessor`` replaces the tokenizer: its chat template writes an
image placeholder, the processor expands it to the model's image-token count and returns the pixel inputs
(``PIXEL_KEYS``) that travel with the row to the model. No Ray, torch or transformers at import time: the
config, the data pipeline and the model forward all import this module. Image decoding is in
``dpo_ray.vision.images``; the tiny LLaVA used by tests and examples in ``dpo_ray.vision.tiny``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Model inputs besides the text that a processor may return; collate and both reference paths pass exactly
# these through (docs/CONTRACTS.md).
PIXEL_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")
IMAGE_TOKEN = "<image>"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_processor(obj: Any) -> bool:
    """A multimodal processor (image processor + tokenizer), as opposed to a plain tokenizer."""
    return getattr(obj, "image_processor", None) is not None and getattr(obj, "tokenizer", None) is not None


def text_tokenizer(obj: Any):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return obj.tokenizer if is_processor(obj) else obj


def is_vision_config(config: Any) -> bool:
    """A transformers config of an image-text-to-text model (it nests a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def is_vision_model_dir(path: Any) -> bool:
    """``path`` is a model directory whose config.json describes a vision-language model (JSON only)."""
    if not path:
        return False
    f = Path(str(path)) / "config.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("vision_config") is not None
    except (OSError, ValueError):
        return False


def has_processor(path: Any) -> bool:
    return bool(path) and Path(str(path)).is_dir() and any((Path(str(path)) / f).exists()
                                                           for f in _PROCESSOR_FILES)


def keep_end_problem() -> str:
    """Why truncation_mode keep_end is refused for a vision-language model (config and tokenizer say the
    same)."""
    return ("keep_end cuts tokens from the front of the sequence, which would drop the prompt's image tokens "
            "while their pixel inputs stay; vision-language models need truncation_mode: keep_start (rows "
            "whose prompt and image tokens do not fit max_length are dropped and counted) or a larger "
            "max_length")


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens that stand for image features (never completion tokens)."""
    tok = text_tokenizer(processor)
    ids = {getattr(processor, "image_token_id", None)}
    for name in ("image_token", "boi_token", "eoi_token"):
        t = getattr(processor, name, None)
        if isinstance(t, str) and t in tok.get_vocab():
            ids.add(tok.convert_tokens_to_ids(t))
    return {i for i in ids if isinstance(i, int)}
