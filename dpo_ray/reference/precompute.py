"""reference.source: precomputed — one Ray Data pass of the reference model before training, cached.

``attach_reference_logps(ds, cfg, ref_source, tokenizer, split)`` returns ``ds`` with float32 columns
``ref_chosen_logps`` / ``ref_rejected_logps``. The values are computed once by a pool of Ray Data
actors holding the reference model (``map_batches`` on an actor pool of ``reference.num_actors``), written
as parquet (row_id + the two columns) under ``<cache_dir>/<key>/<split>`` and joined back onto the rows
by ``row_id``. The next run with the same key reads the cache instead of running the model.

The key hashes everything the numbers depend on: the model (directory path + file sizes/mtimes, or a
hash of the shipped weights, or the tiny default's seed), the data (source files + sizes/mtimes, or a
content hash of the tokenized rows when the dataset has no files), the tokenization and LD-DPO settings,
and the reference precision.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from dpo_ray.config import DPOConfig
from dpo_ray.owned import mark_owned, remove_owned
from dpo_ray.redact import redact

CACHE_FORMAT = 1
FINGERPRINT_BATCH = 1024  # rows per content-hash task (the key does not depend on it)
ROW_COLUMNS = ["row_id", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len"]
OUT_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]
# Prompt groups (dpo_ray.data.groups): one reference log-prob per response, a list per row.
GROUP_ROW_COLUMNS = ["row_id", "group_input_ids", "group_lens", "group_prompt_len", "pair_chosen",
                     "pair_rejected"]
GROUP_OUT_COLUMN = "ref_group_logps"
# Settings that change which rows exist or how they are tokenized (the data side of the key).
_DATA_KEYS = ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
              "eval_dataset_name", "eval_fraction", "max_train_samples", "max_eval_samples", "on_bad_row",
              "seed", "data_seed")


# ============================================================================ cache key

def _file_stats(paths: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        except OSError:  # remote URI (s3://...): its name is what we have
            out.append((p, -1, -1))
    return out


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(ref_source: Any, cfg: DPOConfig, tokenizer) -> dict[str, Any]:
    """What identifies the reference weights: a directory's files, shipped weights' hash, or the tiny seed."""
    if isinstance(ref_source, ray.ObjectRef):
        ref_source = ray.get(ref_source)
    if ref_source is None:
        from dpo_ray.models import TINY_LLAMA

        return {"tiny_llama": TINY_LLAMA, "seed": cfg.seed,
                "vocab": len(tokenizer) if tokenizer is not None else None}
    if isinstance(ref_source, dict):
        config = ref_source["config"]
        config_json = (config.to_json_string() if hasattr(config, "to_json_string")
                       else json.dumps(config, default=str))
        return {"config": hashlib.sha256(config_json.encode()).hexdigest(),
                "weights": state_dict_fingerprint(ref_source["state_dict"])}
    path = Path(ref_source).resolve()
    files = [str(p) for p in path.rglob("*") if p.is_file()] if path.is_dir() else [str(path)]
    return {"path": str(path), "files": [(Path(f).name, s, m) for f, s, m in _file_stats(files)]}


def _row_hashes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's 128-bit digest, summed as two 64-bit halves (mod 2**64): a sum does not depend on the rows'
    order or on how Ray Data cut them into blocks and batches, so the same rows give the same key every
    time."""
    lo = hi = 0
    for i in range(len(batch["row_id"])):
        r = hashlib.blake2b(digest_size=16)
        for col in (GROUP_ROW_COLUMNS if "group_input_ids" in batch else ROW_COLUMNS):
            r.update(np.asarray(batch[col][i], dtype=np.int64).tobytes() + b"|")
        d = r.digest()
        lo, hi = ((lo + int.from_bytes(d[:8], "little")) % 2**64,
                  (hi + int.from_bytes(d[8:], "little")) % 2**64)
    return {"lo": np.array([lo], dtype=np.uint64), "hi": np.array([hi], dtype=np.uint64),
            "rows": np.array([len(batch["row_id"])])}


