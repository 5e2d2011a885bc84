"""Normalised examples -> token ids: chat template, divergence point, EOS, truncation (docs/data.md).

``RowProcessor`` turns a list of raw rows into the tokenized columns of docs/CONTRACTS.md, applying
``on_bad_row``. It is what the Ray Data tasks run and what ``tokenize_rows`` runs in-process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dpo_ray.data.rows import (
    BAD_IMAGE,
    IDENTICAL,
    IDENTICAL_TRUNCATED,
    PROMPT_FILLS,
    TEMPLATE_ERROR,
    BadRow,
    Example,
    bad_row_error,
    normalize_pair,
    normalize_sft,
)
from dpo_ray.errors import ConfigError

MAX_EXAMPLES = 5  # bad-row messages kept per part for the report
SHAPE_SUFFIX = "_shape"  # a pixel column K is stored flat, with its per-row array shape in K_shape


@dataclass
class TokenizeOptions:
    max_length: int | None
    truncation_mode: str = "keep_start"
    on_bad_row: str = "raise"
    mode: str = "dpo"  # "dpo" | "sft" | "groups" (prompt groups, dpo_ray.data.groups)
    group_pairs: str = "all"  # groups only: the pair rule, its margin and seed (best_vs_random)
    group_margin: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg, mode: str = "dpo") -> TokenizeOptions:
        if mode != "groups":
            return cls(cfg.max_length, cfg.truncation_mode, cfg.on_bad_row, mode)
        seed = cfg.data_order_seed
        return cls(cfg.max_length, cfg.truncation_mode, cfg.on_bad_row, mode, cfg.group_pairs,
                   cfg.group_margin, seed)


@dataclass
class PartStats:
    """Counts for one processed piece of a split (merged by DataStats)."""

    seen: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "examples": self.examples}


@dataclass
class RawRow:
    row_id: int
    line: int | None  # 1-based line/row number in the source file, for messages
    value: Any  # the parsed row, or a BadRow raised while reading it


def diverge(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Index where prompt and prompt+completion token sequences first differ: the completion start.

    Real BPE tokenizers can merge the last prompt characters with the first completion characters, so the
    prompt's own tokens are not always a prefix of the joint tokenization (tested with DeepSeek's).
    """
    n = min(len(prompt_ids), len(full_ids))
    i = 0
    while i < n and prompt_ids[i] == full_ids[i]:
        i += 1
    return i


def truncate(ids: list[int], prompt_len: int, max_length: int | None,
             mode: str) -> tuple[list[int], int, bool]:
    """(ids, prompt_len) cut to max_length. keep_start keeps the head, keep_end the tail (prompt shrinks).

    Raises BadRow(prompt_fills_max_length) when keep_start leaves no completion token.
    """
    if max_length is None or len(ids) <= max_length:
        return ids, prompt_len, False
    if mode == "keep_end":
        cut = len(ids) - max_length
        return ids[cut:], max(0, prompt_len - cut), True
    if prompt_len >= max_length:
        raise BadRow(PROMPT_FILLS,
                     f"the prompt alone is {prompt_len} tokens, which fills max_length={max_length} "
                     "and leaves no completion token; raise max_length, shorten the prompt, or use "
                     "truncation_mode: keep_end")
    return ids[:max_length], prompt_len, True


