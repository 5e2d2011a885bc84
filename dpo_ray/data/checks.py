"""The data checks of `dpo-ray inspect-data` (``INSPECT_CHECKS``), and ``quick_checks``: the same checks on a
handful of rows, in-process, for ``dpo-ray train`` to warn."""

from __future__ import annotations

from dpo_ray.data.analyze import Analyzer
from dpo_ray.data.rows import PROMPT_FILLS
from dpo_ray.data.tokenize import RawRow

QUICK_CHECKS = ("doubled_bos", "doubled_eos", "prompt_not_prefix", "identical_pairs",
                "whitespace_identical_pairs", "missing_eos", "missing_generation_prompt", "empty_prompt")
# `dpo-ray inspect-data` checks (docs/inspect.md): name -> (default level, default max_fraction, meaning).
# A check fires when the fraction of rows it finds exceeds max_fraction (0.0: any row). One table: the
# config's inspect section validates its keys against it and dpo_ray.preflight runs exactly these checks.
INSPECT_CHECKS: dict[str, tuple[str, float, str]] = {
    "bad_rows_raise": ("error", 0.0, "bad rows while on_bad_row is raise: training would stop at the first"),
    "dropped_rows": ("error", 0.05, "rows the pipeline drops (bad rows under skip, prompt fills max_length)"),
    "identical_pairs": ("error", 0.0, "chosen identical to rejected: the pair teaches nothing"),
    "whitespace_identical_pairs": ("warn", 0.0, "chosen and rejected differ only in whitespace"),
    "prompt_not_prefix": ("error", 0.01,
                          "the tokenized prompt is not a prefix of the tokenized prompt+completion"),
    "doubled_bos": ("warn", 0.0, "a sequence starts with two BOS tokens"),
    "doubled_eos": ("warn", 0.0, "a sequence ends with two EOS tokens"),
    "missing_eos": ("warn", 0.0, "a completion does not end with EOS"),
    "missing_generation_prompt": ("warn", 0.0, "the chat template renders the same prompt with and without "
                                               "add_generation_prompt"),
    "truncated_rows": ("warn", 0.20, "rows max_length truncates"),
    "empty_prompt": ("warn", 0.0, "the prompt is empty: the pair is trained with no context to prefer in"),
    "mixed_formats": ("error", 0.0,
                      "a source file mixes row formats (standard and conversational, or explicit and "
                      "implicit prompts): the minority rows are tokenized another way"),
    "no_training_steps": ("error", 0.0, "the rows kept are too few for one optimizer step (workers × "
                                        "per_device_train_batch_size × gradient_accumulation_steps)"),
}


_HINT = "run `dpo-ray inspect-data` with the same flags for the whole dataset"


def quick_checks(rows: list[dict], tokenizer, cfg) -> list[str]:
    """One warning per check kind that fires on ``rows`` (e.g. the first 64), else []. No Ray, no I/O.

    Checks: doubled BOS/EOS, prompt not a token prefix of prompt+completion, chosen == rejected (also up to
    whitespace), missing EOS, missing generation prompt, rows over max_length. Thresholds and levels come
    from ``cfg.inspect`` (a check at level ``off`` stays quiet). Row numbers index ``rows``.
    """
    try:
        piece = Analyzer(tokenizer, cfg, keep=3).analyze(
            [RawRow(i, None, r) for i, r in enumerate(rows)], None)
    except Exception as e:  # noqa: BLE001 - a warning helper must not stop training; the pipeline reports it
        return [f"data check skipped on the first {len(rows)} rows ({type(e).__name__}: {e})"]
    n, out = max(len(rows), 1), []
    for name in QUICK_CHECKS:
        h = piece.checks[name]
        if cfg.inspect.level(name) != "off" and h.count and h.count / n > cfg.inspect.threshold(name):
            out.append(_message(name, h.count, len(rows), [r[0] for r in h.rows], _detail(h.rows)))
    fills = piece.bad[PROMPT_FILLS].count if PROMPT_FILLS in piece.bad else 0
    over = piece.checks["truncated_rows"]
    if cfg.inspect.level("truncated_rows") != "off" \
            and (fills or over.count / n > cfg.inspect.threshold("truncated_rows")):
        ids = sorted([r[0] for r in over.rows]
                     + ([r[0] for r in piece.bad[PROMPT_FILLS].rows] if fills else []))[:3]
        out.append(f"over_length: {over.count + fills} of the first {len(rows)} rows are longer than "
                   f"max_length={cfg.max_length} ({over.count} truncated, {fills} dropped: the prompt fills "
                   f"it; rows {', '.join(map(str, ids))}); {_HINT}")
    return out


def _detail(rows) -> str:
    return next((d for _, _, d in rows if d), "")


def _message(name: str, count: int, total: int, ids: list[int], detail: str) -> str:
    extra = f" [{detail}]" if detail else ""
    return (f"{name}: {count} of the first {total} rows (rows {', '.join(map(str, ids))}): "
            f"{INSPECT_CHECKS[name][2]}{extra}; {_HINT}")
