"""The one redaction of secrets: saved configs, Tune's trial parameters, the reference store's key files,
error messages and ``dpo-ray validate`` all go through ``redact`` (values) or ``redact_text`` (free text).

What counts as a secret: the value of a key that looks like a credential (a word ending in token or key,
secret, password, credential, auth..., cookie; any case, at any depth; not a tokenizer's pad_token or
max_tokens: ``secret_key``, e.g. ``model_init_kwargs.token``, ``hf_password``,
``auth_header``, ``deepspeed.overrides.comet.api_key``), every value of an ``env_vars`` mapping (they commonly
carry HF_TOKEN and cloud keys), the user:password part of a URL (``https://user:pass@host``), and strings
shaped like well-known access tokens (Hugging Face ``hf_...``, AWS ``AKIA...``, GitHub ``ghp_...``,
``sk-...``).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_PARTS = ("secret", "password", "passwd", "passphrase", "credential", "cookie")  # anywhere in a name
# words ending in token / key are credentials (hub_token, HF_TOKEN, api_key, aws_access_key_id, apikey),
# except after these words (a tokenizer's pad_token, a sort key); tokenizer, max_tokens, tokens_seen are
# other words
_NOT_SECRET_BEFORE = frozenset(("pad", "bos", "eos", "unk", "sep", "cls", "mask", "special", "image", "video",
                                "start", "end", "sort", "metric", "content", "cache", "dict", "primary",
                                "row", "group"))
ALL_SECRET = ("env_vars",)  # mappings whose every value is a secret
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
_TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
                           r"|sk-[A-Za-z0-9_-]{20,}|xox[abpr]-[A-Za-z0-9-]{10,})\b")


_ASSIGNMENT = re.compile(r"""(?P<lead>(?P<q1>["']?)(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P=q1)\s*[:=]\s*)"""
                         r"""(?P<q2>["']?)(?P<value>[^"'\s,;}\]]+)(?P=q2)""")


def secret_key(name: Any) -> bool:
    """Whether a key's name looks like it holds a credential (any case, snake, kebab or camel case)."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    if any(w in text for w in _SECRET_PARTS):
        return True
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w]
    for i, w in enumerate(words):
        if w.startswith("auth") and w not in ("author", "authors", "authored") or w == "bearer":
            return True
        if w.endswith(("token", "key")) and (i == 0 or words[i - 1] not in _NOT_SECRET_BEFORE):
            return True
    return False


def redact_text(text: str) -> str:
    """``text`` with URL credentials, token-shaped strings and the values of secret-named assignments
    (``HF_TOKEN=...``, ``"api_key": "..."``, ``password: ...``) replaced."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    # a bare KEY=... is a placeholder in a usage line ("KEY=V1,V2"), not a credential
    return _ASSIGNMENT.sub(lambda m: m.group(0)
                           if not secret_key(m.group("name")) or m.group("value") == REDACTED
                           or m.group("name").lower() == "key"
                           else f"{m.group('lead')}{m.group('q2')}{REDACTED}{m.group('q2')}", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings, scalars) with every secret replaced by ``<redacted>``."""
    if isinstance(obj, dict):
        return {k: REDACTED if (secret_key(k) and obj[k] not in (None, "", [], {})) else
                ({kk: REDACTED for kk in obj[k]} if k in ALL_SECRET and isinstance(obj[k], dict)
                 else redact(obj[k]))
                for k in obj}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_value(key: Any, value: Any) -> Any:
    """``value`` as it may be shown under ``key`` (a dotted key: its last part decides)."""
    if secret_key(str(key).rpartition(".")[2]) and value not in (None, "", [], {}):
        return REDACTED
    return redact(value)