class RowProcessor:
    """Raw rows -> tokenized pyarrow table + PartStats, with the bad-row policy applied."""

    def __init__(self, tokenizer, opts: TokenizeOptions, source: str | None = None):
        from dpo_ray import vision

        # A processor (vision): its tokenizer does the text, the processor expands image tokens and makes
        # pixels.
        self.processor = tokenizer if vision.is_processor(tokenizer) else None
        tokenizer = vision.text_tokenizer(tokenizer)
        self.pixel_specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.image_ids: set[int] = set()
        if self.processor is not None:
            if opts.truncation_mode == "keep_end":  # keep_end would cut the prompt's image tokens
                raise ConfigError([("truncation_mode", vision.keep_end_problem())])
            self.image_ids = vision.image_token_ids(self.processor)
            self.pixel_specs = self._probe_pixels()
        self.tok, self.opts, self.source = tokenizer, opts, source
        self.eos = tokenizer.eos_token_id
        bos = getattr(tokenizer, "bos_token", None)
        self._bos_text = bos if isinstance(bos, str) and bos else None
        self._adds_bos = bool(tokenizer.bos_token_id is not None and
                              tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])

    # -- vision ------------------------------------------------------------------------------------------
    def _probe_pixels(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The processor's pixel outputs for one dummy image: key -> (dtype, per-image trailing shape).
        Fixes the pixel columns of every piece, so blocks with and without images share one schema."""
        from PIL import Image

        from dpo_ray.vision import IMAGE_TOKEN, PIXEL_KEYS

        token = getattr(self.processor, "image_token", None) or IMAGE_TOKEN
        out = self.processor(text=[token], images=[Image.new("RGB", (32, 32))], return_tensors="np")
        specs = {}
        for k in PIXEL_KEYS:
            if k in out:
                a = np.asarray(out[k])
                specs[k] = (np.dtype(np.float32 if a.dtype.kind == "f" else np.int64), tuple(a.shape[1:]))
        return specs

    def _base_dir(self) -> Path | None:
        """Relative image paths resolve against the data file's directory."""
        if self.source and Path(self.source).is_file():
            return Path(self.source).resolve().parent
        return None

    def _vision_encode(self, ex: Example, texts: list[str], special: bool) -> tuple[list[list[int]], dict]:
        """(ids of [prompt, *prompt+completion] with image tokens expanded, pixel arrays of the row's
        images)."""
        from dpo_ray.vision.images import ImageError, load_images

        try:
            images = load_images(ex.images, self._base_dir())
        except ImageError as e:
            raise BadRow(BAD_IMAGE, str(e)) from None
        try:
            prompt = self.processor(text=texts[:1], images=images, add_special_tokens=special,
                                    return_tensors="np")
            fulls = self.processor(text=texts[1:], images=images * (len(texts) - 1),
                                   add_special_tokens=special)
        except (ValueError, TypeError, IndexError) as e:  # e.g. image placeholders and images disagree
            raise BadRow(BAD_IMAGE, f"the processor refused the row's {len(images)} image(s): {e}") from None
        ids = [list(map(int, prompt["input_ids"][0]))] + [list(map(int, x)) for x in fulls["input_ids"]]
        return ids, {k: np.asarray(prompt[k], dtype=dt) for k, (dt, _) in self.pixel_specs.items()}

    def _no_pixels(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((0, *shape), dtype=dt) for k, (dt, shape) in self.pixel_specs.items()}

    # -- texts -------------------------------------------------------------------------------------------
    def _template(self, ex: Example, messages: list[dict], generation_prompt: bool) -> str:
        if self.processor is not None and getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, tools=ex.tools,
                                                      add_generation_prompt=generation_prompt, tokenize=False,
                                                      **ex.template_kwargs)
        if getattr(self.tok, "chat_template", None) is None:
            raise ValueError(
                "a conversational row (lists of {role, content} messages) needs a chat template, but the "
                "tokenizer has none; set tokenizer.chat_template (a jinja string) or use standard string "
                "rows")
        return self.tok.apply_chat_template(messages, tools=ex.tools, add_generation_prompt=generation_prompt,
                                            tokenize=False, **ex.template_kwargs)

    def _texts(self, ex: Example) -> tuple[str, list[str]]:
        """(prompt text, [prompt+completion text per completion]). A chat template that refuses the row
        (jinja's raise_exception, e.g. "roles must alternate", or a bad template argument) is a bad row."""
        if not ex.conversational:
            return ex.prompt, [ex.prompt + c for c in ex.completions]
        from jinja2 import TemplateError

        try:
            prompt = self._template(ex, ex.prompt, True)
            return prompt, [self._template(ex, ex.prompt + c, False) for c in ex.completions]
        except (TemplateError, TypeError) as e:
            raise BadRow(TEMPLATE_ERROR,
                         f"the chat template refused the row ({type(e).__name__}: {str(e)[:200]}); "
                         "fix the messages (or tools / chat_template_kwargs) to fit the template") from None

    def _special(self, ex: Example, prompt_text: str) -> bool:
        # The chat template writes its own special tokens; a text that already starts with BOS gets no second
        # one.
        if ex.conversational:
            return False
        return not (self._adds_bos and self._bos_text and prompt_text.startswith(self._bos_text))

    def _encode(self, texts: list[str], special: list[bool]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in texts]
        for flag in (True, False):
            idx = [i for i, s in enumerate(special) if s == flag]
            if idx:
                enc = self.tok([texts[i] for i in idx], add_special_tokens=flag, return_attention_mask=False)
                for i, ids in zip(idx, enc["input_ids"]):
                    out[i] = list(ids)
        return out

    # -- rows --------------------------------------------------------------------------------------------
    def _normalize(self, rows: list[RawRow], stats: PartStats) -> list[tuple[RawRow, Example]]:
        norm = normalize_sft if self.opts.mode == "sft" else normalize_pair
        good = []
        for r in rows:
            try:
                if isinstance(r.value, BadRow):
                    raise r.value
                good.append((r, norm(r.value)))
            except BadRow as b:
                self._bad(b, r, stats)
        return good

    def _bad(self, b: BadRow, r: RawRow, stats: PartStats) -> None:
        err = bad_row_error(b, self.source, r.row_id, r.line)
        if self.opts.on_bad_row == "raise":
            raise err
        stats.dropped[b.kind] += 1
        if len(stats.examples) < MAX_EXAMPLES:
            stats.examples.append(str(err).split(". Fix the row")[0])

    def process(self, rows: list[RawRow]) -> tuple[pa.Table, PartStats]:
        if self.opts.mode == "groups":
            return self._process_groups(rows)
        stats = PartStats(seen=len(rows))
        good = self._normalize(rows, stats)
        texts, special, spans, rendered = [], [], [], []
        for r, ex in good:
            try:
                prompt, fulls = self._texts(ex)
            except BadRow as b:
                self._bad(b, r, stats)
                continue
            rendered.append((r, ex))
            flag = self._special(ex, prompt)
            if ex.images is not None and self.processor is None and _has_images(ex.images):
                raise ValueError("rows carry an 'images' column but the processing class is a tokenizer; "
                                 "pass the vision model's AutoProcessor (processing_class=processor, or a "
                                 "model directory that holds its processor files)")
            spans.append(len(texts))
            texts += [prompt, *fulls]
            # image rows (flag None here) are encoded by the processor, one row at a time
            special += ([None if self.processor is not None and _has_images(ex.images) else flag]
                        * (1 + len(fulls)))
        good = rendered
        ids = self._encode(texts, special)
        n_comp = 1 if self.opts.mode == "sft" else 2
        cols: dict[str, list] = {"row_id": []}
        names = ["chosen", "rejected"][:n_comp]
        for n in names:
            cols[f"{n}_input_ids"], cols[f"{n}_prompt_len"] = [], []
        for k in self.pixel_specs:
            cols[k], cols[k + SHAPE_SUFFIX] = [], []
        for (r, ex), start in zip(good, spans):
            try:
                row_ids, pixels = ids[start:start + 1 + n_comp], None
                if special[start] is None:
                    row_ids, pixels = self._vision_encode(ex, texts[start:start + 1 + n_comp],
                                                          self._special(ex, texts[start]))
                seqs = [self._sequence(row_ids[0], row_ids[1 + k], ex.conversational) for k in range(n_comp)]
                if n_comp == 2:
                    identical_tokens(seqs, self.opts.max_length, self.opts.truncation_mode)
            except BadRow as b:
                self._bad(b, r, stats)
                continue
            stats.truncated += any(t for _, _, t in seqs)
            if self.pixel_specs:
                for k, a in (pixels if pixels is not None else self._no_pixels()).items():
                    cols[k].append(a.reshape(-1))
                    cols[k + SHAPE_SUFFIX].append(list(a.shape))
            cols["row_id"].append(r.row_id)
            for n, (seq, plen, _) in zip(names, seqs):
                cols[f"{n}_input_ids"].append(seq)
                cols[f"{n}_prompt_len"].append(plen)
        stats.kept = len(cols["row_id"])
        return to_table(cols, names, self.pixel_specs), stats

    def _process_groups(self, rows: list[RawRow]) -> tuple[pa.Table, PartStats]:
        """Prompt-group rows -> the group columns (docs/CONTRACTS.md): every response's prompt+response ids
        back to back, their lengths and prompt lengths, and the (chosen, rejected) response indices of the
        pairs."""
        from dpo_ray.data.groups import checked_pairs, normalize_group

        if self.processor is not None:
            raise ConfigError([("dataset_name",
                                "prompt groups (completions + scores/ranking) take text rows only; "
                                "a vision processor is not supported with them")])
        o, stats, good = self.opts, PartStats(seen=len(rows)), []
        for r in rows:
            try:
                if isinstance(r.value, BadRow):
                    raise r.value
                g = normalize_group(r.value)
                pairs = checked_pairs(g, o.group_pairs, o.group_margin, o.seed, r.row_id)
                prompt, fulls = self._texts(g.example)
            except BadRow as b:
                self._bad(b, r, stats)
                continue
            good.append((r, g, pairs, prompt, fulls))
        texts, special = [], []
        for _, g, _, prompt, fulls in good:
            texts += [prompt, *fulls]
            special += [self._special(g.example, prompt)] * (1 + len(fulls))
        ids = self._encode(texts, special) if texts else []
        cols: dict[str, list] = {n: [] for n in GROUP_TABLE_COLUMNS}
        at = 0
        for r, g, pairs, _, fulls in good:
            row_ids, at = ids[at:at + 1 + len(fulls)], at + 1 + len(fulls)
            try:
                seqs = [self._sequence(row_ids[0], f, g.example.conversational) for f in row_ids[1:]]
                for i, j in pairs:
                    try:
                        identical_tokens([seqs[i], seqs[j]], o.max_length, o.truncation_mode)
                    except BadRow as b:
                        raise BadRow(b.kind, f"completions[{i}] and completions[{j}] (a pair): "
                                             f"{b.problem}") from None
            except BadRow as b:
                self._bad(b, r, stats)
                continue
            # only the responses some pair uses (best_vs_worst: 2 of K): the rest would be computed by the
            # policy and the reference and thrown away; the pairs' indices follow
            used = sorted({k for pair in pairs for k in pair})
            seqs, at_used = [seqs[k] for k in used], {k: n for n, k in enumerate(used)}
            pairs = [(at_used[i], at_used[j]) for i, j in pairs]
            stats.truncated += any(t for _, _, t in seqs)
            cols["row_id"].append(r.row_id)
            cols["group_input_ids"].append([t for seq, _, _ in seqs for t in seq])
            cols["group_lens"].append([len(seq) for seq, _, _ in seqs])
            cols["group_prompt_len"].append([plen for _, plen, _ in seqs])
            cols["pair_chosen"].append([i for i, _ in pairs])
            cols["pair_rejected"].append([j for _, j in pairs])
        stats.kept = len(cols["row_id"])
        return group_table(cols), stats

    def _sequence(self, prompt_ids: list[int], full_ids: list[int], conversational: bool):
        start = diverge(prompt_ids, full_ids)
        if not conversational and self.eos is not None and (not full_ids or full_ids[-1] != self.eos):
            full_ids = full_ids + [self.eos]
        if start >= len(full_ids):
            from dpo_ray.data.rows import EMPTY_COMPLETION

            raise BadRow(EMPTY_COMPLETION, "the completion adds no tokens after the prompt")
        seq = truncate(full_ids, start, self.opts.max_length, self.opts.truncation_mode)
        if seq[2] and self.image_ids:  # truncation must never separate image tokens from their pixels
            lost = sum(t in self.image_ids for t in full_ids) - sum(t in self.image_ids for t in seq[0])
            if lost:
                raise BadRow(PROMPT_FILLS,
                             f"max_length={self.opts.max_length} would cut {lost} of the row's image "
                             f"tokens (the row is {len(full_ids)} tokens with its images expanded); "
                             "raise max_length or use fewer/smaller images")
        return seq


