"""A content-addressed store of precomputed reference log-probs, shared by the trials of a sweep (and by
sweeps).

Reference log-probs depend on the reference weights, the tokenizer (vocabulary, special tokens, chat
template), the tokenized rows (which the truncation settings shape), the reference precision, the forward
layout and the LD-DPO split (``ld_alpha``), and on nothing a sweep usually varies (β, loss_type,
learning_rate, label_smoothing, ...). The store key hashes exactly those, by content: a hash of every weight
file's bytes (or of the shipped tensors), of the tokenizer's vocabulary and template, of the tokenized rows'
ids; never a path or a modification time, so a copied model directory or a re-written data file with the same
rows finds the same entry.

Layout: ``<root>/<content key>/`` is the ``reference.cache_dir`` of every run with that key; inside it
``attach_reference_logps`` keeps its own cache (``<precompute key>/<split>/``,
dpo_ray/reference/precompute.py) and this module adds ``_content_key.json`` (what the key was made of, rows,
when) and ``_COMPLETE``. Writers take an exclusive ``fcntl`` lock on ``<root>/<content key>.lock`` for the
pass, so concurrent sweeps (processes, nodes on one shared file system) compute a key once; the others wait
and read. A run whose precompute key differs while the content key is the same (e.g. another path to the same
weights) gets an alias (a symlink) to the computed entry instead of a second pass.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpo_ray.config import DPOConfig
from dpo_ray.owned import OWNER_FILE, OwnershipError, is_owned, mark_owned, remove_owned, root_problem
from dpo_ray.redact import redact

STORE_FORMAT = 1
# the markers (dpo_ray/owned.py) it writes
STORE_KIND, ENTRY_KIND = "reference-store", "reference-store-entry"
COMPLETE = "_COMPLETE"
KEY_FILE = "_content_key.json"
ROW_COLUMNS = ("row_id", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")


# ============================================================================ content hashes

def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(ref_source: Any) -> dict[str, Any]:
    """A content hash of the reference weights: a directory's files (names relative to it + bytes), a shipped
    ``{config, state_dict}`` (an ObjectRef or the dict: config JSON + every tensor), or a module."""
    from dpo_ray.reference.precompute import state_dict_fingerprint

    if type(ref_source).__name__ == "ObjectRef":
        import ray

        ref_source = ray.get(ref_source)
    if isinstance(ref_source, dict):
        config = ref_source["config"]
        config_json = (config.to_json_string() if hasattr(config, "to_json_string")
                       else json.dumps(config, default=str))
        return {"config": hashlib.sha256(config_json.encode()).hexdigest()[:32],
                "tensors": state_dict_fingerprint(ref_source["state_dict"])}
    if hasattr(ref_source, "state_dict"):
        return weights_fingerprint({"config": ref_source.config, "state_dict": ref_source.state_dict()})
    path = Path(ref_source).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        name = str(p.relative_to(path)) if path.is_dir() else p.name
        h.update(f"{name}:{p.stat().st_size}:{file_digest(p)}|".encode())
    return {"files": len(files), "content": h.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Vocabulary, special tokens and chat template, by content (not the tokenizer's name or path)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds one
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    template = getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None)
    return {"class": type(tok).__name__,
            "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:32],
            "special": {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:32] if template else None}


def _row_digests(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = []
    for i in range(len(batch["row_id"])):
        r = hashlib.blake2b(digest_size=16)
        for col in ROW_COLUMNS:
            r.update(np.asarray(batch[col][i], dtype=np.int64).tobytes() + b"|")
        rows.append(r.hexdigest())
    return {"digest": np.array(rows)}


def rows_fingerprint(ds) -> dict[str, Any]:
    """A content hash of the tokenized rows (row ids, token ids, prompt lengths), independent of their
    order."""
    if ds is None:
        return {"rows": 0, "content": None}
    parts = ds.select_columns(list(ROW_COLUMNS)).map_batches(_row_digests, batch_format="numpy",
                                                             batch_size=1024).take_all()
    h = hashlib.blake2b(digest_size=16)
    digests = sorted(p["digest"] for p in parts)
    for d in digests:
        h.update(d.encode())
    return {"rows": len(digests), "content": h.hexdigest()}


def reference_settings(cfg: DPOConfig) -> dict[str, Any]:
    """The config keys the reference numbers depend on besides weights, tokenizer and rows."""
    rc = cfg.reference
    return {"ld_alpha": cfg.ld_alpha, "max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode,
            "precision": {"gpu": rc.num_gpus > 0, "torch_dtype": cfg.torch_dtype, "bf16": cfg.bf16,
                          "fp16": cfg.fp16},
            "prefix_sharing": cfg.prefix_sharing,
            # how the reference is loaded (attention kernel, 4-bit, from_pretrained kwargs): secrets
            # never enter
            "loading": {"attn_implementation": cfg.attn_implementation, "load_in_4bit": cfg.load_in_4bit,
                        "model_init_kwargs": sorted((k, str(v))
                                                    for k, v in redact(cfg.model_init_kwargs or {}).items())}}


def content_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": STORE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ============================================================================ the store

@dataclass
class Entry:
    key: str
    path: Path
    bytes: int
    rows: dict[str, int]
    created: str
    last_used: float
    complete: bool


@dataclass
class Cleaned:
    """What ``ReferenceStore.clean`` did: keys removed, keys whose removal failed (with why), and folders in
    the store's root that are not entries it wrote (left alone)."""

    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class ReferenceStore:
    """``ReferenceStore(root).ensure(cfg)`` -> the ``reference.cache_dir`` holding ``cfg``'s reference
    log-probs (computed now, once, if no run computed them before); ``entries()`` / ``report()`` /
    ``clean()``."""

    def __init__(self, root: str | os.PathLike):
        if root is None or not str(root).strip():  # Path("") would be the working directory
            raise OwnershipError(root_problem(root, "the reference store"))
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------------------------------ lookup
    @contextmanager
    def _lock(self, key: str):
        problem = root_problem(self.root, "the reference store")
        if problem:
            raise OwnershipError(problem)
        mark_owned(self.root, STORE_KIND)
        with open(self.root / f"{key}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another writer computes this key
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ensure(self, cfg: DPOConfig, tokenizer=None, train_dataset=None,
               eval_dataset=None) -> tuple[str, str]:
        """(content key, cache dir) for ``cfg``; runs the reference pass over train (and eval) unless stored.

        Prepares the data and the reference source as ``DPOTrainer.train`` does, so the precompute key that a
        trial computes later is one this store holds. Ray must be running (the driver's ``init_ray``).
        """
        import ray

        from dpo_ray.data import build_datasets, load_processing_class
        from dpo_ray.models import load_causal_lm, shippable
        from dpo_ray.paths import check_paths
        from dpo_ray.reference.precompute import attach_reference_logps

        check_paths(cfg)
        # as DPOTrainer.train: the tokenizer from the model directory, else the config's (bundled) one
        tokenizer = tokenizer or load_processing_class(cfg.model_name_or_path or cfg)
        prepared = build_datasets(cfg, tokenizer, train_dataset, eval_dataset, mode="dpo")
        if prepared.groups:
            from dpo_ray.errors import ConfigError

            raise ConfigError([("dataset_name",
                                "the sweep's shared reference store takes pair rows; prompt groups "
                                "(completions + scores/ranking) are not supported by sweeps yet")])
        model_source: Any = cfg.model_name_or_path
        if model_source is None:  # the tiny default, seeded by cfg.seed: shipped, as the trainer ships it
            model_source = ray.put(shippable(load_causal_lm(None, cfg, tokenizer)))
        ref_source = cfg.reference.model_name_or_path or model_source
        splits = {"train": prepared.train, **({"eval": prepared.eval} if prepared.eval is not None else {})}
        rows = {name: rows_fingerprint(ds) for name, ds in splits.items()}
        parts = {"weights": weights_fingerprint(ref_source), "tokenizer": tokenizer_fingerprint(tokenizer),
                 "rows": rows, "settings": reference_settings(cfg)}
        key = content_key(parts)
        entry = self.root / key
        sub = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"cache_dir": str(entry)})})
        with self._lock(key):
            if (entry / COMPLETE).exists():
                print(f"reference store hit: {key} at {entry}", flush=True)
                self._alias(entry, sub, splits, ref_source, tokenizer)
            else:
                print(f"reference store miss: {key}; one reference pass into {entry}", flush=True)
                mark_owned(entry, ENTRY_KIND)  # before the pass: an interrupted pass is still cleanable
                t0 = time.perf_counter()
                for name, ds in splits.items():
                    attach_reference_logps(ds, sub, ref_source, tokenizer, split=name)
                (entry / KEY_FILE).write_text(json.dumps((
                    {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "seconds": round(time.perf_counter() - t0, 2),
                     **parts, "row_counts": {n: r["rows"] for n, r in rows.items()}}), indent=1, default=str))
                (entry / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
            (entry / "_last_used").touch()
        return key, str(entry)

    @staticmethod
    def _alias(entry: Path, cfg: DPOConfig, splits: dict, ref_source: Any, tokenizer) -> None:
        """Same content key, another precompute key (another path to the same weights, other data settings
        that keep the rows): link that key to the computed one, so the run reads it instead of running a
        pass."""
        from dpo_ray.reference.precompute import (
            cache_key,
            dataset_fingerprint,
            model_identity,
            tokenization_settings,
        )

        for split, ds in splits.items():
            wanted = cache_key({"model": model_identity(ref_source, cfg, tokenizer),
                                "data": dataset_fingerprint(ds, cfg),
                                "tokenization": tokenization_settings(cfg, tokenizer)})
            if (entry / wanted / split / "_SUCCESS").exists():
                continue
            computed = next((p for p in entry.glob(f"*/{split}")
                             if (p / "_SUCCESS").exists() and not p.is_symlink()), None)
            if computed is not None:
                (entry / wanted).mkdir(exist_ok=True)
                (entry / wanted / split).symlink_to(Path("..") / computed.parent.name / split)

    def entries(self) -> list[Entry]:
        out = []
        if not self.root.exists():
            return out
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and is_owned(p, ENTRY_KIND)):
            meta = json.loads((d / KEY_FILE).read_text()) if (d / KEY_FILE).exists() else {}
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.is_symlink())
            used = d / "_last_used"
            out.append(Entry(key=d.name, path=d, bytes=size, rows=meta.get("row_counts", {}),
                             created=meta.get("created", "?"),
                             last_used=used.stat().st_mtime if used.exists() else d.stat().st_mtime,
                             complete=(d / COMPLETE).exists()))
        return out

    def report(self) -> str:
        """One line per key (size, rows per split, created, last used) and the total."""
        entries = self.entries()
        lines = [f"reference store {self.root}: {len(entries)} key(s), "
                 f"{_human(sum(e.bytes for e in entries))}"]
        for e in entries:
            rows = ", ".join(f"{k} {v}" for k, v in e.rows.items()) or "rows ?"
            state = "" if e.complete else "  (incomplete: a pass was interrupted or is running)"
            lines.append(f"  {e.key}  {_human(e.bytes):>9}  {rows}  created {e.created}  last used "
                         f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.last_used))}{state}")
        return "\n".join(lines)

    def clean(self, keys: list[str] | None = None, older_than_days: float | None = None,
              everything: bool = False) -> Cleaned:
        """Delete the given keys, those not used for ``older_than_days``, or everything: only entries this
        store wrote (their ``.dpo_ray_owned`` marker), in a root that is a store (its marker); anything else
        in the folder is never touched. Each key is removed under its lock, so a pass in progress is never
        deleted under a writer. A removal that fails is reported in ``failed``, not in ``removed``."""
        if not (keys or older_than_days is not None or everything):
            raise ValueError("say what to clean: keys, older_than_days or everything")
        problem = root_problem(self.root, "the reference store")
        if problem:
            raise OwnershipError(f"{problem}; nothing deleted")
        out = Cleaned()
        if not self.root.exists():
            return out
        if not is_owned(self.root, STORE_KIND):
            raise OwnershipError(f"{self.root} is not a reference store: it has no {OWNER_FILE} marker, "
                                 "which dpo_ray writes in every store it makes; nothing deleted")
        out.skipped = sorted(p.name for p in self.root.iterdir()
                             if p.is_dir() and not is_owned(p, ENTRY_KIND))
        now = time.time()
        for e in self.entries():
            if keys and e.key not in keys:
                continue
            if older_than_days is not None and now - e.last_used < older_than_days * 86400:
                continue
            try:
                with self._lock(e.key):
                    remove_owned(e.path, self.root, need_marker=True)
                remove_owned(self.root / f"{e.key}.lock", self.root)
            except OSError as err:  # OwnershipError included
                out.failed[e.key] = str(err)
                continue
            out.removed.append(e.key)
        return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
