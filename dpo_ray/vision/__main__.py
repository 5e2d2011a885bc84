"""``python -m dpo_ray.vision OUT_DIR``: write the tiny VLM and its processor (save_pretrained) into
OUT_DIR."""

import sys

from dpo_ray.vision.tiny import build_tiny_vlm

if len(sys.argv) != 2:
    sys.exit("usage: python -m dpo_ray.vision OUT_DIR   (writes the tiny VLM and its processor)")
print(build_tiny_vlm(sys.argv[1]))