def identical_tokens(seqs, max_length: int | None, mode: str) -> None:
    """Raise BadRow when chosen and rejected are the same token sequence as training sees it: after
    tokenization (texts that differ only where the tokenizer maps them alike), or after truncation (they
    differed only in tokens ``max_length`` cut): the pair's margin is 0 by construction."""
    (chosen, c_len, c_cut), (rejected, r_len, r_cut) = seqs
    if chosen != rejected or c_len != r_len:
        return
    if c_cut or r_cut:
        raise BadRow(IDENTICAL_TRUNCATED,
                     f"chosen and rejected are the same {len(chosen)} tokens after truncation to "
                     f"max_length={max_length} ({mode}): they differ only in the tokens it cut; "
                     "raise max_length, or shorten the prompt")
    raise BadRow(IDENTICAL, "chosen and rejected are different texts but the same tokens (the tokenizer maps "
                            "the characters where they differ alike, e.g. to <unk>), so the pair teaches "
                            "nothing")


def _has_images(value: Any) -> bool:
    from dpo_ray.vision.images import as_list

    return bool(as_list(value))


def schema(names: Iterable[str], pixel_specs: dict | None = None) -> pa.Schema:
    fields = [pa.field("row_id", pa.int64())]
    for n in names:
        fields += [pa.field(f"{n}_input_ids", pa.list_(pa.int32())), pa.field(f"{n}_prompt_len", pa.int32())]
    for k, (dt, _) in (pixel_specs or {}).items():  # vision: flat pixel arrays + their shapes
        fields += [pa.field(k, pa.list_(pa.from_numpy_dtype(dt))),
                   pa.field(k + SHAPE_SUFFIX, pa.list_(pa.int32()))]
    return pa.schema(fields)


def to_table(cols: dict[str, list], names: list[str], pixel_specs: dict | None = None) -> pa.Table:
    sch = schema(names, pixel_specs)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in sch}, schema=sch)


GROUP_TABLE_COLUMNS = ("row_id", "group_input_ids", "group_lens", "group_prompt_len", "pair_chosen",
                       "pair_rejected")


def group_table(cols: dict[str, list]) -> pa.Table:
    """The tokenized prompt-group columns (docs/CONTRACTS.md) as a table."""
    fields = [pa.field("row_id", pa.int64())] + [pa.field(n, pa.list_(pa.int32()))
                                                 for n in GROUP_TABLE_COLUMNS[1:]]
    sch = pa.schema(fields)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in sch}, schema=sch)


def table_to_columns(table: pa.Table) -> dict[str, Any]:
    """A tokenized table as the dict-of-columns ``collate_pairs`` takes (lists of int arrays)."""
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type):
            dt = np.float32 if pa.types.is_floating(col.type.value_type) else np.int64
            out[name] = [np.asarray(x, dtype=dt) for x in col.to_pylist()]
        else:
            out[name] = col.to_numpy()
    return out
