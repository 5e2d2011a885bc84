"""Nested dicts, the one home of their helpers: configs, DeepSpeed overrides and sweep grids are nested dicts
addressed by dotted keys (``reference.source``)."""

from __future__ import annotations

from typing import Any


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, recursively where both hold a dict; a new dict (neither is
    changed)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    """``d[a][b][c] = value`` for ``key`` "a.b.c", creating the sections on the way."""
    *sections, leaf = key.split(".")
    for s in sections:
        d = d.setdefault(s, {})
    d[leaf] = value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(out, key, value)
    return out
