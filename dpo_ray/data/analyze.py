"""Raw rows -> what `dpo-ray inspect-data` counts about them (no Ray here; docs/inspect.md).

``Analyzer.analyze`` runs a piece of rows through the training pipeline's own steps (``normalize_pair``,
``RowProcessor``'s chat-template rendering, tokenization, EOS rule and ``truncate``), with skip
semantics whatever ``on_bad_row`` says, and returns a ``Piece``: counts per format, source, bad-row kind
and check, the first rows of each, and the token lengths of every row. Pieces merge associatively, so
the Ray tasks' results can arrive in any order.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpo_ray.data.groups import checked_pairs, is_group_row, normalize_group
from dpo_ray.data.rows import BadRow, Example, normalize_pair, where
from dpo_ray.data.tokenize import RawRow, RowProcessor, TokenizeOptions, diverge, identical_tokens

# Checks counted per row here; "bad_rows_raise", "dropped_rows", "mixed_formats" and "no_training_steps" are
# derived from the counts when the report is built.
ROW_CHECKS = ("identical_pairs", "whitespace_identical_pairs", "prompt_not_prefix", "doubled_bos",
              "doubled_eos", "missing_eos", "missing_generation_prompt", "truncated_rows", "empty_prompt")
UNREADABLE = "unreadable"
_WS = re.compile(r"\s+")


@dataclass
class Hits:
    """How many rows a check (or bad-row kind) found, and the first few: (row_id, where, detail)."""

    count: int = 0
    rows: list[tuple[int, str, str]] = field(default_factory=list)

    def add(self, row_id: int, at: str, detail: str = "", keep: int = 5) -> None:
        self.count += 1
        if len(self.rows) < keep or row_id < self.rows[-1][0]:
            self.rows = sorted([*self.rows, (row_id, at, detail)])[:keep]

    def merge(self, other: Hits, keep: int) -> None:
        self.count += other.count
        self.rows = sorted(self.rows + other.rows)[:keep]


def _lengths(n: int = 0) -> dict[str, np.ndarray]:
    return {k: np.zeros(n, dtype=np.int32) for k in ("row_id", "prompt", "chosen", "rejected", "chosen_seq",
                                                       "rejected_seq", "kept")}


@dataclass
class Piece:
    """The counts of some rows. ``lengths`` has one entry per tokenized row (untruncated prompt / completion
    tokens; ``*_seq`` the truncated sequence lengths training sees; ``kept`` 0 for rows the pipeline
    drops)."""

    rows: int = 0
    formats: Counter = field(default_factory=Counter)
    sources: dict[str, Counter] = field(default_factory=dict)
    source_formats: dict[tuple[str, str], Hits] = field(default_factory=dict)  # (source, format) -> its rows
    bad: dict[str, Hits] = field(default_factory=dict)
    checks: dict[str, Hits] = field(default_factory=lambda: {c: Hits() for c in ROW_CHECKS})
    tokens_cut: int = 0  # completion tokens max_length removes
    length_parts: list[dict[str, np.ndarray]] = field(default_factory=list)  # concatenated once, when read

    @property
    def lengths(self) -> dict[str, np.ndarray]:
        if len(self.length_parts) != 1:
            parts = self.length_parts or [_lengths()]
            self.length_parts = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}]
        return self.length_parts[0]

    def merge(self, other: Piece, keep: int) -> Piece:
        self.rows += other.rows
        self.formats.update(other.formats)
        for src, c in other.sources.items():
            self.sources.setdefault(src, Counter()).update(c)
        for key, h in other.source_formats.items():
            self.source_formats.setdefault(key, Hits()).merge(h, keep)
        for kind, h in other.bad.items():
            self.bad.setdefault(kind, Hits()).merge(h, keep)
        for name, h in other.checks.items():
            self.checks.setdefault(name, Hits()).merge(h, keep)
        self.tokens_cut += other.tokens_cut
        self.length_parts += other.length_parts
        return self


def row_format(value: Any) -> str:
    """standard/conversational × explicit/implicit prompt, from the raw row (``unreadable`` if it is not one);
    a prompt group (``completions``): standard/conversational ``_group``."""
    if isinstance(value, dict) and isinstance(value.get("completions"), list) and value["completions"]:
        return f"{'conversational' if isinstance(value['completions'][0], list) else 'standard'}_group"
    if not isinstance(value, dict) or value.get("chosen") is None:
        return UNREADABLE
    kind = "conversational" if isinstance(value["chosen"], list) else "standard"
    return f"{kind}_{'explicit' if value.get('prompt') is not None else 'implicit'}_prompt"


def _squash(x: Any) -> Any:
    """A completion with all whitespace collapsed (messages: role and squashed content)."""
    if isinstance(x, str):
        return _WS.sub("", x)
    if isinstance(x, list):
        return [(m.get("role"), _squash(m.get("content"))) if isinstance(m, dict) else m for m in x]
    return x


def pair_identity(value: Any) -> str | None:
    """'identical' / 'whitespace' when the raw chosen and rejected are equal / equal up to whitespace."""
    if not isinstance(value, dict):
        return None
    c, r = value.get("chosen"), value.get("rejected")
    if c is None or r is None:
        return None
    if c == r:
        return "identical"
    if type(c) is type(r) and _squash(c) == _squash(r):
        return "whitespace"
    return None


class Analyzer:
    """Runs the training pipeline's row steps on raw rows and counts what the checks look for."""

    def __init__(self, tokenizer, cfg, keep: int = 5):
        opts = TokenizeOptions(cfg.max_length, cfg.truncation_mode, "skip", "dpo")
        self.proc = RowProcessor(tokenizer, opts)  # as training tokenizes and truncates
        # untruncated
        self.full = RowProcessor(tokenizer, TokenizeOptions(None, cfg.truncation_mode, "skip", "dpo"))
        self.tok, self.keep = tokenizer, keep
        # prompt groups: the pair rule training uses; a group is checked as its bad-row rules and its
        # first pair
        self.group_rule = (cfg.group_pairs, cfg.group_margin, cfg.data_order_seed)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    # -- one piece -------------------------------------------------------------------------------------
    def analyze(self, rows: list[RawRow], source: str | None) -> Piece:
        piece = Piece(rows=len(rows))
        src = piece.sources.setdefault(source or "in-memory rows", Counter())
        src["rows"] += len(rows)
        good = []
        for r in rows:
            fmt = row_format(None if isinstance(r.value, BadRow) else r.value)
            piece.formats[fmt] += 1
            at = where(source, r.row_id, r.line)
            piece.source_formats.setdefault((source or "in-memory rows", fmt), Hits()).add(
                r.row_id, at, keep=self.keep)
            same = pair_identity(r.value)
            if same:
                name = "identical_pairs" if same == "identical" else "whitespace_identical_pairs"
                piece.checks[name].add(r.row_id, at, keep=self.keep)
            try:
                if isinstance(r.value, BadRow):
                    raise r.value
                good.append((r, at, self._group_pair(r) if is_group_row(r.value)
                             else normalize_pair(r.value)))
            except BadRow as b:
                self._bad(piece, src, b, r.row_id, at)
        self._tokenized(piece, src, good)
        src["kept"] += int(piece.lengths["kept"].sum())
        return piece

    def _group_pair(self, r: RawRow) -> Example:
        """A prompt group as the Example of its first pair (the group's bad-row rules applied on the way)."""
        g = normalize_group(r.value)
        i, j = checked_pairs(g, *self.group_rule, r.row_id)[0]
        ex = g.example
        return Example(ex.conversational, ex.prompt, [ex.completions[i], ex.completions[j]], ex.tools,
                       ex.template_kwargs, ex.images)

    def _bad(self, piece: Piece, src: Counter, b: BadRow, row_id: int, at: str) -> None:
        piece.bad.setdefault(b.kind, Hits()).add(row_id, at, b.problem, keep=self.keep)
        src["bad_rows"] += 1

    def _tokenized(self, piece: Piece, src: Counter, good: list) -> None:
        proc = self.proc
        texts, special, gen_missing, rendered = [], [], [], []
        for r, at, ex in good:
            try:
                prompt, fulls = proc._texts(ex)
                gen_missing.append(ex.conversational and proc._template(ex, ex.prompt, False) == prompt)
            except BadRow as b:
                self._bad(piece, src, b, r.row_id, at)
                continue
            rendered.append((r, at, ex))
            texts += [prompt, *fulls]
            special += [proc._special(ex, prompt)] * 3
            if ex.prompt in ("", []):
                how = "'prompt' is empty" if isinstance(r.value, dict) and r.value.get("prompt") is not None \
                    else "chosen and rejected share no prefix, so the implicit prompt is empty"
                piece.checks["empty_prompt"].add(r.row_id, at, how, keep=self.keep)
        good = rendered
        ids = proc._encode(texts, special) if texts else []
        lens = _lengths(len(good))
        n = 0
        for i, ((r, at, ex), missing_gen) in enumerate(zip(good, gen_missing)):
            p_ids, full_ids = ids[3 * i], ids[3 * i + 1: 3 * i + 3]
            if missing_gen:
                piece.checks["missing_generation_prompt"].add(r.row_id, at, keep=self.keep)
            lens_row, bad = self._row(piece, r.row_id, at, p_ids, full_ids, ex.conversational)
            if bad is not None:
                self._bad(piece, src, bad, r.row_id, at)
            if lens_row is None:
                continue
            for k, v in lens_row.items():
                lens[k][n] = v
            lens["row_id"][n] = r.row_id
            n += 1
        piece.length_parts = [{k: v[:n] for k, v in lens.items()}]

    def _row(self, piece: Piece, row_id: int, at: str, p_ids: list[int], full_ids: list[list[int]],
             conv: bool):
        """Checks on one tokenized row -> (its lengths or None, the BadRow training would drop it for or
        None)."""
        try:  # untruncated sequences, EOS rule applied: raises for a completion that adds no token
            seqs = [self.full._sequence(p_ids, f, conv)[0] for f in full_ids]
        except BadRow as b:
            return None, b
        starts = [diverge(p_ids, f) for f in full_ids]
        self._template_checks(piece, row_id, at, p_ids, full_ids, seqs, starts)
        if seqs[0] == seqs[1]:
            piece.checks["identical_pairs"].add(row_id, at, "identical after tokenization", keep=self.keep)
        out = {"prompt": len(p_ids), "chosen": len(seqs[0]) - starts[0], "rejected": len(seqs[1]) - starts[1]}
        bad = None
        try:
            cut = [self.proc._sequence(p_ids, f, conv) for f in full_ids]
            # training drops these
            identical_tokens(cut, self.proc.opts.max_length, self.proc.opts.truncation_mode)
        except BadRow as b:
            bad, cut = b, [(s, st, False) for s, st in zip(seqs, starts)]
        truncated = bad is None and any(t for _, _, t in cut)
        if truncated:
            longest = max(len(s) for s in seqs)
            piece.checks["truncated_rows"].add(row_id, at,
                                               f"{longest} tokens > max_length {self.proc.opts.max_length}",
                                               keep=self.keep)
            piece.tokens_cut += sum(len(s) - len(c) for s, (c, _, _) in zip(seqs, cut))
        out.update(chosen_seq=len(cut[0][0]), rejected_seq=len(cut[1][0]), kept=int(bad is None))
        return out, bad

    def _template_checks(self, piece, row_id, at, p_ids, full_ids, seqs, starts) -> None:
        keep = self.keep
        for p_end, f in zip(starts, full_ids):
            if p_end < len(p_ids):
                piece.checks["prompt_not_prefix"].add(row_id, at, self._divergence(p_ids, f, p_end),
                                                      keep=keep)
                break
        if self.bos is not None and any(s[:2] == [self.bos, self.bos] for s in seqs):
            piece.checks["doubled_bos"].add(row_id, at, keep=keep)
        if self.eos is None:
            piece.checks["missing_eos"].add(row_id, at, "the tokenizer has no EOS token", keep=keep)
            return
        ends = [self._core(s) for s in seqs]
        if any(len(core) >= 2 and core[-2:] == [self.eos, self.eos] for core in ends):
            piece.checks["doubled_eos"].add(row_id, at, keep=keep)
        if any(not core or core[-1] != self.eos for core in ends):
            piece.checks["missing_eos"].add(row_id, at, self._tail(seqs, ends), keep=keep)

    def _core(self, seq: list[int]) -> list[int]:
        """``seq`` without up to 3 trailing whitespace-only tokens (templates write "<|im_end|>\\n")."""
        k = len(seq)
        while k > 0 and len(seq) - k < 3 and seq[k - 1] != self.eos \
                and not self.tok.decode([seq[k - 1]]).strip():
            k -= 1
        return seq[:k]

    def _tail(self, seqs, ends) -> str:
        for s, core in zip(seqs, ends):
            if not core or core[-1] != self.eos:
                return f"ends with {self.tok.decode(s[-4:])!r}"
        return ""

    def _divergence(self, p_ids: list[int], f_ids: list[int], i: int) -> str:
        lo = max(0, i - 6)
        alone, inside = self.tok.decode(p_ids[lo:i + 6]), self.tok.decode(f_ids[lo:i + 6])
        return f"token {i}: prompt alone {alone!r} vs in prompt+completion {inside!r}"

