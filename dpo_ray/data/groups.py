"""Prompt groups: one prompt with K ≥ 2 scored or ranked responses, and the pairs a run trains on.

A group row (docs/data.md) is ``{"prompt": ..., "completions": [c1, ..., cK], "scores": [s1, ..., sK]}``
(higher is better) or the same with ``"ranking": [r1, ..., rK]`` (1 = best; a ranking becomes the scores -r).
Standard (strings) or conversational (message lists). Pure Python, no Ray, no tokenizer: ``normalize_group``
runs the bad-row checks of one row, ``group_pairs`` picks the (chosen, rejected) pairs by the config's rule:

- ``all``: every (i, j) with s_i - s_j > group_margin;
- ``best_vs_rest``: the best response against each response it beats by more than the margin;
- ``best_vs_worst``: the best against the worst, when the gap exceeds the margin;
- ``best_vs_random``: the best against one response it beats by more than the margin, drawn uniformly with a
  generator seeded by (seed, row_id), so the same row gets the same pair in every epoch, run and worker.

Ties: responses with equal scores never form a pair (the gap must exceed the margin, which is ≥ 0); when
several share the best (worst) score, the one listed first is "the best" ("the worst"). A group that yields no
pair (every score within the margin of each other) is a bad row of kind ``no_pairs``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from dpo_ray.data.rows import (
    IDENTICAL,
    MISNAMED_COLUMN,
    MISSING_COLUMN,
    NO_PAIRS,
    NULL_VALUE,
    WRONG_TYPE,
    BadRow,
    Example,
    _check_completion,
    _extras,
    _field,
    _is_conv,
    _require,
)

GROUP_PAIRS = ("all", "best_vs_rest", "best_vs_worst", "best_vs_random")
GROUP_COLUMNS = ("prompt", "completions", "scores", "ranking")


def is_group_row(row: Any) -> bool:
    """Does this raw row use the group format (a ``completions`` column)?"""
    return isinstance(row, dict) and "completions" in row


@dataclass
class GroupExample:
    """A normalised group row: an ``Example`` whose ``completions`` are the K responses, and their scores."""

    example: Example
    scores: list[float]


def _number(v: Any, name: str, i: int) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRow(WRONG_TYPE, f"{name}[{i}] should be a number, got {type(v).__name__} ({v!r:.40})")
    x = float(v)
    if not math.isfinite(x):
        raise BadRow(WRONG_TYPE, f"{name}[{i}] is {x}; give every response a finite "
                                 f"{name[:-1] if name == 'scores' else 'rank'}")
    return x


def normalize_group(row: Any) -> GroupExample:
    """A group row -> GroupExample, or BadRow naming the problem (the pair formats' kinds, and ``no_pairs``
    later, in ``group_pairs``)."""
    if not isinstance(row, dict):
        raise BadRow(WRONG_TYPE,
                     f"a row should be an object with prompt/completions/scores, got {type(row).__name__}")
    for n in GROUP_COLUMNS:
        if n in row and row[n] is None:
            raise BadRow(NULL_VALUE, f"column {n!r} is null; give it a value")
    if "completions" not in row and row.get("chosen") is not None:
        raise BadRow(MISSING_COLUMN, "missing column 'completions': this row is a pair (chosen/rejected) but "
                                     "the dataset's first rows are prompt groups; use one format per dataset")
    if "chosen" in row or "rejected" in row:
        raise BadRow(MISNAMED_COLUMN,
                     "the row has 'completions' (a prompt group) and also 'chosen'/'rejected' (a pair); "
                     "use one format per row")
    _require(row, ("prompt", "completions"),
             "group rows need 'prompt', 'completions' and 'scores' or 'ranking'")
    has_scores, has_rank = row.get("scores") is not None, row.get("ranking") is not None
    if has_scores == has_rank:
        raise BadRow(WRONG_TYPE if has_scores else MISSING_COLUMN,
                     "a group row needs exactly one of 'scores' (higher is better) or 'ranking' (1 = best), "
                     "got " + ("both" if has_scores else "neither"))
    comps = row["completions"]
    if not isinstance(comps, (list, tuple)):
        raise BadRow(WRONG_TYPE,
                     f"column 'completions' should be a list of responses, got {type(comps).__name__}")
    if len(comps) < 2:
        raise BadRow(WRONG_TYPE,
                     f"column 'completions' has {len(comps)} response(s); a group needs at least 2")
    name = "scores" if has_scores else "ranking"
    values = row[name]
    if not isinstance(values, (list, tuple)) or len(values) != len(comps):
        got = f"{len(values)} value(s)" if isinstance(values, (list, tuple)) else type(values).__name__
        raise BadRow(WRONG_TYPE,
                     f"column {name!r} should be a list with one value per response ({len(comps)}), "
                     f"got {got}")
    nums = [_number(v, name, i) for i, v in enumerate(values)]
    scores = nums if has_scores else [-x for x in nums]
    conv = _is_conv(comps[0], "completions[0]")
    fields = {"prompt": row["prompt"], **{f"completions[{i}]": c for i, c in enumerate(comps)}}
    for n, v in fields.items():
        if _is_conv(v, n) != conv:
            raise BadRow(WRONG_TYPE,
                         f"{n!r} must be the same kind as completions[0] (all strings or all message lists)")
    # rows._field reads row[name]; give it a row view with the indexed names
    view = {**fields, **({"images": row["images"]} if "images" in row else {})}
    prompt = _field(view, "prompt", conv)
    responses = [_field(view, f"completions[{i}]", conv) for i in range(len(comps))]
    for i, c in enumerate(responses):
        _check_completion(c, f"completions[{i}]", conv)
    tools, kwargs = _extras(row)
    return GroupExample(Example(conv, prompt, responses, tools, kwargs, row.get("images")), scores)


def group_pairs(scores: list[float], rule: str = "all", margin: float = 0.0, seed: int = 0,
                row_id: int = 0) -> list[tuple[int, int]]:
    """(chosen, rejected) response indices of a group by ``rule`` (see the module doc); [] when none."""
    if rule not in GROUP_PAIRS:
        raise ValueError(f"group_pairs must be one of {GROUP_PAIRS}, got {rule!r}")
    k = len(scores)
    if rule == "all":
        return [(i, j) for i in range(k) for j in range(k) if scores[i] - scores[j] > margin]
    best = max(range(k), key=lambda i: (scores[i], -i))  # the first of the highest
    beaten = [j for j in range(k) if scores[best] - scores[j] > margin]
    if not beaten:
        return []
    if rule == "best_vs_rest":
        return [(best, j) for j in beaten]
    if rule == "best_vs_worst":
        worst = min(range(k), key=lambda i: (scores[i], i))  # the first of the lowest
        return [(best, worst)]
    return [(best, random.Random(f"{seed}:{row_id}").choice(beaten))]


def checked_pairs(group: GroupExample, rule: str, margin: float, seed: int,
                  row_id: int) -> list[tuple[int, int]]:
    """``group_pairs`` with the bad-row rules: no pair at all, or a pair of two identical responses."""
    pairs = group_pairs(group.scores, rule, margin, seed, row_id)
    if not pairs:
        raise BadRow(NO_PAIRS, f"no pair: every score is within group_margin={margin:g} of the others "
                               f"({', '.join(f'{s:g}' for s in group.scores)}); such a group teaches nothing")
    comps = group.example.completions
    for i, j in pairs:
        if comps[i] == comps[j]:
            raise BadRow(IDENTICAL,
                         f"completions[{i}] and completions[{j}] are identical but scored differently, "
                         "so their pair teaches nothing; remove the duplicate")
    return pairs



def expand_to_pairs(rows: list[dict], rule: str = "all", margin: float = 0.0, seed: int = 0) -> list[dict]:
    """Group rows -> the pair rows (prompt / chosen / rejected, plus the row's tools and template arguments)
    of the pairs ``rule`` gives, row by row: what every other framework trains on (benchmarks, tests). A row's
    index in ``rows`` is its row_id, as the pipeline numbers an in-memory list. Bad rows raise ``BadRow``."""
    out = []
    for row_id, row in enumerate(rows):
        group = normalize_group(row)
        extra = {k: row[k] for k in ("tools", "chat_template_kwargs") if row.get(k) is not None}
        for i, j in checked_pairs(group, rule, margin, seed, row_id):
            out.append({"prompt": row["prompt"], "chosen": row["completions"][i],
                        "rejected": row["completions"][j], **extra})
    return out
