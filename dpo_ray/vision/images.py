"""Decoding the ``images`` column of a row into RGB PIL images (PIL is imported on first use)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


class ImageError(ValueError):
    """An image that cannot be read; the message names the item (and its file)."""


def as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray)) \
            and getattr(value, "ndim", 0) == 1:
        return list(value)  # a numpy object array from Arrow
    return [value]


def load_images(value: Any, base_dir: str | Path | None = None) -> list:
    """The ``images`` column of one row -> RGB PIL images.

    Items: a PIL image, a path (relative paths resolve against ``base_dir``, the data file's directory, then
    the working directory), encoded bytes, or a ``{"bytes", "path"}`` dict (datasets' Image feature).
    Raises ``ImageError`` naming the item and the file.
    """
    from PIL import Image

    out = []
    for i, item in enumerate(as_list(value)):
        what = f"images[{i}]"
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        try:
            if isinstance(item, Image.Image):
                img = item
            elif isinstance(item, (bytes, bytearray, memoryview)):
                what += " (bytes)"
                img = Image.open(io.BytesIO(bytes(item)))
            elif isinstance(item, (str, Path)):
                path = Path(item).expanduser()
                if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
                    path = Path(base_dir) / path
                what += f" file {str(path)!r}"
                if not path.is_file():
                    where = (f" (relative paths resolve against {base_dir} and the working directory)"
                             if base_dir else "")
                    raise ImageError(f"{what} not found{where}")
                img = Image.open(path)
            else:
                raise ImageError(f"{what} should be a path, bytes or a PIL image, got {type(item).__name__}")
            out.append(img.convert("RGB"))  # forces the decode: a truncated file fails here, not in a worker
        except ImageError:
            raise
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ImageError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    return out
