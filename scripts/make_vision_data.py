"""Regenerate dpo_ray/assets/vision/: tiny PNGs of coloured shapes and their preference pairs.

    python scripts/make_vision_data.py            # deterministic: the same rows every run

Each row asks "what colour is the shape ?" about one 32x32 image; chosen is the right colour, rejected
a wrong one (TRL's vision format: typed message content plus an ``images`` column of relative paths).
"""

from __future__ import annotations

import shutil

from dpo_ray.vision.tiny import VISION_DIR, make_shapes_dataset

if __name__ == "__main__":
    shutil.rmtree(VISION_DIR, ignore_errors=True)
    out = make_shapes_dataset(VISION_DIR)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1024:.0f} KiB)")