def dataset_fingerprint(ds: ray.data.Dataset, cfg: DPOConfig, groups: bool = False) -> dict[str, Any]:
    """Source files + sizes/mtimes and the data settings; a content hash when there are no files."""
    settings = {k: getattr(cfg, k) for k in _DATA_KEYS}
    # which pairs a group gives changes nothing here, but the per-response columns are another layout
    if groups:
        settings = {**settings, "groups": True}
    files = ds.input_files()
    if files:
        return {"files": _file_stats(files), "settings": settings}
    parts = ds.select_columns(GROUP_ROW_COLUMNS if groups else ROW_COLUMNS).map_batches(
        _row_hashes, batch_format="numpy", batch_size=FINGERPRINT_BATCH).take_all()
    lo, hi = (sum(int(p[k]) for p in parts) % 2**64 for k in ("lo", "hi"))
    return {"content": f"{hi:016x}{lo:016x}", "rows": int(sum(p["rows"] for p in parts)),
            "settings": settings}


def tokenization_settings(cfg: DPOConfig, tokenizer) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None)
    rc = cfg.reference
    return {"max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode, "ld_alpha": cfg.ld_alpha,
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "vocab_size": len(tokenizer) if tokenizer is not None else None,
            "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16] if template else None,
            # the reference's precision changes the numbers
            "precision": {"gpu": rc.num_gpus > 0, "torch_dtype": cfg.torch_dtype, "bf16": cfg.bf16,
                          "fp16": cfg.fp16},
            # how the reference is loaded changes the numbers too (attention kernel, 4-bit,
            # from_pretrained kwargs); secret-looking kwargs (a hub token) do not, and the key's parts are
            # written to _key.json
            "loading": {"attn_implementation": cfg.attn_implementation, "load_in_4bit": cfg.load_in_4bit,
                        "model_init_kwargs": redact(cfg.model_init_kwargs)}}


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_root(cfg: DPOConfig) -> Path:
    return Path(cfg.reference.cache_dir or "~/.cache/dpo_ray/ref_logps").expanduser()


# ============================================================================ the pass

