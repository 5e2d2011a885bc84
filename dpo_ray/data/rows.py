"""Raw rows -> normalised examples: format detection and every bad-row check, one row at a time.

Pure Python (no Ray, no tokenizer): the same checks run in the Ray Data tasks and in ``tokenize_rows``.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from dpo_ray.errors import BadRowError

# Bad-row kinds, as counted in ``DataStats.report()`` and named in errors.
MISSING_COLUMN = "missing_column"
WRONG_TYPE = "wrong_type"
EMPTY_COMPLETION = "empty_completion"
IDENTICAL = "identical_chosen_rejected"
INVALID_MESSAGE = "invalid_message"
UNDECODABLE = "undecodable_text"
MALFORMED_JSON = "malformed_json"
PROMPT_FILLS = "prompt_fills_max_length"
BAD_IMAGE = "bad_image"
NULL_VALUE = "null_value"
MISNAMED_COLUMN = "misnamed_column"
TEMPLATE_ERROR = "template_error"
IDENTICAL_TRUNCATED = "identical_after_truncation"
NO_PAIRS = "no_pairs"  # a prompt group (dpo_ray.data.groups) whose scores give no pair
BAD_ROW_KINDS = (MISSING_COLUMN, WRONG_TYPE, EMPTY_COMPLETION, IDENTICAL, INVALID_MESSAGE, UNDECODABLE,
                 MALFORMED_JSON, PROMPT_FILLS, BAD_IMAGE, NULL_VALUE, MISNAMED_COLUMN, TEMPLATE_ERROR,
                 IDENTICAL_TRUNCATED, NO_PAIRS)
# The columns a row is read from. A null in one of the TEXT_COLUMNS is a bad row (not "absent"): a file
# whose rows have prompts must not train one row as implicit-prompt because its cell was empty.
KNOWN_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "images", "tools",
                 "chat_template_kwargs")
TEXT_COLUMNS = {"dpo": ("prompt", "chosen", "rejected"),
                "sft": ("prompt", "chosen", "completion", "messages")}

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_SKIP_HINT = ("Fix the row, or set on_bad_row: skip (--on_bad_row skip) to drop such rows; they are counted "
              "and reported.")


class BadRow(Exception):
    """Internal: raised by the checks with a kind and a problem; the caller adds the location."""

    def __init__(self, kind: str, problem: str):
        super().__init__(problem)
        self.kind, self.problem = kind, problem


def where(source: str | None, row_id: int, line: int | None) -> str:
    """'train.jsonl line 17' / 'in-memory rows, row 3' for messages."""
    if source and line is not None:
        unit = "line" if source.endswith((".jsonl", ".json", ".csv")) else "row"
        return f"{source} {unit} {line} (row_id {row_id})"
    return f"{source or 'dataset'}, row {row_id}"


def _canonical(name: str) -> str:
    """A column name without case, invisible characters (BOM, zero-width), whitespace, '_' or '-'."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", name)
                   if unicodedata.category(ch)[0] not in "CZ" and ch not in "_-").casefold()


_CANONICAL = {_canonical(k): k for k in KNOWN_COLUMNS}


def misnamed_columns(names) -> list[tuple[str, str]]:
    """(name as written, the known column it spells) for names that are a known column up to case or
    invisible characters ('\\ufeffprompt', 'Chosen', 'rejected ')."""
    out = []
    for n in names:
        if isinstance(n, str) and n not in KNOWN_COLUMNS and _canonical(n) in _CANONICAL:
            out.append((n, _CANONICAL[_canonical(n)]))
    return out


def misnamed_message(pairs: list[tuple[str, str]]) -> str:
    spelled = "; ".join(f"{ascii(n)} looks like {k!r} (differs in case, spaces or invisible characters)"
                        for n, k in pairs)
    bom = any("\ufeff" in n for n, _ in pairs)
    return (f"column {spelled}; dpo_ray reads only the exact names {', '.join(KNOWN_COLUMNS)}: rename the "
            "column"
            + (" ('\\ufeff' is a byte-order mark: save the file as UTF-8 without BOM)" if bom else ""))


def bad_row_error(bad: BadRow, source: str | None, row_id: int, line: int | None) -> BadRowError:
    return BadRowError(f"bad row [{bad.kind}] at {where(source, row_id, line)}: {bad.problem}. {_SKIP_HINT}",
                       bad.kind, row_id)


@dataclass
class Example:
    """One normalised row. Texts are str (standard) or message lists (conversational)."""

    conversational: bool
    prompt: Any  # str | list[dict]
    completions: list[Any]  # [chosen, rejected] (dpo) or [chosen] (sft)
    tools: list | None = None
    template_kwargs: dict = field(default_factory=dict)
    images: Any = None  # the raw ``images`` column (vision rows), decoded by the tokenize step


