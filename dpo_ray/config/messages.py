"""The words of a config error: a pydantic error as (key, message) in the user's spelling, and "did you
mean" for a misspelt key or value."""

from __future__ import annotations

import difflib
import re

from pydantic import (
    ValidationError,
)

from dpo_ray.redact import redact_value


def _did_you_mean(key: str, known: list[str]) -> str:
    """' did you mean X?' for a misspelt key (sections dotted: ray.num_worker -> ray.num_workers), else ''."""
    section = key.rpartition(".")[0]
    pool = [k for k in known if k.rpartition(".")[0] == section] or known
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.75) or difflib.get_close_matches(
        key.rpartition(".")[2], [k.rpartition(".")[2] for k in known], n=1, cutoff=0.85)
    if not close:
        return ""
    match = next((k for k in known if k == close[0] or k.endswith("." + close[0])), close[0])
    return f"; did you mean {match}?"


def problems_from_pydantic(err: ValidationError, known: list[str], prefix: str = "") -> list[tuple[str, str]]:
    """pydantic's errors as (key, message): an unknown key gets the closest of ``known``, a bad value what it
    got (secrets redacted) and the closest allowed value."""
    out = []
    for e in err.errors():
        key = prefix + ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            out.append((key, "unknown key" + (_did_you_mean(key, known)
                                              or "; check its spelling (`dpo-ray validate --help` "
                                                 "lists every key)")))
        else:
            out.append((key, f"{e['msg']} (got {redact_value(key, e.get('input'))!r})"
                        + _value_did_you_mean(e)))
    return out


def _value_did_you_mean(e: dict) -> str:
    """'; did you mean 'steps'?' for a misspelt value of a key with a fixed set of values (a Literal)."""
    if e["type"] != "literal_error" or not isinstance(e.get("input"), str):
        return ""
    choices = re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))
    return value_did_you_mean(e["input"], choices)


def value_did_you_mean(value: str, choices) -> str:
    """'; did you mean X?' for a misspelt name among ``choices`` (losses, schedules), else ''."""
    by_lower = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), sorted(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""