def pad_pairs(rows: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows -> the collated pair batch (CONTRACTS): input_ids/attention_mask/completion_mask (2B, T)."""
    seqs = list(rows["chosen_input_ids"]) + list(rows["rejected_input_ids"])
    prompt_lens = list(rows["chosen_prompt_len"]) + list(rows["rejected_prompt_len"])
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        n = len(s)
        # a copy: Arrow's buffers are read-only
        input_ids[i, :n] = torch.from_numpy(np.array(s, dtype=np.int64))
        attention[i, :n] = 1
        completion[i, int(p):n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
            "row_id": torch.from_numpy(np.array(rows["row_id"], dtype=np.int64))}


class ReferenceScorer:
    """Ray Data callable class: one reference model per actor, rows in, ref log-probs out."""

    def __init__(self, cfg_dict: dict, ref_source: Any, tokenizer, pad_id: int, groups: bool = False):
        from dpo_ray.reference.actor import ReferenceModelHost

        self.host = ReferenceModelHost(cfg_dict, ref_source, tokenizer)
        self.pad_id, self.ld_alpha = pad_id, self.host.cfg.ld_alpha
        self.groups = groups

    def _groups(self, rows: dict[str, np.ndarray]):
        """Prompt groups: every response scored once (one packed forward per group), a list per row."""
        import pyarrow as pa

        from dpo_ray.data.collate import collate_groups

        batch = collate_groups(rows, self.pad_id)
        # each response its own "pair": per-response log-probs
        every = torch.arange(batch["input_ids"].shape[0])
        batch["pair_chosen"], batch["pair_rejected"] = every, every
        _, _, logps, _ = self.host.logps(None, batch, None)
        ends = np.cumsum([len(n) for n in rows["group_lens"]])
        values = np.split(np.asarray(logps, dtype=np.float32), ends[:-1])  # numpy (to_wire) or a tensor
        return pa.table({"row_id": pa.array(np.asarray(rows["row_id"], dtype=np.int64)),
                         GROUP_OUT_COLUMN: pa.array([v.tolist() for v in values],
                                                    type=pa.list_(pa.float32()))})

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.groups:
            return self._groups(rows)
        batch = pad_pairs(rows, self.pad_id)
        _, _, chosen, rejected = self.host.logps(None, batch, self.ld_alpha)
        return {"row_id": np.asarray(rows["row_id"], dtype=np.int64),
                "ref_chosen_logps": np.asarray(chosen, dtype=np.float32),  # the actor's answers: numpy
                "ref_rejected_logps": np.asarray(rejected, dtype=np.float32)}


def _compute(ds: ray.data.Dataset, cfg: DPOConfig, ref_source: Any, tokenizer, out_dir: Path,
             groups: bool = False) -> int:
    """Run the reference over ``ds`` into ``out_dir``/part-00000.parquet; the number of rows scored."""
    rc = cfg.reference
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    kwargs: dict[str, Any] = ({"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus} if rc.num_gpus
                              else {"num_cpus": rc.num_cpus})
    if rc.resources:
        kwargs["resources"] = dict(rc.resources)
    scored = ds.select_columns(GROUP_ROW_COLUMNS if groups else ROW_COLUMNS).map_batches(
        ReferenceScorer, fn_constructor_args=(cfg.model_dump(mode="json"), ref_source, tokenizer, pad_id,
                                              groups),
        batch_size=rc.batch_size or cfg.per_device_eval_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors), **kwargs)
    # The driver writes the (row_id, two floats) results itself: one file, in the cache directory it sees,
    # with a progress line as rows arrive (the total is unknown before the data is read: a rate instead).
    import pyarrow.parquet as pq

    from dpo_ray.progress import Progress

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress(f"reference log-probs ({out_dir.name.split('.')[0]})", None, "rows")
    writer, rows = None, 0
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            if writer is None:
                writer = pq.ParquetWriter(str(out_dir / "part-00000.parquet"), batch.schema)
            writer.write_table(batch)
            rows += batch.num_rows
            bar.update(rows)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    return rows


PASSES_LOG = "passes.jsonl"


def _log_pass(key_dir: Path, split: str, rows: int, seconds: float, kept: bool) -> None:
    """One line per reference pass over this key, appended to ``<key>/passes.jsonl`` (one short write: lines
    from concurrent runs stay whole). ``kept`` false: another run wrote the key first and this pass's result
    was dropped, the rows were scored twice. A sweep's store shows here that its trials shared one pass."""
    import socket

    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "split": split, "rows": rows,
            "seconds": round(seconds, 2), "host": socket.gethostname(), "pid": os.getpid(), "kept": kept}
    with open(key_dir / PASSES_LOG, "a") as f:
        f.write(json.dumps(line) + "\n")


