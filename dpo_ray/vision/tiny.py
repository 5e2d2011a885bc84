"""The tiny LLaVA and the shape-colour image set, built offline for tests and examples (docs/data.md).

    python -m dpo_ray.vision OUT_DIR      # the tiny VLM + processor, save_pretrained into OUT_DIR
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dpo_ray.data.bundled import TOKENIZER_DIR
from dpo_ray.vision import IMAGE_TOKEN

VISION_DIR = Path(__file__).parent.parent / "assets" / "vision"
VISION_TRAIN_FILE = VISION_DIR / "train.jsonl"


VISION_WORDS = ["what", "colour", "is", "the", "shape", "circle", "square", "triangle",
                "red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "what colour is the shape ?"

# Typed message content ({"type": "image"} / {"type": "text", "text": ...}) or plain strings; the image part
# becomes <image>, which the processor expands to the model's image-token count.
VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_VLM = dict(image_size=32, patch_size=8, vision_hidden=32, text_hidden=64, text_layers=2)


def _tiny_tokenizer(out_dir: Path):
    """The bundled WordLevel tokenizer plus the task's words and an ``<image>`` special token."""
    from transformers import AutoTokenizer

    spec = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for w in VISION_WORDS:
        vocab.setdefault(w, len(vocab))
    spec["added_tokens"].append({"id": len(vocab), "content": IMAGE_TOKEN, "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    (out_dir / "tokenizer_config.json").write_text((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    tok.chat_template = VISION_CHAT_TEMPLATE
    return tok


def build_tiny_vlm(out_dir: str | Path, seed: int = 0) -> Path:
    """A LLaVA-style model (tiny SigLIP tower + tiny Llama) and its LlavaProcessor, saved into ``out_dir``.

    32×32 images in 8×8 patches: 16 image tokens per image. Built from configs only (no hub).
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    out = Path(out_dir)
    t = TINY_VLM
    tok = _tiny_tokenizer(out)
    image_processor = SiglipImageProcessorPil(size={"height": t["image_size"], "width": t["image_size"]},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # SigLIP has no CLS token: "full" keeps every patch feature and no extra image token is added.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=t["patch_size"],
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               image_token=IMAGE_TOKEN, chat_template=VISION_CHAT_TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=t["vision_hidden"], intermediate_size=2 * t["vision_hidden"],
                                num_hidden_layers=1, num_attention_heads=2, image_size=t["image_size"],
                                patch_size=t["patch_size"])
    text = LlamaConfig(vocab_size=len(tok), hidden_size=t["text_hidden"],
                       intermediate_size=2 * t["text_hidden"], num_hidden_layers=t["text_layers"],
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         projector_hidden_act="gelu",
                         image_seq_length=(t["image_size"] // t["patch_size"]) ** 2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ the image set
def draw_shape(shape: str, colour: str, rng: random.Random, size: int = 32):
    """A ``size``² PNG-able image: one filled shape of ``colour`` on a light grey background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def vision_pair(image_path: str, colour: str, wrong: str) -> dict:
    """One TRL vision preference row: typed-content prompt with one image, chosen = the right colour."""
    return {"images": [image_path],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}]}


def make_shapes_dataset(out_dir: str | Path = VISION_DIR, n_train: int = 128, n_test: int = 32,
                        seed: int = 7) -> Path:
    """Write images/NNNN.png and {train,test}.jsonl (image paths relative to the jsonl files).
    Deterministic."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = sorted(COLOURS)
    rows = []
    for i in range(n_train + n_test):
        shape, colour = SHAPES[i % len(SHAPES)], colours[rng.randrange(len(colours))]
        wrong = rng.choice([c for c in colours if c != colour])
        name = f"images/{i:04d}.png"
        draw_shape(shape, colour, rng).save(out / name, optimize=True)
        rows.append(vision_pair(name, colour, wrong))
    for fname, part in (("train.jsonl", rows[:n_train]), ("test.jsonl", rows[n_train:])):
        (out / fname).write_text("".join(json.dumps(r) + "\n" for r in part))
    return out