def _text(value: Any, name: str) -> str:
    """A str field: bytes are decoded as UTF-8; text that cannot be UTF-8 is an undecodable row."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow(UNDECODABLE, f"column {name!r} holds bytes that are not UTF-8 ({e.reason} at byte "
                                      f"{e.start}); re-encode the file as UTF-8") from None
    if not isinstance(value, str):
        raise BadRow(WRONG_TYPE, f"column {name!r} should be a string here, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(UNDECODABLE, f"column {name!r} holds text that is not valid UTF-8 (lone surrogates); "
                                  "re-encode the source as UTF-8") from None
    return value


def _parts(value: list, name: str) -> list[dict]:
    """Typed message content (vision rows): [{"type": "image"}, {"type": "text", "text": str}, ...]."""
    out = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append({**part, "text": _text(part.get("text"), f"{name}[{j}].text")})
        elif kind == "image":
            out.append(part)
        else:
            raise BadRow(INVALID_MESSAGE, f"{name}[{j}] should be {{\"type\": \"text\", \"text\": ...}} or "
                                          f"{{\"type\": \"image\"}}, got {part!r:.80}")
    return out


def _content_text(content: Any) -> str:
    return content if isinstance(content, str) else " ".join(p["text"] for p in content
                                                             if p["type"] == "text")


def _messages(value: Any, name: str, typed: bool = False) -> list[dict]:
    if not isinstance(value, list):
        raise BadRow(WRONG_TYPE, f"column {name!r} should be a list of {{role, content}} messages, "
                                 f"got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(INVALID_MESSAGE,
                         f"{name}[{i}] should be a {{\"role\": ..., \"content\": ...}} object, got {m!r:.80}")
        role = _text(m["role"], f"{name}[{i}].role")
        if role not in ROLES:
            raise BadRow(INVALID_MESSAGE,
                         f"{name}[{i}] has role {role!r}; use one of {', '.join(sorted(ROLES))}")
        if typed and isinstance(m["content"], list):
            out.append({**m, "role": role, "content": _parts(m["content"], f"{name}[{i}].content")})
            continue
        if not isinstance(m["content"], (str, bytes)):
            raise BadRow(INVALID_MESSAGE,
                         f"{name}[{i}].content should be a string, got {type(m['content']).__name__} "
                         "(typed multimodal content needs an 'images' column and a processor)")
        out.append({**m, "role": role, "content": _text(m["content"], f"{name}[{i}].content")})
    return out


def _field(row: dict, name: str, conversational: bool) -> Any:
    # typed content ({"type": "image"} parts) belongs to vision rows: those with an ``images`` column
    return _messages(row[name], name, typed="images" in row) if conversational else _text(row[name], name)


def _check_columns(row: dict, mode: str) -> None:
    """Misspelled known columns and nulls in the text columns are bad rows, never 'absent'."""
    misnamed = misnamed_columns(row)
    if misnamed:
        raise BadRow(MISNAMED_COLUMN, misnamed_message(misnamed))
    for n in TEXT_COLUMNS[mode]:
        if n in row and row[n] is None:
            raise BadRow(NULL_VALUE,
                         f"column {n!r} is null (JSON null, an empty CSV cell or a missing Parquet "
                         f"value), so the row would train as if it had no {n!r}; give it a value, "
                         f"or leave the key out of rows that have none (JSON Lines)")


def _require(row: dict, names: tuple[str, ...], hint: str) -> None:
    for n in names:
        if row.get(n) is None:
            have = ", ".join(sorted(row)) or "none"
            raise BadRow(MISSING_COLUMN, f"missing column {n!r} (row has: {have}); {hint}")


def _is_conv(value: Any, name: str) -> bool:
    if isinstance(value, list):
        return True
    if isinstance(value, (str, bytes, bytearray)):
        return False
    raise BadRow(WRONG_TYPE,
                 f"column {name!r} should be a string or a list of messages, got {type(value).__name__}")


def common_prefix(a: str, b: str) -> str:
    """Longest common prefix, backed off to a word boundary so completions start at a whole word."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if n < len(a) or n < len(b):  # cut inside a word: back off to the last whitespace
        while n > 0 and not a[n - 1].isspace() and not (n < len(a) and a[n].isspace()) \
                and not (n < len(b) and b[n].isspace()):
            n -= 1
        while n > 0 and a[n - 1].isspace():  # keep the space with the completion (" blue")
            n -= 1
    return a[:n]