def _load_table(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(str(path), columns=["row_id", *OUT_COLUMNS])
    ids = table.column("row_id").to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        dup = int(ids[1:][np.diff(ids) == 0][0])
        raise RuntimeError(f"reference cache {path} holds row_id {dup} twice; row_ids must be unique per "
                           "split")
    chosen = table.column(OUT_COLUMNS[0]).to_numpy().astype(np.float32)[order]
    rejected = table.column(OUT_COLUMNS[1]).to_numpy().astype(np.float32)[order]
    return ids, chosen, rejected


def _load_group_table(path: Path) -> tuple[np.ndarray, list]:
    """(sorted row ids, each row's per-response reference log-probs) of a prompt-group cache."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path), columns=["row_id", GROUP_OUT_COLUMN])
    ids = table.column("row_id").to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    values = table.column(GROUP_OUT_COLUMN).to_pylist()
    ids = ids[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        dup = int(ids[1:][np.diff(ids) == 0][0])
        raise RuntimeError(f"reference cache {path} holds row_id {dup} twice; row_ids must be unique per "
                           "split")
    return ids, [values[i] for i in order]


_TABLES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _attach(batch, table_ref: Any, source: str):
    """Ray Data map: add the cached columns to a pyarrow batch by row_id."""
    import pyarrow as pa

    key = table_ref.hex() if isinstance(table_ref, ray.ObjectRef) else source
    if key not in _TABLES:
        _TABLES.clear()  # one table per process at a time
        _TABLES[key] = ray.get(table_ref) if isinstance(table_ref, ray.ObjectRef) else table_ref
    ids, *values = _TABLES[key]
    row_ids = batch.column("row_id").to_numpy().astype(np.int64)
    pos = np.searchsorted(ids, row_ids).clip(max=len(ids) - 1)
    missing = ids[pos] != row_ids
    if missing.any():
        raise RuntimeError(f"row_id {int(row_ids[missing][0])} has no reference log-probs in the cache "
                           f"{source}; the cache does not match this data: delete that directory to "
                           "recompute it")
    if len(values) == 1:  # prompt groups: one list of per-response log-probs per row
        if GROUP_OUT_COLUMN in batch.column_names:
            batch = batch.drop_columns([GROUP_OUT_COLUMN])
        return batch.append_column(GROUP_OUT_COLUMN, pa.array([values[0][p] for p in pos],
                                                              type=pa.list_(pa.float32())))
    chosen, rejected = values
    for name, values in zip(OUT_COLUMNS, (chosen[pos], rejected[pos])):
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(name, pa.array(values, type=pa.float32()))
    return batch


def attach_reference_logps(ds: ray.data.Dataset, cfg: DPOConfig, ref_source: Any, tokenizer, split: str,
                           groups: bool = False) -> ray.data.Dataset:
    """``ds`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` (float32) from the reference model, cached.
    ``groups`` (prompt-group rows): one column ``ref_group_logps``, a float32 per response of each row."""
    from dpo_ray.vision import is_processor

    # the pass below builds text-only batches: its log-probs would ignore the images
    if is_processor(tokenizer):
        from dpo_ray.config import ConfigError
        from dpo_ray.config.rules import PRECOMPUTED_VISION_PROBLEM

        raise ConfigError([PRECOMPUTED_VISION_PROBLEM])
    parts = {"model": model_identity(ref_source, cfg, tokenizer),
             "data": dataset_fingerprint(ds, cfg, groups),
             "tokenization": tokenization_settings(cfg, tokenizer)}
    key = cache_key(parts)
    out = cache_root(cfg) / key / split
    done = out / "_SUCCESS"
    if done.exists():
        print(f"reference cache hit: key {key} ({split}) at {out}", flush=True)
    else:
        print(f"reference cache miss: key {key} ({split}); computing reference log-probs into {out}",
              flush=True)
        t0 = time.perf_counter()
        # A unique temporary folder, then one rename: concurrent runs with the same key (a sweep, two jobs on
        # shared storage) never write into each other's files; the first rename wins, the others use its
        # result.
        mark_owned(out.parent, "reference-cache")  # this key's folder: its deletes stay inside it
        tmp = Path(tempfile.mkdtemp(prefix=f"{split}.tmp-", dir=out.parent))
        try:
            scored = _compute(ds, cfg, ref_source, tokenizer, tmp, groups)
            (tmp / "_key.json").write_text(json.dumps({"key": key, **parts}, indent=1, default=str))
            (tmp / "_SUCCESS").write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} "
                                          f"{time.perf_counter() - t0:.1f}s\n")
            # a crashed writer's leftovers (older layout): replace them
            if out.exists() and not done.exists():
                remove_owned(out, out.parent)
            try:
                tmp.rename(out)
                kept = True
            except OSError:
                if not done.exists():
                    raise
                kept = False
                print(f"reference cache: another run wrote key {key} ({split}) first; using its result",
                      flush=True)
            _log_pass(out.parent, split, scored, time.perf_counter() - t0, kept)
        finally:
            remove_owned(tmp, out.parent)
    table = _load_group_table(out) if groups else _load_table(out)
    return ds.map_batches(_attach, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"table_ref": ray.put(table), "source": str(out)})