def _extras(row: dict) -> tuple[list | None, dict]:
    tools, kwargs = row.get("tools"), row.get("chat_template_kwargs")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise BadRow(WRONG_TYPE,
                         "column 'tools' is a string but not JSON; give a list of tool schemas") from None
    if tools is not None and not isinstance(tools, list):
        raise BadRow(WRONG_TYPE,
                     f"column 'tools' should be a list of tool schemas, got {type(tools).__name__}")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else None
        except json.JSONDecodeError as e:
            raise BadRow(WRONG_TYPE,
                         f"column 'chat_template_kwargs' is a string but not a JSON object ({e.msg} at "
                         f"column {e.colno}); give an object such as "
                         f"{{\"enable_thinking\": false}}") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadRow(WRONG_TYPE,
                     f"column 'chat_template_kwargs' should be an object, got {type(kwargs).__name__}")
    return tools or None, kwargs or {}


def _check_completion(value: Any, name: str, conversational: bool) -> None:
    empty = (not value or all(not _content_text(m["content"]).strip() for m in value)) if conversational \
        else not value.strip()
    if empty:
        raise BadRow(EMPTY_COMPLETION, f"column {name!r} has an empty completion")


def normalize_pair(row: Any) -> Example:
    """A DPO row in any TRL preference format -> Example(prompt, [chosen, rejected])."""
    if not isinstance(row, dict):
        raise BadRow(WRONG_TYPE,
                     f"a row should be an object with prompt/chosen/rejected, got {type(row).__name__}")
    _check_columns(row, "dpo")
    hint = "DPO rows need 'chosen' and 'rejected' ('prompt' optional)"
    if row.get("chosen") is None and ("completion" in row or "messages" in row):
        hint += "; this looks like SFT data (completion/messages): run `dpo-ray sft` for it"
    if row.get("chosen") is None and "completions" in row:  # a prompt group among pair rows
        hint += ("; this row is a prompt group (completions + scores/ranking) but the dataset's first rows "
                 "are pairs: use one format per dataset")
    _require(row, ("chosen", "rejected"), hint)
    conv = _is_conv(row["chosen"], "chosen")
    if _is_conv(row["rejected"], "rejected") != conv:
        raise BadRow(WRONG_TYPE, "'chosen' and 'rejected' must both be strings or both be message lists")
    chosen, rejected = _field(row, "chosen", conv), _field(row, "rejected", conv)
    if row.get("prompt") is not None:
        if _is_conv(row["prompt"], "prompt") != conv:
            raise BadRow(WRONG_TYPE,
                         "'prompt' must be the same kind as 'chosen' (both strings or both message lists)")
        prompt = _field(row, "prompt", conv)
    elif conv:  # implicit prompt: all messages but the last
        if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
            raise BadRow(INVALID_MESSAGE,
                         "without a 'prompt' column, 'chosen' and 'rejected' must be the same "
                         "conversation up to their last message")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:  # implicit prompt: longest common prefix
        prompt = common_prefix(chosen, rejected)
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    _check_completion(chosen, "chosen", conv)
    _check_completion(rejected, "rejected", conv)
    if chosen == rejected:
        raise BadRow(IDENTICAL, "'chosen' and 'rejected' are identical, so the pair teaches nothing")
    tools, kwargs = _extras(row)
    return Example(conv, prompt, [chosen, rejected], tools, kwargs, row.get("images"))


def normalize_sft(row: Any) -> Example:
    """An SFT row -> Example(prompt, [completion]).

    Accepts preference rows (prompt + chosen), prompt/completion rows, and ``messages`` rows (prompt = all
    messages but the last).
    """
    if not isinstance(row, dict):
        raise BadRow(WRONG_TYPE, f"a row should be an object, got {type(row).__name__}")
    _check_columns(row, "sft")
    if row.get("messages") is not None:
        msgs = _messages(row["messages"], "messages", typed="images" in row)
        if len(msgs) < 1:
            raise BadRow(EMPTY_COMPLETION, "'messages' is empty")
        prompt, completion, conv = msgs[:-1], msgs[-1:], True
    else:
        name = "completion" if row.get("completion") is not None else "chosen"
        _require(row, (name,), "SFT rows need 'messages', 'prompt'+'completion', or preference columns")
        conv = _is_conv(row[name], name)
        completion = _field(row, name, conv)
        if row.get("prompt") is not None:
            if _is_conv(row["prompt"], "prompt") != conv:
                raise BadRow(WRONG_TYPE, f"'prompt' must be the same kind as {name!r}")
            prompt = _field(row, "prompt", conv)
        elif conv:
            prompt, completion = completion[:-1], completion[-1:]
        elif name == "chosen" and row.get("rejected") is not None:
            prompt = common_prefix(completion, _text(row["rejected"], "rejected"))
            completion = completion[len(prompt):]
        else:
            prompt = ""
    _check_completion(completion, "completion", conv)
    tools, kwargs = _extras(row)
    return Example(conv, prompt, [completion], tools, kwargs, row.get("images"))
